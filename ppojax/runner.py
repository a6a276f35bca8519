"""Stage runners behind `ppojax train`: load the HF directory, train, checkpoint, report, save an HF directory.

sft and rm run here; ppo in `ppojax.runner_ppo`.

Batches: one optimizer step sees `per_device_train_batch_size × gradient_accumulation_steps` rows (sft rows or
rm pairs) in one pass; `ppojax.train.sft_step` / `reward_model_step` have no micro-batching, so the gradient is
the same as with accumulation but the memory is that of the whole optimizer batch.

Devices and hosts (every stage): with `mesh` (and `distributed` for several hosts) the model is read straight
into its shards, the step runs sharded over the mesh (`ppojax.parallel`), each process feeds its rows of the
batch, every process saves its shards of a checkpoint, and only process 0 writes the reports and the exported
model (gathered from every process first).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppojax import data as data_lib
from ppojax.checkpoint import Checkpointer
from ppojax.config import ConfigError, TrainConfig
from ppojax.models import CheckpointError, DecoderModel, init_lora, save_pretrained
from ppojax.models.peft_adapters import adapter_as_lora, load_with_adapters
from ppojax.models.lora import Lora
from ppojax.optim import OptimizerConfig, make_optimizer
from ppojax.reports import MetricsWriter


def run(config: TrainConfig, *, progress: bool = True) -> dict:
    """Runs one stage; returns the summary dict. Errors the user can fix are `ConfigError` (one line)."""
    if config.stage == "sft":
        return run_supervised(config, progress=progress)
    if config.stage == "rm":
        return run_supervised(config, progress=progress)
    from ppojax.runner_ppo import run_ppo

    return run_ppo(config, progress=progress)


def start_parallel(config: TrainConfig):
    """The `mesh` / `distributed` keys: jax.distributed (before any other JAX work), then the mesh: a
    `parallel.Layout`, or None when neither key is set (one program on the default device)."""
    if config.mesh is None and config.distributed is None:
        return None
    from ppojax import parallel

    try:
        layout, _ = parallel.setup(config.mesh, config.distributed, source="config")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return layout


def check_output_dir(config: TrainConfig) -> bool:
    """True when this run continues from the checkpoints already in output_dir.

    LLaMA-Factory's rule: a rerun of the same command resumes from the latest checkpoint (`resume` unset or
    true); `overwrite_output_dir: true` deletes them and starts over; `resume: false` refuses to touch them.
    In a multi-host run (call it after `start_parallel`) every process looks before process 0 deletes.
    """
    from ppojax import parallel

    directory = config.checkpoint_dir
    has_steps = os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
    parallel.sync_processes("ppojax: output_dir checked")
    if not has_steps:
        return False
    if config.overwrite_output_dir and not config.resume:
        from ppojax.checkpoint import remove_checkpoints

        if parallel.is_primary():
            remove_checkpoints(directory)
        parallel.sync_processes("ppojax: old checkpoints removed")
        return False
    if config.resume is False:
        raise ConfigError(
            f"{config.output_dir} already has checkpoints and resume is false; leave resume unset (or true) to "
            "continue that run, or set overwrite_output_dir: true to start over"
        )
    return True


def restore_matching(ckpt: Checkpointer, state, config: TrainConfig):
    """(state, metadata) of the latest checkpoint, refusing one written with other training settings. Says on
    stderr (process 0) which checkpoint the run resumes from."""
    from ppojax import parallel

    step = ckpt.latest_step()
    state, meta = ckpt.restore(state)
    if meta.get("config_hash") != config.hash():
        ckpt.close()
        raise ConfigError(
            f"{config.checkpoint_dir}: the checkpoint was written with different training settings "
            f"(config hash {meta.get('config_hash')} vs {config.hash()}); rerun with the same config to resume, "
            "or set overwrite_output_dir: true to start over"
        )
    if parallel.is_primary():
        unit = "iteration" if config.stage == "ppo" else "step"
        print(
            f"ppojax {config.stage}: resuming from the checkpoint of {unit} {step} in {ckpt.directory}", file=sys.stderr
        )
    return state, meta


def load_model(config: TrainConfig, head: str, layout=None):
    """(model, params) of `model_name_or_path` with `head`, each tensor read straight into its shards when a
    `parallel.Layout` is given. A reward head missing from a causal LM is created N(0, 1/(H+1)) (PPO_DETAILS
    item 19)."""
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    shardings = None if layout is None else (lambda model: layout.params(model.param_shapes()))
    # LLaMA-Factory's adapter_name_or_path: all but a resumed adapter are merged into the weights as they are read.
    load = functools.partial(
        load_with_adapters, config.model_name_or_path, config.adapters_to_merge, dtype=dtype, shardings=shardings
    )
    try:
        return load(head=head)
    except CheckpointError as e:
        if head != "reward" or "score.weight" not in str(e):
            raise
    model, params = load(head="value")
    params = dict(params)
    del params["value_head"]
    hidden = model.config.hidden_size
    std = 1.0 / np.sqrt(hidden + 1.0)
    kernel = jax.random.normal(jax.random.PRNGKey(config.seed), (hidden, 1), jnp.float32) * std
    params["score"] = {"kernel": kernel.astype(dtype)}
    return DecoderModel(model.config, "reward", model.dtype), params


def fit_vocabulary(model: DecoderModel, params: dict, tokenizer) -> tuple[DecoderModel, dict]:
    """Grows the embedding when the tokenizer's (new) pad id has no row, and records the pad id in the config."""
    vocab = max(model.config.vocab_size, len(tokenizer))
    params = data_lib.resize_embeddings(params, vocab)
    config = dataclasses.replace(model.config, vocab_size=vocab, pad_token_id=tokenizer.pad_token_id)
    return dataclasses.replace(model, config=config), params


