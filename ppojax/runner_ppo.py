"""stage: ppo behind `ppojax train`: load the policy, reference, reward model and critic, run PPO iterations with
reports, checkpoints, resume and rollback, and export the policy and the value model as HF directories.

Models
- policy: `model_name_or_path` (head "lm"; bf16: bf16 weights and compute, float32 master copies of what is
  trained). With `finetuning_type: lora` the trained pytree is the adapters (`lora_rank`, `lora_alpha`,
  `lora_target`) and the reference is the same base with the adapters off; with `full` the reference is
  `ref_model` or the initial policy weights.
- reward: `reward_model`, the HF directory a `stage: rm` run writes (LoRA merged, score head included), or a
  LLaMA-Factory `stage: rm` output_dir (`value_head.safetensors` beside a causal LM, or beside a LoRA adapter,
  which is merged into `model_name_or_path` as LLaMA-Factory applies it to the policy's base;
  `ppojax.models.valuehead`). Its vocabulary must be the policy tokenizer's (the pad token ppojax adds included).
- critic (`critic_mode`): separate / joint: a value model initialised from the reward model (its score head
  becomes the value head, PPO_DETAILS 19); shared: a zero value head on the policy trunk.

Config → `ppojax.train.PPOConfig`: rollout batch (prompts per iteration) = `config.rollout_batch_size`, minibatch =
optimizer batch, micro batch = per_device_train_batch_size; convention = `config.convention` (preset + explicit
keys); `target_kl` → early stop of an iteration's updates at approx-KL > 1.5 · target_kl (TRL 0.x);
iterations = max_steps, or num_train_epochs × (prompts // rollout batch); the learning-rate schedule runs over
iterations × ppo_epochs × minibatches optimizer steps.

Score normalisation (`ppo_score_norm`): before training, responses of the initial policy to the first prompts
(≥ 64 rows) are scored and the reward model's score becomes gain · s + bias with mean 0, std 1 over them
(PPO_DETAILS 12). A fixed affine map rather than running moments: it is static (no state beyond `PPOState`) and a
resumed run reads the same gain and bias from the checkpoint metadata, so resume stays bit-identical.

Run guard: an iteration whose mean KL to the reference (`objective/kl`, nats per sequence) exceeds
`early_stop_kl`, or whose loss or KL is not finite, is rejected: `on_kl_exceeded` stop keeps its weights and
stops; rollback restores the last good checkpoint and stops; rollback_continue restores it, multiplies the
learning rates by `rollback_lr_scale` and β by `rollback_kl_coef_scale`, folds the rollback count into the PRNG key
(so the retry is not a bit-identical replay) and goes on, at most `max_rollbacks` times. Each event is a row of
`ppo_metrics/events.jsonl` and a printed line. A checkpoint of the initial state (step 0) makes a rollback possible
before the first `save_steps`.

Devices and hosts: with `mesh` (and `distributed`) the models are read straight into their shards and every
iteration is one sharded program, each process feeding its rows of the prompt batch. Host-side reads of
batch-sharded or FSDP-sharded arrays (score normalisation, the repetition rate, samples, the exported models) go
through `parallel.to_host`, which gathers them from every process; every process saves its shards of a checkpoint
(orbax), and only process 0 writes the reports and the HF directories.

Resume: checkpoints hold `PPOState` (policy / adapters, critic, both optimizer states, the KL controller, the PRNG
key) and, as metadata, the data position and the run controls (rollbacks, lr scale, reward gain and bias). A rerun
of the same command continues from the latest one; on CPU the result is bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ppojax import data as data_lib
from ppojax import parallel, train
from ppojax.checkpoint import Checkpointer, CheckpointRestoreError, rollback
from ppojax.config import ConfigError, TrainConfig, stage_at, stage_config, stage_starts
from ppojax.diagnostics import hacking_flags, repetition_rate_host
from ppojax.health import check_health
from ppojax.generation import bucket_length
from ppojax.models import (
    CheckpointError,
    DecoderModel,
    init_lora,
    load_reward_model,
    merge_lora,
    save_pretrained,
)
from ppojax.models.config import as_id_tuple
from ppojax.models.lora import Lora
from ppojax.models.peft_adapters import adapter_as_lora, load_with_adapters
from ppojax.optim import OptimizerConfig
from ppojax.reports import MetricsWriter
from ppojax.runner import check_output_dir, fit_vocabulary, restore_matching, start_parallel

SCORE_NORM_MIN_RESPONSES = 64  # responses of the initial policy used to fit the score normalisation
PROMPT_BUCKET = 64  # prompt widths are multiples of this (or max_prompt_length when smaller): few compilations
VALUE_MODEL_DIR = "value_model"  # under output_dir


@dataclasses.dataclass(frozen=True)
class RunControl:
    """What the checkpoints carry beside the state (JSON metadata) and a rollback changes."""

    rollbacks: int = 0
    lr_scale: float = 1.0
    reward_gain: float = 1.0
    reward_bias: float = 0.0


class PPOInputs(NamedTuple):
    """Everything loaded from disk for a PPO run."""

    tokenizer: Any
    dataset: data_lib.PromptDataset
    policy_model: DecoderModel
    policy_params: dict  # the initial policy; with LoRA, the frozen base
    ref_params: Any  # the reference policy (with LoRA: the same base, or a `train.LoraReference`)
    reward_model: DecoderModel
    reward_params: dict


# ----------------------------------------------------------------------------------------------------------
# Loading and the static config


def stop_token_ids(tokenizer, model: DecoderModel, model_dir: Optional[str] = None) -> tuple[int, ...]:
    """The model config's EOS ids, the tokenizer's EOS id and, when `model_dir` has a generation_config.json, its
    eos_token_id (an id or a list): transformers' `generate` stops at those too, and some chat models list their
    end-of-turn token only there (Llama 3 Instruct's first release: <|eot_id|>)."""
    ids = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = None if model_dir is None else os.path.join(model_dir, "generation_config.json")
    if path is not None and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("eos_token_id")
            ids.update(as_id_tuple(value))
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ConfigError(
                f"{path}: eos_token_id must be an id or a list of ids ({type(e).__name__}: {e})"
            ) from None
    return tuple(sorted(ids))


def prompt_bucket(config: TrainConfig) -> int:
    return min(PROMPT_BUCKET, config.max_prompt_length)


def _load(
    path: str, head: str, dtype, key: str, layout=None, base: Optional[str] = None, adapters: tuple = ()
) -> tuple[DecoderModel, dict]:
    """`load_pretrained` (with PEFT `adapters` merged); a LLaMA-Factory reward model (`value_head.safetensors`)
    through `load_reward_model`, a LoRA one applied to `base` with `adapters` merged (as LLaMA-Factory applies the
    reward adapter to the policy's model)."""
    shardings = None if layout is None else (lambda model: layout.params(model.param_shapes()))
    try:
        if head != "lm":
            return load_reward_model(
                path, head=head, base=base, base_adapters=adapters, dtype=dtype, shardings=shardings
            )
        return load_with_adapters(path, adapters, head=head, dtype=dtype, shardings=shardings)
    except CheckpointError as e:
        if head == "reward" and "score.weight" in str(e):
            raise ConfigError(
                f"'{key}' {path} has no reward head (score.weight); point it at the output_dir of a stage: rm run"
            ) from None
        raise


def _check_reward_vocabulary(config: TrainConfig, reward_model: DecoderModel, tokenizer) -> None:
    """The reward model must read the policy's token ids: same tokenizer (pad included), enough embedding rows."""
    if reward_model.config.vocab_size < len(tokenizer):
        raise ConfigError(
            f"reward_model {config.reward_model} has {reward_model.config.vocab_size} embedding rows but the policy "
            f"tokenizer has {len(tokenizer)} tokens; train the reward model from the same base model (stage: rm)"
        )
    if os.path.isfile(os.path.join(config.reward_model, "tokenizer_config.json")):
        reward_tokenizer, _ = data_lib.ensure_pad_token(data_lib.load_tokenizer(config.reward_model))
        if reward_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(
                f"reward_model {config.reward_model}: its tokenizer differs from the policy's "
                f"({config.model_name_or_path}); the reward model must share the policy's vocabulary"
            )


def load_inputs(config: TrainConfig, layout=None) -> PPOInputs:
    """Tokenizer (with a dedicated pad token), prompts, policy, reference and reward model (each tensor read
    straight into its shards when a `parallel.Layout` is given)."""
    tokenizer, pad_added = data_lib.ensure_pad_token(data_lib.load_tokenizer(config.model_name_or_path))
    dataset = data_lib.load_prompts(
        config.dataset_source,
        tokenizer,
        template=config.template,
        max_prompt_length=config.max_prompt_length,
        overflow=config.prompt_overflow,
        max_samples=config.max_samples,
        default_system=config.default_system,
        enable_thinking=config.enable_thinking,
    )
    dtype = jnp.bfloat16 if config.bf16 else jnp.float32
    policy_model, policy_params = fit_vocabulary(
        *_load(config.model_name_or_path, "lm", dtype, "model_name_or_path", layout, adapters=config.adapters_to_merge),
        tokenizer,
    )
    positions = bucket_length(config.max_prompt_length, prompt_bucket(config)) + config.max_new_tokens
    if positions > policy_model.config.max_position_embeddings:
        raise ConfigError(
            f"max_prompt_length {config.max_prompt_length} + max_new_tokens {config.max_new_tokens} needs {positions} "
            f"positions but {config.model_name_or_path} has max_position_embeddings "
            f"{policy_model.config.max_position_embeddings}; lower max_new_tokens or max_prompt_length"
        )
    ref_params = policy_params
    if config.ref_model is not None:
        ref_model, ref_params = fit_vocabulary(
            *_load(config.ref_model, "lm", dtype, "ref_model", layout, adapters=config.ref_model_adapters or ()),
            tokenizer,
        )
        if ref_model.config != policy_model.config:
            raise ConfigError(
                f"ref_model {config.ref_model} is not the same architecture as {config.model_name_or_path}; "
                "the reference must share the policy's config"
            )
        if config.finetuning_type == "lora":  # the adapters sit on the policy's base; the reference is its own
            ref_params = train.LoraReference(base=policy_params, reference=ref_params)
    if config.shared_value_head_bias:  # the value head on the shared trunk has a bias
        policy_model = dataclasses.replace(
            policy_model, config=dataclasses.replace(policy_model.config, head_bias=True)
        )
    if config.reward_model_adapters:
        # LLaMA-Factory's full reward model with adapters: the adapters merged into it, the last one a LoRA reward
        # model whose value head is the head (LLaMA-Factory reads the value head from the last adapter).
        *merged, last = config.reward_model_adapters
        reward_path, base, base_adapters = last, config.reward_model, tuple(merged)
    else:  # a LoRA reward model goes on the policy's base with its merged adapters, as LLaMA-Factory applies it
        reward_path, base, base_adapters = config.reward_model, config.model_name_or_path, config.adapters_to_merge
    reward_model, reward_params = _load(
        reward_path, "reward", dtype, "reward_model", layout, base=base, adapters=base_adapters
    )
    if pad_added and reward_model.config.vocab_size == tokenizer.pad_token_id == len(tokenizer) - 1:
        # Only the pad token ppojax added is missing (a reward model trained with pad = EOS, as LLaMA-Factory and
        # TRL train one for tokenizers without a pad): give it the row the policy gets. Pads are masked and never
        # the scored position, so the row does not change any reward.
        reward_model, reward_params = fit_vocabulary(reward_model, reward_params, tokenizer)
    _check_reward_vocabulary(config, reward_model, tokenizer)
    return PPOInputs(tokenizer, dataset, policy_model, policy_params, ref_params, reward_model, reward_params)


def total_iterations(config: TrainConfig, num_prompts: int) -> int:
    if config.stages:
        return sum(stage.iterations for stage in config.stages)
    if config.max_steps > 0:
        return config.max_steps
    return max(1, int(config.num_train_epochs * (num_prompts // config.rollout_batch_size)))


def total_optimizer_steps(config: TrainConfig, iterations: int) -> int:
    """Optimizer steps of the whole run (the learning-rate schedule's length): iterations × ppo_epochs ×
    minibatches, summed over the stages when there are stages (their ppo_epochs may differ)."""
    minibatches = config.rollout_batch_size // config.optimizer_batch_size
    if not config.stages:
        return iterations * config.ppo_epochs * minibatches
    return sum(
        stage.iterations * stage_config(config, i).ppo_epochs * minibatches for i, stage in enumerate(config.stages)
    )


def make_ppo_config(
    config: TrainConfig,
    *,
    iterations: int,
    pad_token_id: int,
    stop_ids: tuple,
    control: RunControl,
    total_steps: Optional[int] = None,
) -> train.PPOConfig:
    """The static `PPOConfig` of a run, or of one stage when `config` is a `stage_config` and `total_steps` the
    whole run's (see the module docstring for the mapping)."""
    rollout, minibatch = config.rollout_batch_size, config.optimizer_batch_size
    if total_steps is None:
        total_steps = iterations * config.ppo_epochs * (rollout // minibatch)
    warmup = config.warmup_for(total_steps)
    if config.lr_scheduler_type in ("linear", "cosine") and total_steps <= warmup:
        raise ConfigError(
            f"warmup of {warmup} steps is not below the run's {total_steps} optimizer steps (iterations × "
            "ppo_epochs × minibatches); lower warmup_steps / warmup_ratio or use lr_scheduler_type: constant"
        )

    def optimizer(learning_rate: float) -> OptimizerConfig:
        return OptimizerConfig(
            learning_rate=learning_rate * control.lr_scale,
            schedule=config.lr_scheduler_type,
            warmup_steps=warmup,
            total_steps=total_steps,
            **config.optimizer_options(),
        )

    return train.PPOConfig(
        convention=config.convention,
        batch_size=rollout,
        minibatch_size=minibatch,
        micro_batch_size=config.micro_batch_size,
        ppo_epochs=config.ppo_epochs,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        stop_token_ids=stop_ids,
        pad_token_id=pad_token_id,
        critic_mode=config.critic_mode,
        old_logprobs=config.old_logprobs,
        policy_optimizer=optimizer(config.learning_rate),
        critic_optimizer=optimizer(config.critic_learning_rate or config.learning_rate),
        entropy_coef=config.entropy_coef,
        early_stop_kl=None if config.target_kl is None else 1.5 * config.target_kl,
        master_dtype="float32" if config.bf16 else None,
        reward_gain=control.reward_gain,
        reward_bias=control.reward_bias,
    )


# ----------------------------------------------------------------------------------------------------------
# Score normalisation, the run guard


def fit_score_normalisation(
    config: TrainConfig, ppo_config: train.PPOConfig, models, state, inputs: PPOInputs, layout=None
) -> tuple[float, float]:
    """(gain, bias) making gain · score + bias mean 0, population std 1 over ≥ 64 responses of the initial policy
    (sampled with a key of their own, so the training stream is the same with and without normalisation).
    With a `parallel.Layout` the sampling runs sharded and every process gets every score."""
    raw = ppo_config.replace(reward_gain=1.0, reward_bias=0.0)
    if layout is None:
        collect = jax.jit(lambda s, p, ref, rew: train.collect(s, p, ref, rew, config=raw, models=models))
    else:
        collect_sharded, _ = parallel.sharded_ppo_phases(raw, models, layout, donate=False)
        collect = lambda s, p, ref, rew: collect_sharded(s, parallel.feed_batch(layout, p), ref, rew)  # noqa: E731
    batches = data_lib.prompt_batches(
        inputs.dataset,
        ppo_config.batch_size,
        pad_token_id=inputs.tokenizer.pad_token_id,
        seed=config.seed,
        bucket=prompt_bucket(config),
    )
    state = state.replace(key=jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5C0))
    scores = []
    for _ in range(math.ceil(SCORE_NORM_MIN_RESPONSES / ppo_config.batch_size)):
        batch = next(batches)
        state, experience = collect(state, (batch.ids, batch.mask), inputs.ref_params, inputs.reward_params)
        scores.append(np.asarray(parallel.to_host(experience.scores), np.float64))
    scores = np.concatenate(scores)
    std = scores.std()
    gain = 1.0 / std if std > 0 else 1.0
    return float(gain), float(-scores.mean() * gain)


def rejection(metrics: dict, config: TrainConfig) -> Optional[str]:
    """Why an iteration's result must not be kept, or None."""
    kl, loss = metrics["objective/kl"], metrics["loss/total"]
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(kl):
        return "non-finite KL"
    if config.early_stop_kl is not None and kl > config.early_stop_kl:
        return f"KL {kl:.4g} > early_stop_kl {config.early_stop_kl:g}"
    return None


# ----------------------------------------------------------------------------------------------------------
# Export


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def export_models(config: TrainConfig, inputs: PPOInputs, models, state) -> None:
    """Saves the policy (LoRA merged) to output_dir and the value model to output_dir/value_model, both in the
    model's dtype with the tokenizer."""
    dtype = inputs.policy_model.dtype
    if isinstance(state.policy, Lora):
        policy_params = merge_lora(inputs.policy_model, inputs.policy_params, _cast(state.policy, jnp.float32))
    else:
        policy_params = state.policy
    policy_params = _cast(policy_params, dtype)
    policy_params = parallel.to_host(policy_params)  # gathered from every process in a multi-host run
    if parallel.is_primary():
        save_pretrained(config.output_dir, inputs.policy_model, policy_params, inputs.tokenizer)
    value_dir = os.path.join(config.output_dir, VALUE_MODEL_DIR)
    if models.critic is None:  # shared trunk: the policy's trunk with the trained value head
        critic_model = DecoderModel(inputs.policy_model.config, head="value", dtype=dtype)
        critic_params = {name: sub for name, sub in policy_params.items() if name != "lm_head"}
        critic_params["value_head"] = parallel.to_host(_cast(state.critic, dtype))
    else:
        critic_model, critic_params = models.critic, parallel.to_host(_cast(state.critic, dtype))
    if parallel.is_primary():
        save_pretrained(value_dir, critic_model, critic_params, inputs.tokenizer)


# ----------------------------------------------------------------------------------------------------------
# The run


def _scale_kl_coef(kl_state, factor: float):
    """The KL-controller state with β multiplied by `factor` (a NamedTuple or a flax struct with `coef`)."""
    coef = kl_state.coef * jnp.asarray(factor, kl_state.coef.dtype)
    return kl_state._replace(coef=coef) if hasattr(kl_state, "_replace") else kl_state.replace(coef=coef)


def _enter_stage(config: TrainConfig, index: int, state, control: RunControl, writer, iteration: int):
    """At a stage's first iteration: β set to the stage's kl_coef when it has one (times the rollback β scale
    for each rollback so far, so a rollback's tightening is kept), and an event for the curves and the log.
    A function of (config, stage, control) only, so a resumed run enters a stage exactly as an uninterrupted one."""
    stage = config.stages[index]
    overrides = dict(stage.overrides)
    if "kl_coef" in overrides:
        coef = overrides["kl_coef"] * config.rollback_kl_coef_scale**control.rollbacks
        kl = state.kl
        coef = jnp.asarray(coef, kl.coef.dtype)
        state = state.replace(kl=kl._replace(coef=coef) if hasattr(kl, "_replace") else kl.replace(coef=coef))
    writer.event(
        iteration, "stage", name=stage.name, first_iteration=iteration + 1, iterations=stage.iterations, **overrides
    )
    return state


class HealthWatch:
    """The metric health report kept current: the progress line, shading on the curves, a printed line when a
    critical or warning violation begins (ppojax.health; the full report goes to summary.json at the end)."""

    def __init__(self, writer: MetricsWriter):
        self.writer = writer
        self.announced: set = set()

    def update(self, iteration: int, metrics: dict) -> None:
        report = check_health(self.writer.rows + [{"step": iteration, **metrics}])
        self.writer.note = report.line()
        self.writer.spans = report.spans()
        for v in report.ongoing:
            if v.severity != "info" and (v.check, v.began) not in self.announced:
                self.announced.add((v.check, v.began))
                self.writer.say(f"ppojax ppo step {iteration}: health {v.severity}: {v.message}")


def _metadata(config: TrainConfig, iteration: int, position, control: RunControl, good: bool = True) -> dict:
    return {
        "iteration": int(iteration),
        "step": int(iteration),
        "data_position": [int(x) for x in position],
        "config_hash": config.hash(),
        "good": good,
        "control": dataclasses.asdict(control),
    }


def refuse_rejected_checkpoint(ckpt: Checkpointer, config: TrainConfig) -> None:
    """A run stopped by `on_kl_exceeded: stop` saved the rejected update as its last checkpoint (marked
    `"good": false`; the weights it exported); rerunning the command must not train on from it unnoticed."""
    step = ckpt.latest_step()
    if ckpt.metadata(step).get("good", True) is False:
        ckpt.close()
        raise ConfigError(
            f"{config.checkpoint_dir}: the run stopped at iteration {step} on the KL limit (on_kl_exceeded: stop) and "
            "its last checkpoint holds that rejected update, so it is not resumed (its weights are the ones exported "
            "in output_dir); set overwrite_output_dir: true to start over"
        )


def shard_inputs(inputs: PPOInputs, layout: parallel.Layout) -> PPOInputs:
    """The loaded params placed by the sharding rules (policy, reference, reward)."""
    place = lambda params: parallel.place(params, layout.params(params))  # noqa: E731
    policy = place(inputs.policy_params)
    ref = inputs.ref_params
    if isinstance(ref, train.LoraReference):  # the base is the policy's params, placed once
        ref = train.LoraReference(base=policy, reference=place(ref.reference))
    else:
        ref = policy if ref is inputs.policy_params else place(ref)
    return inputs._replace(policy_params=policy, ref_params=ref, reward_params=place(inputs.reward_params))


def make_iterate(ppo_config: train.PPOConfig, models, layout: Optional[parallel.Layout]):
    """iteration(state, (ids, mask), ref_params, reward_params): one jitted program, sharded over `layout` if
    given (the state is not donated: the run loop keeps it for stop / rollback). Each process feeds its rows."""
    if layout is None:
        return train.make_ppo_iteration(ppo_config, models)
    sharded = parallel.sharded_ppo_iteration(ppo_config, models, layout, donate=False)

    def iterate(state, prompts, ref_params, reward_params):
        return sharded(state, parallel.feed_batch(layout, prompts), ref_params, reward_params)

    return iterate


HOST_FIELDS = ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "scores")  # what the reports read


def run_ppo(config: TrainConfig, *, progress: bool = True) -> dict:
    """stage ppo, end to end. Returns the summary dict (also in ppo_metrics/summary.json)."""
    layout = start_parallel(config)  # first: jax.distributed must start before any other JAX work
    resuming = check_output_dir(config)
    inputs = load_inputs(config, layout)
    if layout is not None:
        inputs = shard_inputs(inputs, layout)  # again after a vocabulary resize
    batch_size = config.rollout_batch_size
    if len(inputs.dataset) < batch_size:
        raise ConfigError(
            f"{config.dataset}: {len(inputs.dataset)} prompts, fewer than one rollout batch of {batch_size} "
            "(per_device_train_batch_size × gradient_accumulation_steps × ppo_buffer_size, or batch_size)"
        )
    iterations_per_epoch = len(inputs.dataset) // batch_size
    total = total_iterations(config, len(inputs.dataset))
    pad_id = inputs.tokenizer.pad_token_id
    stops = stop_token_ids(inputs.tokenizer, inputs.policy_model, config.model_name_or_path)

    run_steps = total_optimizer_steps(config, total)

    def ppo_config_for(control: RunControl, stage: int = 0) -> train.PPOConfig:
        return make_ppo_config(
            stage_config(config, stage),
            iterations=total,
            pad_token_id=pad_id,
            stop_ids=stops,
            control=control,
            total_steps=run_steps,
        )

    control = RunControl()
    lora = None
    if config.adapter_to_resume is not None:  # LLaMA-Factory: the last adapter is trained further
        lora = adapter_as_lora(config.adapter_to_resume, inputs.policy_model)
    elif config.finetuning_type == "lora":
        lora = init_lora(
            inputs.policy_model,
            jax.random.PRNGKey(config.seed + 1),
            rank=config.lora_rank,
            alpha=config.lora_scale_alpha,
            targets=config.lora_target,
        )
    state, models = train.init_ppo_state(
        ppo_config_for(control),
        inputs.policy_model,
        inputs.policy_params,
        jax.random.PRNGKey(config.seed),
        reward_model=inputs.reward_model,
        reward_params=inputs.reward_params,
        critic_init="reward",
        lora=lora,
    )
    if layout is not None:
        state = parallel.place(state, layout.ppo_state(state, ppo_config_for(control)))
        prompt_length = bucket_length(config.max_prompt_length, prompt_bucket(config))
        estimate = parallel.estimate_ppo_memory(
            ppo_config_for(control), models, layout.sizes, prompt_length=prompt_length, lora=lora is not None
        )
        if parallel.is_primary():
            print(estimate.format(), file=sys.stderr)
    ckpt = Checkpointer(config.checkpoint_dir, max_to_keep=config.max_to_keep)
    position, start = data_lib.DataPosition(), 0
    resumed = resuming and ckpt.latest_step() is not None
    if resumed:
        refuse_rejected_checkpoint(ckpt, config)
        state, meta = restore_matching(ckpt, state, config)
        position, start = data_lib.DataPosition(*meta["data_position"]), int(meta["iteration"])
        control = RunControl(**meta["control"])
    elif config.ppo_score_norm:
        gain, bias = fit_score_normalisation(config, ppo_config_for(control), models, state, inputs, layout)
        control = dataclasses.replace(control, reward_gain=gain, reward_bias=bias)
    writer = MetricsWriter(
        config.output_dir,
        "ppo",
        total=total,
        resume_step=start if resumed else None,
        tensorboard=config.tensorboard,
        progress=progress,
        primary=parallel.is_primary(),
    )
    if not resumed:
        ckpt.save(0, state, _metadata(config, 0, position, control))  # a rollback target before save_steps

    ref_params, reward_params = inputs.ref_params, inputs.reward_params
    starts = stage_starts(config)
    writer.marks = [(start - 0.5, stage.name) for start, stage in zip(starts, config.stages or ())]
    stage, iterate = None, None  # the stage `iterate` was built for; (re)built at the top of the loop
    health = HealthWatch(writer)

    def batches_from(position):
        return data_lib.prompt_batches(
            inputs.dataset,
            batch_size,
            pad_token_id=pad_id,
            seed=config.seed,
            position=position,
            bucket=prompt_bucket(config),
        )

    batches = batches_from(position)
    iteration, status = start, "completed"
    try:
        while iteration < total:
            wanted = stage_at(config, iteration + 1)
            if wanted != stage:
                stage, iterate = wanted, make_iterate(ppo_config_for(control, wanted), models, layout)
            if config.stages and iteration + 1 == starts[stage]:
                state = _enter_stage(config, stage, state, control, writer, iteration)
            batch = next(batches)
            began = time.time()
            new_state, metrics, experience = iterate(state, (batch.ids, batch.mask), ref_params, reward_params)
            metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
            metrics["time/iteration_s"] = time.time() - began
            metrics["epoch"] = (iteration + 1) / iterations_per_epoch
            # The rows the reports read, whole on every process (gathered when the batch spans processes).
            shown = experience.replace(**parallel.to_host({name: getattr(experience, name) for name in HOST_FIELDS}))
            metrics["hacking/repetition"] = repetition_rate_host(shown.response_ids, shown.response_mask)
            reason = rejection(metrics, config)
            if reason is not None:
                writer.event(
                    iteration + 1,
                    "iteration_rejected",
                    reason=reason,
                    kl=metrics["objective/kl"],
                    loss=metrics["loss/total"],
                )
                mode = config.on_kl_exceeded
                if mode == "stop":
                    state, iteration = new_state, iteration + 1
                    writer.log(iteration, metrics)
                    ckpt.save(iteration, state, _metadata(config, iteration, batch.position, control, good=False))
                    status = f"stopped at iteration {iteration}: {reason}"
                    writer.event(iteration, "stopped", reason=reason, weights="current")
                    break
                ckpt.wait()
                try:
                    step, state, meta = rollback(ckpt, state)
                except CheckpointRestoreError as e:
                    status = f"stopped at iteration {iteration + 1}: {reason}; {e}"
                    writer.event(iteration + 1, "stopped", reason=str(e), weights="last accepted iteration")
                    break
                if mode == "rollback" or control.rollbacks >= config.max_rollbacks:
                    iteration = step
                    status = f"rolled back to iteration {step} and stopped: {reason}"
                    writer.event(step, "rolled_back_and_stopped", reason=reason, rollbacks=control.rollbacks)
                    break
                control = dataclasses.replace(
                    control, rollbacks=control.rollbacks + 1, lr_scale=control.lr_scale * config.rollback_lr_scale
                )
                state = state.replace(
                    kl=_scale_kl_coef(state.kl, config.rollback_kl_coef_scale),
                    key=jax.random.fold_in(state.key, control.rollbacks),
                )
                iteration, position = step, data_lib.DataPosition(*meta["data_position"])
                ckpt.save(step, state, _metadata(config, step, position, control), overwrite=True)
                writer.truncate(step)
                writer.event(
                    step,
                    "rolled_back",
                    rollbacks=control.rollbacks,
                    lr_scale=control.lr_scale,
                    kl_coef=float(state.kl.coef),
                )
                stage = None  # rebuilt with the new learning-rate scale
                batches = batches_from(position)
                continue
            state, iteration = new_state, iteration + 1
            if iteration % config.logging_steps == 0 or iteration == total:
                health.update(iteration, metrics)
                writer.log(iteration, metrics)
            else:
                writer.advance(iteration)
            if config.samples_every and iteration % config.samples_every == 0:
                prompts, responses = train.decode_responses(shown, inputs.tokenizer.decode)
                n = config.num_samples
                writer.samples(iteration, prompts[:n], responses[:n], np.asarray(shown.scores)[:n])
            if iteration % config.save_steps == 0 or iteration == total:
                ckpt.save(iteration, state, _metadata(config, iteration, batch.position, control))
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        ckpt.close()
        summary = writer.close(
            status,
            iteration=iteration,
            total_iterations=total,
            config_hash=config.hash(),
            dataset_rows=len(inputs.dataset),
            truncated_rows=inputs.dataset.truncated,
            pad_token_id=pad_id,
            stop_token_ids=list(stops),
            run_control=dataclasses.asdict(control),
            health=check_health(writer.rows).to_json(),
            reward_hacking=[
                {"name": f.name, "raised": bool(f.raised), "reason": f.reason} for f in hacking_flags(writer.rows)
            ],
            stages=[
                {
                    "name": st.name,
                    "first_iteration": first,
                    "iterations": st.iterations,
                    "overrides": dict(st.overrides),
                }
                for st, first in zip(config.stages or (), starts)
            ],
            events=writer.read_events(),
            policy_dir=config.output_dir,
            value_model_dir=os.path.join(config.output_dir, VALUE_MODEL_DIR),
        )
    export_models(config, inputs, models, state)
    return summary
