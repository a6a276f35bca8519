"""Rollout: KV-cache sampling and teacher-forced scoring as pure functions.

Shapes (B rows, P prompt columns, N = max_new_tokens):
  prompt_ids, prompt_mask:     [B, P] int32, LEFT-padded (see `pad_prompts`); mask 1 on real tokens.
  response_ids, response_mask: [B, N] int32, RIGHT-padded with the pad id after the first stop token;
                               the stop token itself is a response token (mask 1).
  log-probs, values:           [B, N] float32, 0 at masked positions.

The model follows the `ppojax.models` contract: `model.apply(params, ids, attention_mask, *, cache, lora)`
returns `.logits` / `.values` / `.scores` and the updated `.cache`; `model.init_cache(B, length, dtype=...)`
returns an empty cache whose rows share one write index; positions come from the attention mask. Optional:
when `model.apply` also takes `head_at`, the prefill passes `head_at="last"` and needs only the last column's
logits (`ppojax.models.DecoderModel` skips the LM head's matmul over the other prompt columns).

`rollout` is pure and works un-jitted; `rollout_jit` is its compiled form (or jit it yourself, e.g. inside a
larger step, with `static_argnames=ROLLOUT_STATIC_ARGNAMES`). Static: the model, `max_new_tokens`, `top_k`, and
the prompt width P (an array shape: bucket it with `pad_prompts`). Traced: temperature, top_p, the stop and pad
ids, params, LoRA adapters, the key, the repetition penalty's value (whether there is one is static: None or 1
compiles a program without its seen-token state).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from ppojax import sampling
from ppojax.models.lora import Lora, merge_lora

ROLLOUT_STATIC_ARGNAMES = ("model", "max_new_tokens", "top_k")


@struct.dataclass
class Rollout:
    """Sampled responses, right-padded to `max_new_tokens`.

    response_ids:  [B, N] int32, pad id after the first stop token.
    response_mask: [B, N] int32, 1 on response tokens (the stop token included).
    logprobs:      [B, N] float32 behaviour log-probs, log softmax(logits / T)[token] (untempered at T = 0),
                   from the full distribution even when top-k / top-p restrict sampling; 0 where masked.
    lengths:       [B] int32 number of response tokens.
    stopped:       [B] bool, True where the row emitted a stop token.
    """

    response_ids: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    stopped: jax.Array


@struct.dataclass
class Scores:
    """Teacher-forced scores of a rollout, all float32 and 0 at masked positions.

    logprobs:     [B, N] policy log-probs at the sampling temperature ("old" log-probs).
    ref_logprobs: [B, N] reference log-probs at the same temperature.
    values:       [B, N] critic values of the state before each response token, 0 outside the value mask
                  (`score(value_mask=)`, by default the response mask).
    scores:       [B] reward-model score at the last real token of prompt + response.
    """

    logprobs: jax.Array
    ref_logprobs: jax.Array
    values: jax.Array
    scores: jax.Array


# ----------------------------------------------------------------------------------------------------------
# Prompt padding and length buckets


def bucket_length(length: int, multiple: int = 64) -> int:
    """The smallest positive multiple of `multiple` that is >= `length`, so a run compiles few prompt widths."""
    if multiple <= 0:
        raise ValueError(f"bucket multiple must be positive; found {multiple}")
    return max(1, -(-length // multiple)) * multiple


def pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int, *, bucket: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common bucketed width.

    Returns (ids [B, P] int32, mask [B, P] int32) with P = bucket_length(longest prompt, bucket); the
    padding is on the left so every row's last prompt token sits in column P - 1.
    """
    if len(prompts) == 0:
        raise ValueError("pad_prompts got no prompts; pass at least one token list")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("pad_prompts got an empty prompt; every prompt needs at least one token")
    width = bucket_length(max(len(p) for p in prompts), bucket)
    ids = np.full((len(prompts), width), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return ids, mask


# ----------------------------------------------------------------------------------------------------------
# Sampling with the KV cache


def _accepts_keyword(function, name: str) -> bool:
    """Whether `function` names the keyword argument `name` (an optional part of the model contract). A bare
    `**kwargs` does not count: a wrapper may forward it to a model without the option."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _is_stop(tokens: jax.Array, stop_token_ids: jax.Array) -> jax.Array:
    """[B] bool: the token is one of the stop ids ([S] int32, possibly empty)."""
    return jnp.any(tokens[:, None] == stop_token_ids[None, :], axis=-1)


def rollout(
    model: Any,
    params: Any,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: jax.Array | float = 1.0,
    top_k: int = 0,
    top_p: jax.Array | float = 1.0,
    stop_token_ids: jax.Array | Sequence[int],
    pad_token_id: jax.Array | int,
    lora: Any = None,
    repetition_penalty: jax.Array | float | None = None,
) -> Rollout:
    """Sample up to `max_new_tokens` tokens per prompt: one prefill, then one decode step per token.

    prompt_ids, prompt_mask: [B, P] int32, left-padded. key: a PRNG key; step t samples with
    fold_in(key, t), so the same key gives the same responses. temperature 0 is greedy. The decode loop is a
    `lax.while_loop` that exits as soon as every row has emitted a stop token. top_k (static) and top_p
    restrict sampling only; the log-probs are over the full tempered distribution (see `ppojax.sampling`).
    `stop_token_ids` may be empty (then every row runs to `max_new_tokens`); pad the list with -1 (never a
    token) to keep its length, and so the compiled program, fixed when the stop set changes.
    With 128 new tokens or more the decode loop runs in phases whose caches grow (`decode_phase_ends`, when the
    model has `grow_cache`); with float32 `Lora` adapters it samples from the merged weights.
    `repetition_penalty` (> 0; None or 1: off) penalises, before sampling, every token already in the row's
    prompt (its real tokens) or response, as transformers' `repetition_penalty` does; like top-k / top-p it
    changes what is sampled, not the log-probs.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1; found {max_new_tokens}")
    repetition_penalty = repetition_penalty_or_none(repetition_penalty)
    if _merge_adapters_for_sampling(params, lora):
        # Sample from W + scale * a @ b: one small product per adapted kernel per rollout instead of two per
        # projection per decode step (a rollout with adapters on every projection: -15 % on CPU). float32 only:
        # the merged and the unmerged products then differ by float32 rounding (behaviour log-probs within
        # ~1e-6 of the teacher-forced pass, which keeps the adapters separate); rounding W + delta to bf16 would not.
        params, lora = merge_lora(model, params, lora), None
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    chex.assert_rank([prompt_ids, prompt_mask], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    batch, prompt_len = prompt_ids.shape
    stop_token_ids = jnp.asarray(stop_token_ids, jnp.int32).reshape(-1)
    pad_token_id = jnp.asarray(pad_token_id, jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    top_p = jnp.asarray(top_p, jnp.float32)

    # Every step's uniforms at once (the values `sample_tokens(fold_in(key, step), ...)` would draw): one RNG
    # program before the loop instead of one per step.
    uniforms = jax.vmap(lambda step: jax.random.uniform(jax.random.fold_in(key, step), (batch, 1), jnp.float32))(
        jnp.arange(max_new_tokens)
    )

    def sample(step, logits, seen):
        return sampling.sample_tokens(
            key,
            logits,
            temperature,
            top_k=top_k,
            top_p=top_p,
            uniform=uniforms[step],
            repetition_penalty=repetition_penalty,
            seen=seen,
        )

    def see(seen, tokens, where):
        """Marks `tokens` ([B] or [B, P]) as seen in `seen` [B, V] where `where` (same shape) is true."""
        if seen is None:
            return None
        # A scatter per row (vmap: the rows are the scatter's batching dimension, so a batch split over devices
        # stays local; one scatter over (row, token) index pairs made the partitioner gather the table).
        mark = lambda row, ids, flags: row.at[ids].max(flags, mode="drop")  # noqa: E731
        return jax.vmap(mark)(seen, tokens.reshape(batch, -1), where.reshape(batch, -1))

    # The decode loop runs in phases whose caches grow with the response (when the model can grow one): a
    # step attends over its phase's slots, not over every slot of the longest response.
    phase_ends = decode_phase_ends(max_new_tokens) if hasattr(model, "grow_cache") else (max_new_tokens,)
    cache = model.init_cache(batch, prompt_len + phase_ends[0])  # the model's compute dtype
    # The prefill samples from the last column only: skip the LM head elsewhere when the model can.
    last_only = {"head_at": "last"} if _accepts_keyword(model.apply, "head_at") else {}
    out = model.apply(params, prompt_ids, prompt_mask, cache=cache, lora=lora, **last_only)
    vocab = out.logits.shape[-1]
    # The repetition penalty's memory: which tokens each row's sequence holds (the prompt's real tokens).
    seen = None if repetition_penalty is None else see(jnp.zeros((batch, vocab), bool), prompt_ids, prompt_mask > 0)
    tokens, logprobs = sample(0, out.logits[:, -1], seen)
    seen = see(seen, tokens, jnp.ones((batch,), bool))
    stopped = _is_stop(tokens, stop_token_ids)
    response_ids = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(tokens)
    response_logprobs = jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logprobs)
    lengths = jnp.ones((batch,), jnp.int32)

    # Loop state: (step, cache, last token, response ids, log-probs, lengths, stopped, seen tokens or None). Step t
    # samples column t and writes the token of step t - 1 at slot prompt_len + t - 1: a phase ending at step e
    # needs prompt_len + e - 1 slots.
    def keep_going(end):
        def condition(state):
            step, *_, stopped, _ = state
            return (step < end) & ~jnp.all(stopped)

        return condition

    def decode(state):
        step, cache, last, response_ids, response_logprobs, lengths, stopped, seen = state
        live = ~stopped  # rows still generating write this column; stopped rows keep pad and 0
        out = model.apply(params, last[:, None], live[:, None].astype(jnp.int32), cache=cache, lora=lora)
        tokens, logprobs = sample(step, out.logits[:, -1], seen)
        response_ids = response_ids.at[:, step].set(jnp.where(live, tokens, pad_token_id))
        response_logprobs = response_logprobs.at[:, step].set(jnp.where(live, logprobs, 0.0))
        lengths = lengths + live.astype(jnp.int32)
        seen = see(seen, tokens, live)
        stopped = stopped | _is_stop(tokens, stop_token_ids)
        return step + 1, out.cache, tokens, response_ids, response_logprobs, lengths, stopped, seen

    state = (jnp.int32(1), out.cache, tokens, response_ids, response_logprobs, lengths, stopped, seen)
    for phase, end in enumerate(phase_ends):
        if phase:
            state = (state[0], model.grow_cache(state[1], prompt_len + end), *state[2:])
        state = jax.lax.while_loop(keep_going(end), decode, state)
    _, _, _, response_ids, response_logprobs, lengths, stopped, _ = state
    response_mask = (jnp.arange(max_new_tokens)[None, :] < lengths[:, None]).astype(jnp.int32)
    return Rollout(response_ids, response_mask, response_logprobs, lengths, stopped)


DECODE_PHASE_STEPS = 64  # a decode phase covers at least this many steps
DECODE_PHASES_MAX = 4  # each phase is one more copy of the decode step in the compiled program


def decode_phase_ends(max_new_tokens: int) -> tuple[int, ...]:
    """The steps at which the rollout's decode phases end (the last is `max_new_tokens`): up to
    `DECODE_PHASES_MAX` equal phases of at least `DECODE_PHASE_STEPS` steps, so short responses keep one loop.

    A decode step's attention reads every slot of its cache, valid or not; with the cache sized for the longest
    response, a step at the start of a long response read mostly empty slots (at 256 new tokens after 16 prompt
    tokens, doubling the slots made the benchmark's rollout 50 % slower: attention is half its time there).
    With four phases each step reads at most its phase's end: ~37 % fewer slots read in all when the prompt is
    short against the response.
    """
    phases = max(1, min(DECODE_PHASES_MAX, max_new_tokens // DECODE_PHASE_STEPS))
    return tuple(round(max_new_tokens * (i + 1) / phases) for i in range(phases))


def repetition_penalty_or_none(value: jax.Array | float | None) -> jax.Array | float | None:
    """None for no penalty (None, or a concrete 1: the program then carries no seen-token state), else the
    value; a concrete value <= 0 or not finite is a ValueError."""
    if value is None or isinstance(value, jax.core.Tracer):
        return value
    number = float(np.asarray(value))
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1: off); found {number}")
    return None if number == 1.0 else value


def _merge_adapters_for_sampling(params, lora) -> bool:
    """Whether `rollout` samples from merged weights: ppojax LoRA adapters over float32 params."""
    return isinstance(lora, Lora) and all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


_rollout_compiled = jax.jit(rollout, static_argnames=ROLLOUT_STATIC_ARGNAMES)


_ROLLOUT_SIGNATURE = inspect.signature(rollout)


def rollout_jit(*args, **kwargs) -> Rollout:
    """`rollout` (same arguments), compiled once per (model, max_new_tokens, top_k, prompt shape, number of
    stop ids).

    The traced scalars are converted to fixed-dtype arrays and every argument is passed, so a Python float, a
    NumPy scalar or an omitted default reuse one program (plain `jax.jit` retraces on each of those).
    """
    arguments = _ROLLOUT_SIGNATURE.bind(*args, **kwargs)
    arguments.apply_defaults()
    call = arguments.arguments
    call["temperature"] = jnp.asarray(call["temperature"], jnp.float32)
    call["top_p"] = jnp.asarray(call["top_p"], jnp.float32)
    call["stop_token_ids"] = jnp.asarray(call["stop_token_ids"], jnp.int32).reshape(-1)
    call["pad_token_id"] = jnp.asarray(call["pad_token_id"], jnp.int32)
    penalty = repetition_penalty_or_none(call["repetition_penalty"])
    call["repetition_penalty"] = None if penalty is None else jnp.asarray(penalty, jnp.float32)
    return _rollout_compiled(**call)


rollout_jit.__signature__ = _ROLLOUT_SIGNATURE


# ----------------------------------------------------------------------------------------------------------
# Teacher-forced scoring


def _forward(model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora, **options):
    """One pass over prompt + response ([B, P + N]); returns the model output. `options`: extra keywords for
    `model.apply` (e.g. `head_at`)."""
    chex.assert_rank([prompt_ids, prompt_mask, response_ids, response_mask], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    chex.assert_equal_shape([response_ids, response_mask])
    input_ids = jnp.concatenate([jnp.asarray(prompt_ids, jnp.int32), jnp.asarray(response_ids, jnp.int32)], axis=1)
    attention_mask = jnp.concatenate(
        [jnp.asarray(prompt_mask, jnp.int32), jnp.asarray(response_mask, jnp.int32)], axis=1
    )
    return model.apply(params, input_ids, attention_mask, lora=lora, **options)


def _require_head(output, function: str, head: str) -> None:
    if output is None:
        raise ValueError(f"{function} needs a model with head={head!r}; this model's output has no such head")


def _response_slice(x: jax.Array, prompt_len: int, response_len: int) -> jax.Array:
    """Columns P-1 .. P+N-2 of [B, P+N, ...]: the outputs at the position that predicts each response token."""
    return x[:, prompt_len - 1 : prompt_len + response_len - 1]


def _response_outputs(model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora, field, function):
    """(last hidden state, head output `field` ("logits" / "values")), both at the response positions: columns
    P-1 .. P+N-2, `_response_slice`. When `model.apply` takes `head_at`, the model computes only those columns
    past its last layer's keys and values: the LM head's matmul over the prompt columns (and the backward of
    slicing its output) is skipped, and so is most of the last layer's work there."""
    prompt_len, response_len = prompt_ids.shape[1], response_ids.shape[1]
    at_columns_only = _accepts_keyword(model.apply, "head_at")
    options = {"head_at": slice(prompt_len - 1, prompt_len + response_len - 1)} if at_columns_only else {}
    out = _forward(model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora, **options)
    head_out = getattr(out, field)
    _require_head(head_out, function, {"logits": "lm", "values": "value"}[field])
    hidden = getattr(out, "hidden", None)  # test fakes may have none
    if at_columns_only:
        return hidden, head_out
    if hidden is not None:
        hidden = _response_slice(hidden, prompt_len, response_len)
    return hidden, _response_slice(head_out, prompt_len, response_len)


def response_logprobs(
    model, params, prompt_ids, prompt_mask, response_ids, response_mask, temperature, lora=None
) -> jax.Array:
    """[B, N] float32: log softmax(logits / T)[response token] (T = 0 → untempered), 0 where masked."""
    _, logits = _response_outputs(
        model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora, "logits", "response_logprobs"
    )
    logprobs = sampling.token_logprobs(logits, jnp.asarray(response_ids, jnp.int32), temperature)
    return jnp.where(jnp.asarray(response_mask) > 0, logprobs, 0.0)


def response_values(
    model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora=None, value_mask=None
) -> jax.Array:
    """[B, N] float32: the value head at the state before each response token (TRL's alignment), 0 outside
    `value_mask` (default: the response mask).

    value_mask: [B, N] the slots whose values are kept. A convention whose value function is trained one slot
    past the response (TRL: `masks_for(convention, response_mask)[1]`) needs the value there: the state
    after the stop token, i.e. the head at the stop token's own column, a real position of the sequence.
    """
    _, values = _response_outputs(
        model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora, "values", "response_values"
    )
    values = values.astype(jnp.float32)
    return jnp.where(_keep_mask(value_mask, response_mask, "response_values"), values, 0.0)


def _keep_mask(value_mask, response_mask, where: str) -> jax.Array:
    """value_mask (default response_mask) as bool, checked against the response shape."""
    if value_mask is None:
        return jnp.asarray(response_mask) > 0
    if jnp.shape(value_mask) != jnp.shape(response_mask):
        raise ValueError(
            f"{where}: value_mask has shape {tuple(jnp.shape(value_mask))}; expected the response shape "
            f"{tuple(jnp.shape(response_mask))}"
        )
    return jnp.asarray(value_mask) > 0


def sequence_reward(model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora=None) -> jax.Array:
    """[B] float32: the reward head at the last real token of prompt + response (found from the masks)."""
    out = _forward(model, params, prompt_ids, prompt_mask, response_ids, response_mask, lora)
    _require_head(out.scores, "sequence_reward", "reward")
    mask = jnp.concatenate([jnp.asarray(prompt_mask), jnp.asarray(response_mask)], axis=1) > 0
    last = mask.shape[1] - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.take_along_axis(out.scores, last[:, None], axis=1)[:, 0].astype(jnp.float32)


def behaviour_as_old_logprobs(behaviour_logprobs, response_mask, where: str) -> jax.Array:
    """The rollout's behaviour log-probs as float32 old log-probs, 0 where `response_mask` is 0."""
    behaviour_logprobs = jnp.asarray(behaviour_logprobs)
    if behaviour_logprobs.shape != jnp.shape(response_mask):
        raise ValueError(
            f"{where}: old_logprobs has shape {behaviour_logprobs.shape}; expected the response shape "
            f"{tuple(jnp.shape(response_mask))} (the rollout's behaviour log-probs)"
        )
    return jnp.where(jnp.asarray(response_mask) > 0, behaviour_logprobs.astype(jnp.float32), 0.0)


def score(
    policy_model,
    policy_params,
    prompt_ids,
    prompt_mask,
    response_ids,
    response_mask,
    *,
    temperature,
    critic_model,
    critic_params,
    reward_model,
    reward_params,
    ref_params=None,
    lora=None,
    old_logprobs=None,
    value_mask=None,
) -> Scores:
    """Old log-probs, reference log-probs, values and reward scores of a rollout, in float32.

    The reference is the policy model with `lora=None`: with LoRA adapters, `ref_params` may be omitted and
    the base `policy_params` serve as the reference (no second copy); without LoRA, pass `ref_params`.
    old_logprobs: the rollout's behaviour log-probs [B, N] to use as the old log-probs instead of a
      teacher-forced policy pass (TRL's choice: one forward pass fewer; they agree with the pass to ≤ 1e-5 in
      float32, see `rollout`); zeroed where the response is masked.
    value_mask: [B, N] the slots whose values are kept (default: the response mask). Pass the convention's
      value mask (`masks_for(convention, response_mask)[1]`): TRL's convention trains the value one slot past
      each stopped response, and a zero there instead of the critic's value changes its GAE and value loss.
    """
    if ref_params is None and lora is None:
        raise ValueError(
            "score: ref_params is None and lora is None, so the reference would be the policy itself; "
            "pass the frozen reference params (or train with LoRA, where the base params are the reference)"
        )
    ref_params = policy_params if ref_params is None else ref_params
    batch = (prompt_ids, prompt_mask, response_ids, response_mask)
    if old_logprobs is None:
        logprobs = response_logprobs(policy_model, policy_params, *batch, temperature, lora=lora)
    else:
        logprobs = behaviour_as_old_logprobs(old_logprobs, response_mask, "score")
    return Scores(
        logprobs=logprobs,
        ref_logprobs=response_logprobs(policy_model, ref_params, *batch, temperature),
        values=response_values(critic_model, critic_params, *batch, value_mask=value_mask),
        scores=sequence_reward(reward_model, reward_params, *batch),
    )