def _trainable(config: TrainConfig, model: DecoderModel, params: dict):
    """(trainable pytree, frozen base or None). LoRA on an rm also trains the score head (as LLaMA-Factory's
    value head is saved with the adapters)."""
    if config.finetuning_type == "full":
        return params, None
    if config.adapter_to_resume is not None:  # LLaMA-Factory trains the last adapter further
        lora = adapter_as_lora(config.adapter_to_resume, model)
        return ({"lora": lora, "score": params["score"]} if model.head == "reward" else lora), params
    lora = init_lora(
        model,
        jax.random.PRNGKey(config.seed + 1),
        rank=config.lora_rank,
        alpha=config.lora_scale_alpha,
        targets=config.lora_target,
    )
    if model.head == "reward":
        return {"lora": lora, "score": params["score"]}, params
    return lora, params


def _merged(trainable, base) -> tuple[dict, Any]:
    """(params, lora) to save or apply."""
    if base is None:
        return trainable, None
    if isinstance(trainable, Lora):
        return base, trainable
    return {**base, "score": trainable["score"]}, trainable["lora"]


def _rm_lora_step(state, batch, base_params, *, model, optimizer):
    from ppojax import train

    def loss_fn(trainable):
        params = {**base_params, "score": trainable["score"]}
        chosen, rejected = train.preference_scores(model, params, batch, trainable["lora"])
        aux = {"accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)), "margin": jnp.mean(chosen - rejected)}
        return train.reward_model_loss(chosen, rejected, batch.margin), aux

    return train.guarded_step(state, loss_fn, optimizer)


def _feed(layout, batch):
    """A batch pytree of host arrays as the step's input: device arrays, or with a layout the global batch of
    which this process feeds its rows."""
    if layout is None:
        return jax.tree.map(jnp.asarray, batch)
    from ppojax import parallel

    return parallel.feed_batch(layout, batch)


def export_supervised(config: TrainConfig, model: DecoderModel, trainable, base, tokenizer) -> None:
    """Saves the trained model (LoRA merged) as an HF directory in output_dir: merged on the devices, gathered
    to the host (from every process in a multi-host run) and written by process 0 only."""
    from ppojax import parallel
    from ppojax.models import merge_lora

    params, lora = _merged(trainable, base)
    if lora is not None:
        params = merge_lora(model, params, lora)
    params = parallel.to_host(params)
    if parallel.is_primary():
        save_pretrained(config.output_dir, model, params, tokenizer)


def run_supervised(config: TrainConfig, *, progress: bool = True) -> dict:
    """stage sft or rm, end to end."""
    from ppojax import parallel, train

    layout: Optional[parallel.Layout] = start_parallel(config)
    resuming = check_output_dir(config)
    tokenizer, _ = data_lib.ensure_pad_token(data_lib.load_tokenizer(config.model_name_or_path))
    loader = data_lib.load_sft if config.stage == "sft" else data_lib.load_preferences
    dataset = loader(
        config.dataset_source,
        tokenizer,
        template=config.template,
        cutoff_len=config.cutoff_len,
        max_samples=config.max_samples,
        default_system=config.default_system,
        enable_thinking=config.enable_thinking,
    )
    dropped_pairs = 0
    if config.stage == "rm" and config.rm_max_length_diff is not None:
        dataset, dropped_pairs = data_lib.drop_length_mismatched_pairs(dataset, config.rm_max_length_diff)
        if len(dataset) < config.optimizer_batch_size:
            raise ConfigError(
                f"{config.dataset}: rm_max_length_diff {config.rm_max_length_diff} dropped {dropped_pairs} pairs, "
                f"leaving {len(dataset)}, fewer than one optimizer batch; raise rm_max_length_diff"
            )
    batch_size = config.optimizer_batch_size
    if len(dataset) < batch_size:
        raise ConfigError(
            f"{config.dataset}: {len(dataset)} examples, fewer than one optimizer batch of {batch_size} "
            "(per_device_train_batch_size × gradient_accumulation_steps)"
        )
    steps_per_epoch = len(dataset) // batch_size
    total = config.max_steps if config.max_steps > 0 else max(1, int(config.num_train_epochs * steps_per_epoch))

    warmup = config.warmup_for(total)
    if config.lr_scheduler_type in ("linear", "cosine") and total <= warmup:
        raise ConfigError(
            f"warmup of {warmup} steps is not below the run's {total} optimizer steps; lower warmup_steps / "
            "warmup_ratio or use lr_scheduler_type: constant"
        )
    model, params = load_model(config, "lm" if config.stage == "sft" else "reward", layout)
    model, params = fit_vocabulary(model, params, tokenizer)
    if layout is not None:
        params = parallel.place(params, layout.params(params))  # again after a vocabulary resize
    optimizer = make_optimizer(
        OptimizerConfig(
            learning_rate=config.learning_rate,
            schedule=config.lr_scheduler_type,
            warmup_steps=warmup,
            total_steps=total,
            **config.optimizer_options(),
        )
    )
    trainable, base = _trainable(config, model, params)
    state = train.init_train_state(trainable, optimizer)
    if config.stage == "sft":
        step_fn = train.sft_step
    elif base is not None:
        step_fn = _rm_lora_step
    else:
        step_fn = train.reward_model_step
    step_fn = functools.partial(step_fn, model=model, optimizer=optimizer)
    if layout is None:
        step_fn = jax.jit(step_fn)
    else:
        state = parallel.place(state, layout.train_state(state, optimizer))
        step_fn = parallel.sharded_train_step(step_fn, optimizer, layout, name=f"{config.stage} step")
        if parallel.is_primary():
            rows = batch_size * (2 if config.stage == "rm" else 1)  # rm: chosen and rejected in one pass
            estimate = parallel.estimate_memory(
                layout.sizes,
                models={config.stage: (model, base is None)},  # LoRA: the base is frozen
                batch_size=rows,
                micro_batch_size=rows,
                prompt_length=config.cutoff_len,
                max_new_tokens=0,
                rollout_model=None,
            )
            print(estimate.format(), file=sys.stderr)

    position, start = data_lib.DataPosition(), 0
    ckpt = Checkpointer(config.checkpoint_dir, max_to_keep=config.max_to_keep)
    if resuming and ckpt.latest_step() is not None:
        state, meta = restore_matching(ckpt, state, config)
        position, start = data_lib.DataPosition(*meta["data_position"]), int(meta["step"])
    writer = MetricsWriter(
        config.output_dir,
        config.stage,
        total=total,
        resume_step=start if resuming else None,
        tensorboard=config.tensorboard,
        progress=progress,
        primary=parallel.is_primary(),
    )
    batches = data_lib.response_batches(
        dataset,
        batch_size,
        pad_token_id=tokenizer.pad_token_id,
        seed=config.seed,
        position=position,
        bucket=config.pad_multiple,
    )
    status = "completed"
    try:
        for step in range(start + 1, total + 1):
            batch = next(batches)
            arrays = (batch.prompt_ids, batch.prompt_mask, *(a for pair in batch.responses for a in pair))
            inputs = (train.SequenceBatch if config.stage == "sft" else train.PreferenceBatch)(*arrays)
            state, metrics = step_fn(state, _feed(layout, inputs), base)
            if step % config.logging_steps == 0 or step == total:
                writer.log(step, {**jax.device_get(metrics), "epoch": step / steps_per_epoch})
            if step % config.save_steps == 0 or step == total:
                ckpt.save(
                    step,
                    state,
                    {"step": step, "data_position": list(batch.position), "config_hash": config.hash(), "good": True},
                )
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        ckpt.close()
        summary = writer.close(
            status,
            config_hash=config.hash(),
            dataset_rows=len(dataset),
            truncated_rows=dataset.truncated,
            **({"dropped_pairs_length_diff": dropped_pairs} if config.rm_max_length_diff is not None else {}),
            pad_token_id=tokenizer.pad_token_id,
        )
    export_supervised(config, model, state.params, base, tokenizer)
    return summary
