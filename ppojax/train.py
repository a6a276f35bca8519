"""Training: the PPO train state, `update_step`, the PPO iteration (one jitted program or two phases), and
the SFT and reward-model steps.

Shapes: B rollout rows per iteration, P prompt columns (left-padded), N = max_new_tokens (right-padded).

One PPO iteration:

    collect:         rollout → teacher-forced old log-probs (policy), ref log-probs, values, scores
    train_on_batch:  shaped rewards → GAE → whitening (`assemble_advantages`)
                     → `ppo_epochs` × (fresh permutation → minibatches → `update_step`)   [lax.scan × lax.scan]
                     → KL-controller update
    update_step:     micro-batches by gradient accumulation (lax.scan); losses as (sum, count) with the
                     counts of the whole minibatch, so the summed gradient is the minibatch gradient
                     → non-finite guard → optax update

Static things (`PPOConfig`, `PPOModels`) are bound with `functools.partial` (keywords `config=`,
`models=`) before `jax.jit`; `make_ppo_iteration` and `make_ppo_phases` do it. Frozen params (reference,
reward) are arguments. With LoRA, `state.policy` is the `Lora` adapters and `ref_params` is the base the
adapters sit on: the reference is that base with `lora=None`, so there is no second copy. A LoRA run with a
reference model of its own (LLaMA-Factory's `ref_model` with LoRA) passes `LoraReference(base, reference)`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from ppojax import sampling
from ppojax.generation import (
    _keep_mask,
    _response_outputs,
    behaviour_as_old_logprobs,
    response_logprobs,
    repetition_penalty_or_none,
    response_values,
    rollout,
    sequence_reward,
)
from ppojax.kl import KLController, KLControllerState, make_kl_controller, sequence_kl
from ppojax.losses import aggregate_loss, value_loss
from ppojax.models.decoder import DecoderModel, init_value_head, values_from_hidden
from ppojax.models.lora import Lora
from ppojax.optim import OptimizerConfig, make_optimizer, make_schedule
from ppojax.presets import PRESETS, Advantages, Convention, assemble_advantages, masks_for, ppo_losses
from ppojax.stats import as_f32, masked_count, masked_max, masked_mean, masked_var, safe_divide, whiten

CRITIC_MODES = ("separate", "joint", "shared")
CRITIC_INITS = ("reward", "policy")
OLD_LOGPROBS = ("score", "rollout")


# ----------------------------------------------------------------------------------------------------------
# Static configuration


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """Everything static about a PPO run. Frozen and hashable.

    batch_size: prompts (= rollout rows) per iteration. minibatch_size: rows per optimizer step.
    micro_batch_size: rows per forward/backward pass (gradient accumulation); None = the minibatch.
    critic_mode:
      "separate": a critic model with its own optimizer (`critic_optimizer`), value loss weight 1;
      "joint":    a critic model, one optimizer (`policy_optimizer`) on pg + vf_coef · vf over both;
      "shared":   a value head on the policy trunk, one optimizer on pg + vf_coef · vf.
    temperature, top_k, top_p, repetition_penalty: the rollout's sampling (`ppojax.generation.rollout`); the
      top-k / top-p / repetition-penalty filters change what is sampled, not the log-probs (1: no penalty).
    early_stop_kl: skip the remaining updates of the iteration once a minibatch's approx-KL exceeds it.
    master_dtype: dtype the trainable params are kept in (e.g. "float32" for fp32 master weights of a
      bf16 model; the model casts them to its compute dtype). None keeps the params' dtype.
    reward_gain, reward_bias: the reward model's score is gain · s + bias (see `fit_reward_normalisation`).
    exact_old_logprobs: recompute the old log-probs and values at the start of `train_on_batch` with the
      training program's own micro-batch gradient pass (one more forward + backward over the batch per
      iteration), so the first minibatch's ratio is exactly 1 bit for bit; without it the old log-probs come
      from the forward-only collection pass and the first ratio is 1 within float32 rounding (XLA fuses a
      forward differently when a backward follows). Metrics `grad/old_pass_norm`, `policy/old_pass_gap_max`.
    old_logprobs: where the old log-probs come from. "score" (default): a teacher-forced policy pass after
      sampling (`policy_outputs`, the function training uses, so the first ratio is 1 within float32
      rounding). "rollout": the rollout's behaviour log-probs (TRL's choice): one policy forward pass fewer per
      iteration; they agree with the pass to ≤ 1e-5 in float32, and `policy/logprob_gap` is then 0 by
      construction. In "shared" critic mode the pass still runs (it gives the values).
    remat: gradient checkpointing (`jax.checkpoint` of each decoder block of the policy and critic models,
      applied by `init_ppo_state`): activations are recomputed in the backward pass; same results, less memory.
    """

    convention: Convention = PRESETS["ppojax"]
    batch_size: int = 64
    minibatch_size: int = 16
    micro_batch_size: Optional[int] = None
    ppo_epochs: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    critic_mode: str = "separate"
    policy_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-6)
    critic_optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)
    entropy_coef: float = 0.0
    early_stop_kl: Optional[float] = None
    master_dtype: Optional[str] = None
    reward_gain: float = 1.0
    reward_bias: float = 0.0
    exact_old_logprobs: bool = False
    old_logprobs: str = "score"
    remat: bool = False

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.critic_mode not in CRITIC_MODES:
            raise ValueError(f"PPOConfig.critic_mode must be one of {CRITIC_MODES}, got {self.critic_mode!r}")
        repetition_penalty_or_none(self.repetition_penalty)  # ValueError unless a finite number > 0
        if self.old_logprobs not in OLD_LOGPROBS:
            raise ValueError(f"PPOConfig.old_logprobs must be one of {OLD_LOGPROBS}, got {self.old_logprobs!r}")
        if self.old_logprobs == "rollout" and self.logprob_temperature != self.temperature:
            raise ValueError(
                f"PPOConfig: old_logprobs 'rollout' are log-probs at the sampling temperature {self.temperature}, but "
                f"convention {self.convention.name!r} scores at {self.logprob_temperature}; use old_logprobs 'score'"
            )
        if self.batch_size % self.minibatch_size:
            raise ValueError(
                f"PPOConfig: batch_size {self.batch_size} is not a multiple of minibatch_size {self.minibatch_size}"
            )
        if self.minibatch_size % self.micro_size:
            raise ValueError(
                f"PPOConfig: minibatch_size {self.minibatch_size} is not a multiple of micro_batch_size {self.micro_batch_size}"
            )

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the old / new / reference log-probs and the entropy: the convention's
        `logprob_temperature` (TRL 0.x: 1.0), else the sampling temperature."""
        fixed = self.convention.logprob_temperature
        return self.temperature if fixed is None else fixed

    @property
    def micro_size(self) -> int:
        return self.micro_batch_size or self.minibatch_size

    @property
    def minibatches(self) -> int:
        return self.batch_size // self.minibatch_size

    @property
    def micro_batches(self) -> int:
        return self.minibatch_size // self.micro_size

    @property
    def updates_per_iteration(self) -> int:
        """Optimizer steps per iteration (for an annealing schedule's `total_steps`)."""
        return self.ppo_epochs * self.minibatches

    def replace(self, **changes) -> "PPOConfig":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class PPOModels:
    """The model graphs (static). `critic` is a head="value" model (None in shared mode); `reward` a
    head="reward" model; `reward_fn(prompt_ids, response_ids, response_mask) -> [B]` a jnp function used
    inside jit. Scores of both sources are summed."""

    policy: DecoderModel
    critic: Optional[DecoderModel] = None
    reward: Optional[DecoderModel] = None
    reward_fn: Optional[Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = None


# ----------------------------------------------------------------------------------------------------------
# State and batches


@struct.dataclass
class LoraReference:
    """`ref_params` of a LoRA run whose reference is a model of its own: `base`, the frozen params the adapters
    sit on (the policy is base + adapters), and `reference`, the reference policy's params (same architecture).
    Without it a LoRA run's reference is the base itself (adapters off)."""

    base: Any
    reference: Any


@struct.dataclass
class PPOState:
    """What changes during PPO.

    step: int32 optimizer steps applied (skipped updates do not count).
    iteration: int32 PPO iterations done.
    policy: full policy params, or the `Lora` adapters (then the base is `ref_params`).
    critic: critic-model params ("separate" / "joint") or the value head `{"kernel": [H, 1]}` ("shared"; plus
        `"bias"` when the policy config has `head_bias`).
    policy_opt_state: optimizer state of `policy` ("separate") or of the pair (policy, critic).
    critic_opt_state: optimizer state of `critic` ("separate"), else `optax.EmptyState()`.
    kl: KL-controller state (β). key: the PRNG key, split at every use.
    """

    step: jax.Array
    iteration: jax.Array
    policy: Any
    policy_opt_state: Any
    critic: Any
    critic_opt_state: Any
    kl: KLControllerState
    key: jax.Array


@struct.dataclass
class Experience:
    """One collected rollout batch. [B, P] prompts (left-padded), [B, N] responses (right-padded).

    behaviour_logprobs: log-probs recorded while sampling. logprobs: teacher-forced policy log-probs at
    `PPOConfig.logprob_temperature` (the sampling temperature unless the convention fixes one; "old" log-probs).
    ref_logprobs (same temperature), values: [B, N]. scores: [B] (reward model and/or
    programmatic; text rewards are added between the phases). stopped, lengths: [B].
    """

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    behaviour_logprobs: jax.Array
    logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array
    scores: jax.Array
    stopped: jax.Array
    lengths: jax.Array


@struct.dataclass
class Minibatch:
    """Rows for one optimizer step; all [M, N] except the prompts [M, P]."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array
    old_logprobs: jax.Array
    old_values: jax.Array
    advantages: jax.Array
    returns: jax.Array
    policy_mask: jax.Array
    value_mask: jax.Array


class SequenceBatch(NamedTuple):
    """Prompt [B, P] (left-padded) and response [B, N] (right-padded) ids and masks."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    response_ids: jax.Array
    response_mask: jax.Array


class PreferenceBatch(NamedTuple):
    """A prompt [B, P] with a chosen and a rejected response (each [B, N]); optional margin [B]."""

    prompt_ids: jax.Array
    prompt_mask: jax.Array
    chosen_ids: jax.Array
    chosen_mask: jax.Array
    rejected_ids: jax.Array
    rejected_mask: jax.Array
    margin: Optional[jax.Array] = None


# ----------------------------------------------------------------------------------------------------------
# Initialisation


def critic_from_reward(reward_model: DecoderModel, reward_params: dict) -> tuple[DecoderModel, dict]:
    """A head="value" critic initialised from the reward model, its score head (kernel, and bias when the
    config has `head_bias`) becoming the value head."""
    params = {name: sub for name, sub in reward_params.items() if name != "score"}
    params["value_head"] = dict(reward_params["score"])
    return DecoderModel(reward_model.config, head="value", dtype=reward_model.dtype), params


def critic_from_policy(policy_model: DecoderModel, policy_params: dict) -> tuple[DecoderModel, dict]:
    """A head="value" critic initialised from the policy trunk with a zero value head."""
    params = {name: sub for name, sub in policy_params.items() if name != "lm_head"}
    dtype = policy_params["embed"]["embedding"].dtype
    params["value_head"] = init_value_head(policy_model.config, dtype)
    return DecoderModel(policy_model.config, head="value", dtype=policy_model.dtype), params


def kl_controller(convention: Convention) -> KLController:
    """The convention's controller: fixed β, or adaptive by the proportional (Ziegler) or step rule."""
    return make_kl_controller(
        adaptive=convention.adaptive_kl,
        init_coef=convention.kl_coef,
        target=convention.kl_target,
        horizon=convention.kl_horizon,
        rule=convention.kl_rule,
    )


def _cast(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def init_ppo_state(
    config: PPOConfig,
    policy_model: DecoderModel,
    policy_params: dict,
    key: jax.Array,
    *,
    reward_model: Optional[DecoderModel] = None,
    reward_params: Optional[dict] = None,
    reward_fn: Optional[Callable] = None,
    critic_init: str = "reward",
    lora: Optional[Lora] = None,
) -> tuple[PPOState, PPOModels]:
    """The initial state and the static model bundle.

    policy_params: the loaded policy (with `lora`, the frozen base: pass the same params as `ref_params`).
    critic_init: "reward" (default; needs the reward model) or "policy" (trunk + zero value head). Shared
      mode always starts from a zero value head on the policy trunk.
    key: the run's PRNG key (every later random draw comes from it).
    With `config.remat`, the returned `PPOModels` hold rematerialising copies of the policy and critic
    models (same params); the reward model is used forward-only and is left as given.
    """
    if critic_init not in CRITIC_INITS:
        raise ValueError(f"init_ppo_state: critic_init must be one of {CRITIC_INITS}, got {critic_init!r}")
    if reward_model is None and reward_fn is None:
        raise ValueError("init_ppo_state: give a reward_model (with reward_params), a reward_fn, or both")
    if (reward_model is None) != (reward_params is None):
        raise ValueError("init_ppo_state: reward_model and reward_params go together")
    if config.remat:
        policy_model = dataclasses.replace(policy_model, remat=True)
    critic_model = None
    if config.critic_mode == "shared":
        critic = init_value_head(policy_model.config, policy_params["embed"]["embedding"].dtype)
    elif critic_init == "reward":
        if reward_model is None:
            raise ValueError(
                "init_ppo_state: critic_init='reward' needs reward_model and reward_params; use critic_init='policy'"
            )
        critic_model, critic = critic_from_reward(reward_model, reward_params)
    else:
        critic_model, critic = critic_from_policy(policy_model, policy_params)
    if critic_model is not None and config.remat:
        critic_model = dataclasses.replace(critic_model, remat=True)
    policy = _cast(lora if lora is not None else policy_params, config.master_dtype)
    critic = _cast(critic, config.master_dtype)
    policy_tx = make_optimizer(config.policy_optimizer)
    if config.critic_mode == "separate":
        policy_opt_state = policy_tx.init(policy)
        critic_opt_state = make_optimizer(config.critic_optimizer).init(critic)
    else:
        policy_opt_state = policy_tx.init((policy, critic))
        critic_opt_state = optax.EmptyState()
    state = PPOState(
        step=jnp.zeros((), jnp.int32),
        iteration=jnp.zeros((), jnp.int32),
        policy=policy,
        policy_opt_state=policy_opt_state,
        critic=critic,
        critic_opt_state=critic_opt_state,
        kl=kl_controller(config.convention).init(),
        key=key,
    )
    return state, PPOModels(policy=policy_model, critic=critic_model, reward=reward_model, reward_fn=reward_fn)


# ----------------------------------------------------------------------------------------------------------
# Forward passes


def _policy_params(policy, ref_params):
    """(params, lora) for applying the policy: LoRA adapters sit on the frozen base `ref_params` (or its `base`)."""
    if isinstance(policy, Lora):
        return (ref_params.base if isinstance(ref_params, LoraReference) else ref_params), policy
    return policy, None


def reference_params(ref_params):
    """The reference policy's params in `ref_params` (a `LoraReference`'s `reference`, else `ref_params`)."""
    return ref_params.reference if isinstance(ref_params, LoraReference) else ref_params


def policy_outputs(
    model,
    params,
    lora,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    temperature,
    value_head=None,
    value_mask=None,
):
    """One teacher-forced pass of the policy over prompt + response.

    Returns (logprobs [B, N] float32 (0 where masked), tempered logits [B, N, V] float32, values [B, N]
    float32 from `value_head` on the trunk's last hidden state (0 outside `value_mask`, default the response
    mask: see `response_values`), or None). Collection and training both use
    this function, so on the first minibatch the PPO ratio is 1 up to float32 rounding: XLA fuses the
    forward differently inside a gradient program (measured here: 2e-7 in the hidden state, ≤ 1e-6 in the
    log-probs), so "exactly 1" holds for the log-probs' function, not for their bits.
    """
    hidden, logits = _response_outputs(
        model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora, "logits", "policy_outputs"
    )
    mask = jnp.asarray(response_mask) > 0
    logprobs = jnp.where(mask, sampling.token_logprobs(logits, jnp.asarray(response_ids, jnp.int32), temperature), 0.0)
    values = None
    if value_head is not None:
        keep = _keep_mask(value_mask, response_mask, "policy_outputs")
        values = jnp.where(keep, values_from_hidden(value_head, hidden), 0.0)
    return logprobs, sampling.apply_temperature(logits, temperature), values


def _sequence_scores(
    config: PPOConfig, models: PPOModels, reward_params, prompt_ids, prompt_mask, response_ids, response_mask
):
    """[B] float32: gain · reward-model score + bias, plus the programmatic reward."""
    scores = jnp.zeros((prompt_ids.shape[0],), jnp.float32)
    if models.reward is not None:
        raw = sequence_reward(models.reward, reward_params, prompt_ids, prompt_mask, response_ids, response_mask)
        scores = scores + config.reward_gain * raw + config.reward_bias
    if models.reward_fn is not None:
        scores = scores + as_f32(models.reward_fn(prompt_ids, response_ids, response_mask))
    return scores


# ----------------------------------------------------------------------------------------------------------
# One optimizer step


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _guarded_update(tx: optax.GradientTransformation, grads, opt_state, params, ok: jax.Array):
    """optax step, or (params, opt_state) unchanged where `ok` is False (a non-finite loss or gradient)."""
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def step(operands):
        grads, opt_state, params = operands
        updates, new_opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt_state

    # One branch on `ok`, not a `where(ok, new, old)` per leaf: XLA copied the scalar chain behind `ok` (one
    # finiteness check per gradient leaf) into every leaf's fusion, ≈ 30k ops that took 2/3 of the train
    # program's compile time on the benchmark workload.
    return jax.lax.cond(ok, step, lambda operands: (operands[2], operands[1]), (grads, opt_state, params))


_POLICY_WEIGHTED = (
    "clipfrac",
    "clipfrac_lower",
    "dual_clipfrac",
    "approx_kl",
    "ratio_mean",
    "entropy",
    "ratio_skipped",
)


def _minibatch_gradients(state: PPOState, minibatch: Minibatch, ref_params, *, config: PPOConfig, models: PPOModels):
    """(loss, grads of (policy, critic), stats) of the whole minibatch, built from micro-batches.

    Loss = pg_sum / pg_count + c · vf_sum / vf_count with the counts of the whole minibatch (they depend on
    the masks only: the sum of the micro-batches' counts), c = vf_coef ("joint", "shared") or 1 ("separate":
    disjoint params, so each model gets its own loss's gradient). Each micro-batch contributes its sums over
    the same counts; the accumulated gradient is the minibatch gradient ("micro-token-mean": the mean of the
    micro-batches' token-mean losses, by definition). Gradients are accumulated in float32.
    """
    conv = config.convention
    if conv.whiten_scope == "minibatch":
        minibatch = minibatch.replace(
            advantages=whiten(
                minibatch.advantages,
                minibatch.policy_mask,
                unbiased=conv.whiten_unbiased,
                eps_mode=conv.whiten_eps_mode,
            )
        )
    agg = conv.loss_aggregation
    k = config.micro_batches
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), minibatch)
    count = lambda masks: jnp.sum(jax.vmap(lambda m: aggregate_loss(jnp.zeros(m.shape), m, agg).count)(masks))
    pg_count, vf_count = count(micro.policy_mask), count(micro.value_mask)
    vf_weight = 1.0 if config.critic_mode == "separate" else conv.vf_coef
    shared = config.critic_mode == "shared"

    def loss_fn(trainable, mb: Minibatch):
        policy, critic = trainable
        params, lora = _policy_params(policy, ref_params)
        batch = (mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.response_mask)
        logprobs, logits, values = policy_outputs(
            models.policy, params, lora, *batch, config.logprob_temperature, critic if shared else None, mb.value_mask
        )
        if not shared:
            values = response_values(models.critic, critic, *batch, value_mask=mb.value_mask)
        pg, vf, stats = ppo_losses(
            conv,
            logprobs=logprobs,
            old_logprobs=mb.old_logprobs,
            advantages=mb.advantages,
            values=values,
            old_values=mb.old_values,
            returns=mb.returns,
            policy_mask=mb.policy_mask,
            value_mask=mb.value_mask,
            logits=logits,
            entropy_coef=config.entropy_coef,
            as_sum_count=True,
        )
        loss = safe_divide(pg.total, pg_count) + vf_weight * safe_divide(vf.total, vf_count)
        return loss, (pg.total, vf.total, stats, logprobs, values)

    trainable = (state.policy, state.critic)
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)

    def accumulate(acc, mb):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, mb)
        acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
        n_policy = masked_count(mb.policy_mask)
        n_value = masked_count(mb.value_mask)
        return acc, (loss, aux, n_policy, n_value)

    grads, (losses, (pg_totals, vf_totals, micro_stats, logprobs, values), n_policy, n_value) = jax.lax.scan(
        accumulate, zeros, micro
    )
    stats = {
        name: safe_divide(jnp.sum(micro_stats[name] * n_policy), jnp.sum(n_policy))
        for name in _POLICY_WEIGHTED
        if name in micro_stats
    }
    stats["ratio_max"] = jnp.max(micro_stats["ratio_max"])
    stats["vf_clipfrac"] = safe_divide(jnp.sum(micro_stats["vf_clipfrac"] * n_value), jnp.sum(n_value))
    stats["pg_loss"] = safe_divide(jnp.sum(pg_totals), pg_count)
    stats["vf_loss"] = safe_divide(jnp.sum(vf_totals), vf_count)
    rows = lambda x: x.reshape((-1,) + x.shape[2:])
    return jnp.sum(losses), grads, stats, (rows(logprobs), rows(values))


