"""Stage runners behind `ppojax train`: load the HF directory, train, checkpoint, report, save an HF directory.

sft and rm run here; ppo in `ppojax.runner_ppo`.

Batches: one optimizer step sees `per_device_train_batch_size × gradient_accumulation_steps` rows (sft rows or
rm pairs) in one pass; `ppojax.train.sft_step` / `reward_model_step` have no micro-batching, so the gradient is
the same as with accumulation but the memory is that of the whole optimizer batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ppojax import data as data_lib
from ppojax.checkpoint import Checkpointer
from ppojax.config import ConfigError, TrainConfig
from ppojax.models import CheckpointError, DecoderModel, init_lora, load_pretrained, save_pretrained
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


def check_output_dir(config: TrainConfig) -> bool:
    """True when this run continues from the checkpoints already in output_dir.

    LLaMA-Factory's rule: a rerun of the same command resumes from the latest checkpoint (`resume` unset or
    true); `overwrite_output_dir: true` deletes them and starts over; `resume: false` refuses to touch them.
    """
    directory = config.checkpoint_dir
    has_steps = os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
    if not has_steps:
        return False
    if config.overwrite_output_dir and not config.resume:
        from ppojax.checkpoint import remove_checkpoints

        remove_checkpoints(directory)
        return False
    if config.resume is False:
        raise ConfigError(
            f"{config.output_dir} already has checkpoints and resume is false; leave resume unset (or true) to "
            "continue that run, or set overwrite_output_dir: true to start over"
        )
    return True


def restore_matching(ckpt: Checkpointer, state, config: TrainConfig):
    """(state, metadata) of the latest checkpoint, refusing one written with other training settings."""
    state, meta = ckpt.restore(state)
    if meta.get("config_hash") != config.hash():
        ckpt.close()
        raise ConfigError(
            f"{config.checkpoint_dir}: the checkpoint was written with different training settings "
            f"(config hash {meta.get('config_hash')} vs {config.hash()}); rerun with the same config to resume, "
            "or set overwrite_output_dir: true to start over"
        )
    return state, meta


def load_model(config: TrainConfig, head: str):
    """(model, params) of `model_name_or_path` with `head`. A reward head missing from a causal LM is created
    N(0, 1/(H+1)) (PPO_DETAILS item 19)."""
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    try:
        return load_pretrained(config.model_name_or_path, head=head, dtype=dtype)
    except CheckpointError as e:
        if head != "reward" or "score.weight" not in str(e):
            raise
    model, params = load_pretrained(config.model_name_or_path, head="value", dtype=dtype)
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


def run_supervised(config: TrainConfig, *, progress: bool = True) -> dict:
    """stage sft or rm, end to end."""
    from ppojax import train

    resuming = check_output_dir(config)
    tokenizer, _ = data_lib.ensure_pad_token(data_lib.load_tokenizer(config.model_name_or_path))
    loader = data_lib.load_sft if config.stage == "sft" else data_lib.load_preferences
    dataset = loader(config.dataset, tokenizer, template=config.template, cutoff_len=config.cutoff_len)
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

    model, params = load_model(config, "lm" if config.stage == "sft" else "reward")
    model, params = fit_vocabulary(model, params, tokenizer)
    optimizer = make_optimizer(
        OptimizerConfig(
            learning_rate=config.learning_rate,
            schedule=config.lr_scheduler_type,
            warmup_steps=config.warmup_steps,
            total_steps=total,
            max_grad_norm=config.max_grad_norm or None,
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
    step_fn = jax.jit(functools.partial(step_fn, model=model, optimizer=optimizer))

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
            prompt = (jnp.asarray(batch.prompt_ids), jnp.asarray(batch.prompt_mask))
            responses = [jnp.asarray(a) for pair in batch.responses for a in pair]
            if config.stage == "sft":
                inputs = train.SequenceBatch(*prompt, *responses)
            else:
                inputs = train.PreferenceBatch(*prompt, *responses)
            state, metrics = step_fn(state, inputs, base)
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
    final_params, lora = _merged(state.params, base)
    save_pretrained(config.output_dir, model, final_params, tokenizer, lora=lora)
    return summary