def minibatch_gradients(state: PPOState, minibatch: Minibatch, ref_params, *, config: PPOConfig, models: PPOModels):
    """(loss, (policy_grads, critic_grads)) of one minibatch, accumulated over `config.micro_batches`
    micro-batches (float32). Exposed for tests and custom loops; `update_step` uses it."""
    loss, grads, _, _ = _minibatch_gradients(state, minibatch, ref_params, config=config, models=models)
    return loss, grads


def update_step(state: PPOState, minibatch: Minibatch, ref_params, *, config: PPOConfig, models: PPOModels):
    """One optimizer step for the policy and the critic from one minibatch. -> (state, metrics).

    A non-finite loss or gradient skips the step: params, optimizer states and `step` stay as they were
    and `train/skipped` is 1. Metrics are float32 scalars (see `ppo_iteration` for the names).
    """
    loss, (policy_grads, critic_grads), stats, _ = _minibatch_gradients(
        state, minibatch, ref_params, config=config, models=models
    )
    ok = jnp.isfinite(loss) & _all_finite((policy_grads, critic_grads))
    policy_tx = make_optimizer(config.policy_optimizer)
    if config.critic_mode == "separate":
        policy, policy_opt_state = _guarded_update(policy_tx, policy_grads, state.policy_opt_state, state.policy, ok)
        critic, critic_opt_state = _guarded_update(
            make_optimizer(config.critic_optimizer), critic_grads, state.critic_opt_state, state.critic, ok
        )
        critic_lr = make_schedule(config.critic_optimizer)(state.step)
    else:
        (policy, critic), policy_opt_state = _guarded_update(
            policy_tx, (policy_grads, critic_grads), state.policy_opt_state, (state.policy, state.critic), ok
        )
        critic_opt_state = state.critic_opt_state
        critic_lr = make_schedule(config.policy_optimizer)(state.step)
    metrics = {
        "policy/approxkl": stats["approx_kl"],
        "policy/clipfrac": stats["clipfrac"],
        "policy/clipfrac_lower": stats["clipfrac_lower"],
        "policy/ratio_mean": stats["ratio_mean"],
        "policy/ratio_max": stats["ratio_max"],
        "objective/entropy": stats["entropy"],
        "loss/policy": stats["pg_loss"],
        "loss/value": stats["vf_loss"],
        "loss/total": loss,
        "value/clipfrac": stats["vf_clipfrac"],
        "grad/policy_norm": optax.tree.norm(policy_grads),
        "grad/critic_norm": optax.tree.norm(critic_grads),
        "lr/policy": make_schedule(config.policy_optimizer)(state.step),
        "lr/critic": critic_lr,
        "train/skipped": 1.0 - ok.astype(jnp.float32),
        "train/attempted": jnp.ones((), jnp.float32),
    }
    if "dual_clipfrac" in stats:
        metrics["policy/dual_clipfrac"] = stats["dual_clipfrac"]
    if "ratio_skipped" in stats:  # share of the minibatch's tokens in micro-batches the ratio threshold zeroed
        metrics["policy/ratio_skipped"] = stats["ratio_skipped"]
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    state = state.replace(
        step=state.step + ok.astype(jnp.int32),
        policy=policy,
        policy_opt_state=policy_opt_state,
        critic=critic,
        critic_opt_state=critic_opt_state,
    )
    return state, metrics


# ----------------------------------------------------------------------------------------------------------
# The PPO iteration


def collect(state: PPOState, prompts, ref_params, reward_params, *, config: PPOConfig, models: PPOModels):
    """Phase 1: sample responses and score them. prompts: (ids, mask) [B, P] left-padded (`pad_prompts`).

    Returns (state with its key advanced, Experience).
    """
    prompt_ids, prompt_mask = (jnp.asarray(x, jnp.int32) for x in prompts)
    if prompt_ids.shape[0] != config.batch_size:
        raise ValueError(
            f"collect: prompts have {prompt_ids.shape[0]} rows; PPOConfig.batch_size is {config.batch_size}"
        )
    key, rollout_key = jax.random.split(state.key)
    params, lora = _policy_params(state.policy, ref_params)
    sampled = rollout(
        models.policy,
        params,
        prompt_ids,
        prompt_mask,
        rollout_key,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        stop_token_ids=config.stop_token_ids,
        pad_token_id=config.pad_token_id,
        lora=lora,
        repetition_penalty=config.repetition_penalty,
    )
    batch = (prompt_ids, prompt_mask, sampled.response_ids, sampled.response_mask)
    shared = config.critic_mode == "shared"
    value_mask = masks_for(config.convention, sampled.response_mask)[1]
    if shared or config.old_logprobs == "score":
        logprobs, _, values = policy_outputs(
            models.policy,
            params,
            lora,
            *batch,
            config.logprob_temperature,
            state.critic if shared else None,
            value_mask,
        )
    if not shared:
        values = response_values(models.critic, state.critic, *batch, value_mask=value_mask)
    if config.old_logprobs == "rollout":
        logprobs = behaviour_as_old_logprobs(sampled.logprobs, sampled.response_mask, "collect")
    experience = Experience(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=sampled.response_ids,
        response_mask=sampled.response_mask,
        behaviour_logprobs=sampled.logprobs,
        logprobs=logprobs,
        ref_logprobs=response_logprobs(models.policy, reference_params(ref_params), *batch, config.logprob_temperature),
        values=values,
        scores=_sequence_scores(config, models, reward_params, *batch),
        stopped=sampled.stopped,
        lengths=sampled.lengths,
    )
    return state.replace(key=key), experience


def _reduce_step_metrics(per_step: dict) -> dict:
    """[epochs, minibatches] per-update metrics -> scalars over the attempted updates."""
    attempted = per_step["train/attempted"]
    out = {}
    for name, values in per_step.items():
        if name == "policy/ratio_max":
            out[name] = masked_max(values, attempted > 0)
        elif name in ("train/skipped", "train/attempted"):
            out[name] = jnp.sum(values)
        else:
            out[name] = masked_mean(values, attempted > 0)
    out["train/skipped_updates"] = out.pop("train/skipped")
    out["train/updates"] = out.pop("train/attempted")
    out["policy/first_ratio_max"] = per_step["policy/ratio_max"][0, 0]
    out["policy/first_clipfrac"] = per_step["policy/clipfrac"][0, 0]
    out["policy/first_approxkl"] = per_step["policy/approxkl"][0, 0]
    return out


def training_batch(convention: Convention, experience: Experience, kl_coef) -> tuple[Advantages, Minibatch]:
    """(advantages, the whole batch as a `Minibatch`) of an experience under a convention: what the PPO epochs
    take their minibatches from. kl_coef: β (the KL controller's current coefficient)."""
    adv = assemble_advantages(
        convention,
        scores=experience.scores,
        logprobs=experience.logprobs,
        ref_logprobs=experience.ref_logprobs,
        values=experience.values,
        response_mask=experience.response_mask,
        kl_coef=kl_coef,
        stopped=experience.stopped,
    )
    data = Minibatch(
        prompt_ids=experience.prompt_ids,
        prompt_mask=experience.prompt_mask,
        response_ids=experience.response_ids,
        response_mask=experience.response_mask,
        old_logprobs=experience.logprobs,
        old_values=experience.values,
        advantages=adv.advantages,
        returns=adv.returns,
        policy_mask=adv.policy_mask,
        value_mask=adv.value_mask,
    )
    return adv, data


def shuffle_minibatches(key: jax.Array, config: PPOConfig) -> tuple[jax.Array, jax.Array]:
    """(the key to keep, rows [ppo_epochs, minibatches, minibatch_size]): a fresh permutation of the batch per
    epoch, cut into minibatches, as `train_on_batch` draws them from `state.key`."""
    key, permutation_key = jax.random.split(key)
    epoch_keys = jax.random.split(permutation_key, config.ppo_epochs)
    rows = jax.vmap(lambda epoch_key: jax.random.permutation(epoch_key, config.batch_size))(epoch_keys)
    return key, rows.reshape(config.ppo_epochs, config.minibatches, config.minibatch_size)


def train_on_batch(state: PPOState, experience: Experience, ref_params, *, config: PPOConfig, models: PPOModels):
    """Phase 2: advantages, `ppo_epochs` passes of minibatch updates, KL-controller update. -> (state, metrics)."""
    conv = config.convention
    adv, data = training_batch(conv, experience, state.kl.coef)
    key, epoch_rows = shuffle_minibatches(state.key, config)
    state = state.replace(key=key)
    extra = {}
    if config.exact_old_logprobs:
        # The old log-probs and values again, from the training program itself: the same micro-batch
        # gradient pass as `update_step`, over the rows of epoch 0's minibatches in epoch 0's order, so the
        # first update sees bit-identical inputs through a bit-identical program and its ratio is exactly 1.
        # The gradients must be used (here: a metric), or XLA drops the backward and fuses the forward as in
        # the forward-only collection pass, which rounds differently.
        first_rows = epoch_rows[0]

        def old_pass(norm_sum, rows):
            minibatch = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), data)
            _, grads, _, outputs = _minibatch_gradients(state, minibatch, ref_params, config=config, models=models)
            return norm_sum + optax.tree.norm(grads), outputs

        norm_sum, (logprobs, values) = jax.lax.scan(old_pass, jnp.zeros((), jnp.float32), first_rows)
        order = jnp.argsort(first_rows.reshape(-1))
        logprobs, values = (x.reshape((config.batch_size,) + x.shape[2:])[order] for x in (logprobs, values))
        mask = experience.response_mask > 0
        extra["grad/old_pass_norm"] = norm_sum / config.minibatches
        extra["policy/old_pass_gap_max"] = masked_max(jnp.abs(logprobs - experience.logprobs), mask)
        experience = experience.replace(logprobs=logprobs, values=values)
        adv, data = training_batch(conv, experience, state.kl.coef)
    step = functools.partial(update_step, ref_params=ref_params, config=config, models=models)

    def minibatch_step(carry, rows):
        state, stop = carry
        minibatch = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), data)
        if config.early_stop_kl is None:
            state, metrics = step(state, minibatch)
        else:
            shapes = jax.eval_shape(step, state, minibatch)[1]
            skip = lambda state, minibatch: (state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))
            state, metrics = jax.lax.cond(stop, skip, step, state, minibatch)
            stop = stop | (metrics["policy/approxkl"] > config.early_stop_kl)
        return (state, stop), metrics

    def epoch(carry, rows):
        return jax.lax.scan(minibatch_step, carry, rows)

    (state, stopped_early), per_step = jax.lax.scan(epoch, (state, jnp.asarray(False)), epoch_rows)
    kl_state = kl_controller(conv).update(state.kl, adv.controller_kl, jnp.asarray(config.batch_size, jnp.float32))

    response_mask = experience.response_mask > 0
    _, value_stats = value_loss(experience.values, experience.values, adv.returns, adv.value_mask, clip_eps=None)
    max_length = experience.response_ids.shape[1]
    metrics = {
        **_reduce_step_metrics(per_step),
        "objective/kl": jnp.mean(sequence_kl(adv.kl, adv.policy_mask)),
        "objective/controller_kl": adv.controller_kl,
        "objective/kl_coef": state.kl.coef,
        "objective/scores": jnp.mean(experience.scores),
        "objective/rlhf_reward": jnp.mean(jnp.sum(adv.rewards, axis=-1)),
        "value/explained_variance": value_stats["explained_variance"],
        "returns/mean": masked_mean(adv.returns, adv.value_mask),
        "returns/var": masked_var(adv.returns, adv.value_mask),
        "advantages/mean": masked_mean(adv.advantages, adv.policy_mask),
        "advantages/var": masked_var(adv.advantages, adv.policy_mask),
        "response/length_mean": jnp.mean(experience.lengths.astype(jnp.float32)),
        "response/clip_ratio": jnp.mean((~experience.stopped & (experience.lengths >= max_length)).astype(jnp.float32)),
        "response/eos_rate": jnp.mean(experience.stopped.astype(jnp.float32)),
        "policy/logprob_gap": masked_mean(jnp.abs(experience.behaviour_logprobs - experience.logprobs), response_mask),
        "policy/logprob_gap_max": masked_max(
            jnp.abs(experience.behaviour_logprobs - experience.logprobs), response_mask
        ),
        "train/early_stopped": stopped_early.astype(jnp.float32),
        **extra,
    }
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    return state.replace(kl=kl_state, iteration=state.iteration + 1), metrics


def ppo_iteration(state: PPOState, prompts, ref_params, reward_params, *, config: PPOConfig, models: PPOModels):
    """collect → train_on_batch as one function (jit it whole). -> (state, metrics, experience).

    Metrics (float32 scalars): objective/{kl, controller_kl, kl_coef, entropy, scores, rlhf_reward},
    policy/{approxkl, clipfrac, clipfrac_lower, ratio_mean, ratio_max, first_ratio_max, first_clipfrac,
    first_approxkl, logprob_gap, logprob_gap_max}, loss/{policy, value, total}, value/{clipfrac, explained_variance},
    returns/{mean, var}, advantages/{mean, var}, response/{length_mean, clip_ratio, eos_rate},
    grad/{policy_norm, critic_norm}, lr/{policy, critic}, train/{updates, skipped_updates, early_stopped};
    with `config.exact_old_logprobs` also grad/old_pass_norm and policy/old_pass_gap_max; with a dual clip
    policy/dual_clipfrac, with a ratio threshold policy/ratio_skipped. Per-update metrics
    are averaged over the updates attempted (ratio_max: their max). `make_ppo_iteration` adds the host-timed
    throughput metrics perf/*.
    """
    state, experience = collect(state, prompts, ref_params, reward_params, config=config, models=models)
    state, metrics = train_on_batch(state, experience, ref_params, config=config, models=models)
    return state, metrics, experience


def make_ppo_phases(config: PPOConfig, models: PPOModels):
    """(collect, train_on_batch), each jitted with the static config and models bound:
    collect(state, prompts, ref_params, reward_params) -> (state, experience);
    train_on_batch(state, experience, ref_params) -> (state, metrics). For models too large for one program,
    and for host-side rewards between the phases."""
    return (
        jax.jit(functools.partial(collect, config=config, models=models)),
        jax.jit(functools.partial(train_on_batch, config=config, models=models)),
    )


class CompiledAhead:
    """A jitted function whose program can be traced and compiled in a background thread before its first call.

    `start(*args)` (any arrays or `jax.ShapeDtypeStruct`s of the call's shapes) lowers and compiles on a worker
    thread; XLA's compiler releases the GIL, so the compilation overlaps whatever the caller does next (the
    rollout's compilation and run, in `make_ppo_iteration`). Calls wait for it and then run the compiled program;
    arguments of other shapes or dtypes (which the compiled program refuses with a TypeError) fall back to the
    jitted function, which compiles its own. Without `start` it is the jitted function.
    """

    def __init__(self, jitted):
        self.jitted = jitted
        self.started = False
        self._future = None
        self._compiled = None

    def start(self, *args) -> None:
        if not self.started:
            self.started = True
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ppojax-compile")
            self._future = pool.submit(lambda: self.jitted.lower(*args).compile())
            pool.shutdown(wait=False)

    @property
    def ahead_of_time(self) -> bool:
        """True while calls run the program compiled by `start` (False before it, or after a fallback)."""
        return self._future is not None or self._compiled is not None

    def __call__(self, *args):
        if self._future is not None:
            future, self._future = self._future, None
            self._compiled = future.result()
        if self._compiled is not None:
            try:
                return self._compiled(*args)
            except TypeError:  # other avals than the ones compiled for: let jit handle (and cache) them
                self._compiled = None
        return self.jitted(*args)


def decode_responses(experience: Experience, decode: Callable[[list[int]], str]) -> tuple[list[str], list[str]]:
    """Host side: (prompt texts, response texts) of an experience batch, real tokens only."""
    prompt_ids, prompt_mask, response_ids, response_mask = jax.device_get(
        (experience.prompt_ids, experience.prompt_mask, experience.response_ids, experience.response_mask)
    )
    prompts = [decode([int(t) for t, m in zip(ids, mask) if m]) for ids, mask in zip(prompt_ids, prompt_mask)]
    responses = [decode([int(t) for t, m in zip(ids, mask) if m]) for ids, mask in zip(response_ids, response_mask)]
    return prompts, responses


def make_ppo_iteration(
    config: PPOConfig,
    models: PPOModels,
    *,
    text_reward_fn: Optional[Callable[[Sequence[str], Sequence[str]], Sequence[float]]] = None,
    decode: Optional[Callable[[list[int]], str]] = None,
    timing: bool = True,
    compile_ahead: bool = True,
):
    """iteration(state, prompts, ref_params, reward_params) -> (state, metrics, experience).

    With `timing` (default), or with a `text_reward_fn`: the two jitted phases (`make_ppo_phases`), each
    waited for and timed on the host, which adds the throughput metrics (numpy float32 scalars; the first
    call's figures include compilation):
      perf/rollout_s, perf/rollout_tokens_per_s: the collection phase (sampling, the teacher-forced passes,
        scoring) and the response tokens generated (real tokens, padding excluded) per second of it;
      perf/update_s, perf/update_tokens_per_s: the training phase and the tokens (prompt + response, real)
        through the updates' forward and backward passes (each attempted update, one minibatch's share of the
        batch) per second of it; perf/text_reward_s with a `text_reward_fn`.
    With `timing=False` and no text reward: one jitted program (`ppo_iteration`), no host round trip between
    the phases, no perf/ metrics.

    `text_reward_fn(prompt_texts, response_texts) -> [B]` is added to the scores between the phases; `decode(
    token ids) -> str` (e.g. `tokenizer.decode`) turns ids into text. The phased iteration exposes its two
    jitted programs as `iteration.phases` (collect, train_on_batch).

    compile_ahead (phased only): on the first call the training program is traced and compiled in a background
    thread (`CompiledAhead`) while the collection phase compiles and runs, so the first iteration does not pay
    the two compilations one after the other.
    """
    if text_reward_fn is not None and decode is None:
        raise ValueError("make_ppo_iteration: text_reward_fn needs decode (token ids -> str), e.g. tokenizer.decode")
    if text_reward_fn is None and not timing:
        return jax.jit(functools.partial(ppo_iteration, config=config, models=models))
    collect_jit, train_jit = make_ppo_phases(config, models)
    train_ahead = CompiledAhead(train_jit)

    def iteration(state, prompts, ref_params, reward_params):
        perf = {}
        start = time.perf_counter()
        if compile_ahead and not train_ahead.started:  # train compiles while collection compiles and runs
            experience_shape = jax.eval_shape(collect_jit, state, prompts, ref_params, reward_params)[1]
            train_ahead.start(state, experience_shape, ref_params)
        state, experience = jax.block_until_ready(collect_jit(state, prompts, ref_params, reward_params))
        perf["perf/rollout_s"] = time.perf_counter() - start
        if text_reward_fn is not None:
            start = time.perf_counter()
            text_scores = np.asarray(text_reward_fn(*decode_responses(experience, decode)), np.float32)
            if text_scores.shape != (config.batch_size,):
                raise ValueError(f"text_reward_fn returned shape {text_scores.shape}; expected ({config.batch_size},)")
            experience = experience.replace(scores=experience.scores + text_scores)
            perf["perf/text_reward_s"] = time.perf_counter() - start
        start = time.perf_counter()
        state, metrics = jax.block_until_ready(train_ahead(state, experience, ref_params))
        perf["perf/update_s"] = time.perf_counter() - start
        response_mask, prompt_mask = jax.device_get((experience.response_mask, experience.prompt_mask))
        response_tokens = float(np.sum(response_mask > 0))
        update_tokens = (response_tokens + float(np.sum(prompt_mask > 0))) * float(metrics["train/updates"])
        update_tokens /= config.minibatches
        perf["perf/rollout_tokens_per_s"] = response_tokens / max(perf["perf/rollout_s"], 1e-9)
        perf["perf/update_tokens_per_s"] = update_tokens / max(perf["perf/update_s"], 1e-9)
        return state, {**metrics, **{name: np.float32(value) for name, value in perf.items()}}, experience

    iteration.phases = (collect_jit, train_jit)
    iteration.train_ahead = train_ahead
    return iteration


# ----------------------------------------------------------------------------------------------------------
# SFT and reward-model training


@struct.dataclass
class TrainState:
    """step (int32, applied steps), params (full params or `Lora` adapters), opt_state."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def sft_loss(model, params, batch: SequenceBatch, lora=None):
    """Masked next-token cross-entropy on the response tokens only, as a SumCount (Σ −log p, tokens)."""
    logprobs = response_logprobs(model, params, *batch, 1.0, lora=lora)
    return aggregate_loss(-logprobs, batch.response_mask, "token-mean")


def guarded_step(state: TrainState, loss_fn, optimizer: optax.GradientTransformation):
    """One optimizer step on `loss_fn(params) -> (loss, aux dict)`, skipped when the loss or any gradient
    leaf is non-finite. -> (state, metrics).

    The building block of `sft_step` and `reward_model_step`, for custom losses over a `TrainState` (e.g. a
    trainable pytree mixing adapters and a head). Skipping keeps params, optimizer state and `step` as they
    were. Metrics (float32 scalars): loss, grad_norm (before clipping), skipped (1.0 when skipped), and the
    entries of `aux`.
    """
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    ok = jnp.isfinite(loss) & _all_finite(grads)
    params, opt_state = _guarded_update(optimizer, grads, state.opt_state, state.params, ok)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped": 1.0 - ok.astype(jnp.float32), **aux}
    metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
    return TrainState(step=state.step + ok.astype(jnp.int32), params=params, opt_state=opt_state), metrics


def sft_step(
    state: TrainState, batch: SequenceBatch, base_params=None, *, model, optimizer: optax.GradientTransformation
):
    """One SFT step: token-mean cross-entropy of the response given the prompt. -> (state, metrics).

    With `Lora` adapters as `state.params`, `base_params` is the frozen base. Metrics: loss, grad_norm, skipped.
    """

    def loss_fn(trainable):
        params, lora = _policy_params(trainable, base_params)
        return sft_loss(model, params, batch, lora).value(), {}

    return guarded_step(state, loss_fn, optimizer)


def preference_scores(model, params, batch: PreferenceBatch, lora=None) -> tuple[jax.Array, jax.Array]:
    """([B] chosen scores, [B] rejected scores) in one forward pass over both."""
    prompt_ids = jnp.concatenate([batch.prompt_ids, batch.prompt_ids])
    prompt_mask = jnp.concatenate([batch.prompt_mask, batch.prompt_mask])
    response_ids = jnp.concatenate([batch.chosen_ids, batch.rejected_ids])
    response_mask = jnp.concatenate([batch.chosen_mask, batch.rejected_mask])
    scores = sequence_reward(model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora=lora)
    rows = batch.prompt_ids.shape[0]
    return scores[:rows], scores[rows:]


def reward_model_loss(chosen: jax.Array, rejected: jax.Array, margin: Optional[jax.Array] = None) -> jax.Array:
    """mean(−log σ(r_chosen − r_rejected − margin)) over [B] pairs."""
    diff = as_f32(chosen) - as_f32(rejected)
    if margin is not None:
        diff = diff - as_f32(margin)
    return jnp.mean(-jax.nn.log_sigmoid(diff))


def reward_model_step(
    state: TrainState, batch: PreferenceBatch, base_params=None, *, model, optimizer: optax.GradientTransformation
):
    """One pairwise reward-model step. -> (state, metrics: loss, accuracy, margin, grad_norm, skipped).

    accuracy: fraction of pairs with r_chosen > r_rejected; margin: mean r_chosen − r_rejected (both before
    the step).
    """

    def loss_fn(trainable):
        params, lora = _policy_params(trainable, base_params)
        chosen, rejected = preference_scores(model, params, batch, lora)
        aux = {"accuracy": jnp.mean((chosen > rejected).astype(jnp.float32)), "margin": jnp.mean(chosen - rejected)}
        return reward_model_loss(chosen, rejected, batch.margin), aux

    return guarded_step(state, loss_fn, optimizer)


def fit_reward_normalisation(model, params, batch: SequenceBatch, lora=None) -> tuple[float, float]:
    """(gain, bias) such that gain · score + bias has mean 0 and (population) std 1 over the reference set
    `batch`. Use them as `PPOConfig(reward_gain=..., reward_bias=...)`; a constant set gives gain 1."""
    scores = np.asarray(sequence_reward(model, params, *batch, lora=lora), np.float64)
    std = scores.std()
    gain = 1.0 / std if std > 0 else 1.0
    return float(gain), float(-scores.mean() * gain)
