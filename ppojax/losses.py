"""The PPO policy and value losses over masked `[B, T]` tokens."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ppojax.stats import (
    SumCount,
    as_bool_mask,
    as_f32,
    check_same_shape,
    masked_count,
    masked_max,
    masked_mean,
    masked_sum,
    masked_var,
    safe_divide,
)

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "micro-token-mean",
)

Stats = Dict[str, jax.Array]


def aggregate_loss(per_token: jax.Array, mask: jax.Array, mode: str = "token-mean") -> SumCount:
    """Reduce per-token losses to one scalar, kept as a (sum, count) pair.

    mode:
      "token-mean":               Σ_valid l / (number of valid tokens)            every token weighs the same
      "seq-mean-token-mean":      Σ_rows mean_t(l) / (rows with a valid token)    every sequence weighs the same
      "seq-mean-token-sum":       Σ_rows Σ_t l / (rows with a valid token)
      "seq-mean-token-sum-norm":  Σ_valid l / (rows with a valid token · T)       Dr. GRPO's constant normaliser
      "micro-token-mean":         (mean_valid l, 1)  per call                    TRL 0.x / LLaMA-Factory
    The pair's `.value()` is the loss; summing pairs across micro-batches (split by rows) or devices before
    dividing gives exactly the loss of the whole batch — except for "micro-token-mean", which is defined by
    its split: each call (one micro-batch of the training step) contributes its token mean with weight 1, so
    the sum over micro-batches is the mean of their token means. That is TRL 0.x's PPOTrainer (what
    LLaMA-Factory runs): every micro-batch back-propagates its own masked mean and accelerate averages over
    the accumulation steps. Without micro-batches it equals "token-mean".
    """
    mask = as_bool_mask(mask)
    if mode == "token-mean":
        return SumCount(masked_sum(per_token, mask), masked_count(mask))
    if mode == "micro-token-mean":
        count = masked_count(mask)
        return SumCount(safe_divide(masked_sum(per_token, mask), count), (count > 0).astype(jnp.float32))
    row_sums = masked_sum(per_token, mask, axis=-1)
    row_counts = masked_count(mask, axis=-1)
    rows = jnp.sum(row_counts > 0, dtype=jnp.float32)
    if mode == "seq-mean-token-mean":
        return SumCount(jnp.sum(safe_divide(row_sums, row_counts)), rows)
    if mode == "seq-mean-token-sum":
        return SumCount(jnp.sum(row_sums), rows)
    if mode == "seq-mean-token-sum-norm":
        return SumCount(jnp.sum(row_sums), rows * mask.shape[-1])
    raise ValueError(f"aggregate_loss: mode must be one of {LOSS_AGGREGATIONS}, got {mode!r}")


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """[..., V] logits -> [...] entropy of softmax(logits), float32."""
    logp = jax.nn.log_softmax(as_f32(logits), axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def clipped_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    dual_clip: Optional[float] = None,
    log_ratio_clamp: Optional[float] = None,
    entropy_coef: float = 0.0,
    logits: Optional[jax.Array] = None,
    aggregation: str = "token-mean",
    as_sum_count: bool = False,
) -> Tuple[jax.Array | SumCount, Stats]:
    """PPO clipped surrogate, to minimise.

        ρ_t  = exp(logprobs_t − old_logprobs_t)
        l_t  = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε_high))
        dual clip (A_t < 0 only, c > 1):  l_t = min(l_t, −c A_t)
        loss = aggregate(l) − entropy_coef · aggregate(H)

    Args:
      logprobs: [B, T] log π_θ(a_t) of the current policy (differentiated).
      old_logprobs: [B, T] log-probs of the behaviour policy at rollout time.
      advantages: [B, T] (usually whitened).
      mask: [B, T] valid tokens.
      clip_eps: ε, the lower clip (and the upper one unless `clip_eps_high` is given).
      clip_eps_high: ε_high for asymmetric clipping ("clip-higher").
      dual_clip: c > 1 bounds the loss of negative-advantage tokens at −c·A (verl uses 3).
      log_ratio_clamp: clamp logprobs − old_logprobs to [−c, c] before exp (verl uses 20).
      entropy_coef: entropy bonus weight; needs `logits` ([B, T, V], already divided by the temperature).
      aggregation: see `aggregate_loss`.
      as_sum_count: return the loss as a `SumCount` pair instead of a scalar.

    Returns:
      (loss, stats) with masked stats: clipfrac (tokens where the clipped branch is taken), clipfrac_lower
      (its part with ρ < 1 − ε), dual_clipfrac, approx_kl (mean of ½(log ρ)², as in OpenAI's and TRL's
      "approxkl"), ratio_mean, ratio_max, and entropy when logits are given.
    """
    check_same_shape(
        "clipped_loss", rank=2, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    if logits is not None and jnp.shape(logits)[:-1] != jnp.shape(mask):
        raise ValueError(f"clipped_loss: logits has shape {jnp.shape(logits)}; expected {jnp.shape(mask)} + (vocab,)")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"clipped_loss: dual_clip must be > 1, got {dual_clip}")
    if entropy_coef and logits is None:
        raise ValueError("clipped_loss: entropy_coef needs `logits` ([B, T, V])")
    mask = as_bool_mask(mask)
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    # Padding may hold anything (NaN, inf): select it away before any arithmetic touches it.
    log_ratio = jnp.where(mask, as_f32(logprobs) - as_f32(old_logprobs), 0.0)
    if log_ratio_clamp is not None:
        log_ratio = jnp.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    advantages = jnp.where(mask, as_f32(advantages), 0.0)
    ratio = jnp.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = jnp.maximum(unclipped, clipped)
    stats: Stats = {
        "clipfrac": masked_mean(clipped > unclipped, mask),
        "clipfrac_lower": masked_mean((clipped > unclipped) & (ratio < 1.0 - eps_low), mask),
    }
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (per_token > bound)
        per_token = jnp.where(dual_active, bound, per_token)
        stats["dual_clipfrac"] = masked_mean(dual_active, mask)

    loss = aggregate_loss(per_token, mask, aggregation)
    stats["pg_loss"] = loss.value()
    if logits is not None:
        entropy = entropy_from_logits(logits)
        stats["entropy"] = masked_mean(entropy, mask)
        if entropy_coef:
            bonus = aggregate_loss(entropy, mask, aggregation)
            loss = SumCount(loss.total - entropy_coef * bonus.total, loss.count)
    stats["approx_kl"] = masked_mean(0.5 * log_ratio * log_ratio, mask)
    stats["ratio_mean"] = masked_mean(ratio, mask)
    stats["ratio_max"] = masked_max(ratio, mask)
    return (loss if as_sum_count else loss.value()), stats


def value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: Optional[float] = 0.2,
    aggregation: str = "token-mean",
    as_sum_count: bool = False,
) -> Tuple[jax.Array | SumCount, Stats]:
    """Clipped value loss, to minimise.

        l_t = ½ · max((V_t − R_t)², (clip(V_t, V_old,t − ε, V_old,t + ε) − R_t)²)

    Args:
      values: [B, T] current critic predictions V (differentiated).
      old_values: [B, T] predictions at rollout time.
      returns: [B, T] GAE returns.
      mask: [B, T] valid tokens (TRL's convention uses `extend_mask` of the response mask here).
      clip_eps: ε_v; None disables clipping (then l_t = ½ (V_t − R_t)²).
      aggregation: see `aggregate_loss`.
      as_sum_count: return the loss as a `SumCount` pair.

    Returns:
      (loss, stats): vf_clipfrac (tokens where the clipped term is the larger), explained_variance
      (1 − Var[R − V] / Var[R] over valid tokens; 0 when Var[R] is 0), value_mean, returns_mean.
    """
    check_same_shape("value_loss", rank=2, values=values, old_values=old_values, returns=returns, mask=mask)
    mask = as_bool_mask(mask)
    values = jnp.where(mask, as_f32(values), 0.0)
    returns = jnp.where(mask, as_f32(returns), 0.0)
    unclipped = jnp.square(values - returns)
    stats: Stats = {}
    if clip_eps is None:
        per_token = 0.5 * unclipped
        stats["vf_clipfrac"] = jnp.zeros((), jnp.float32)
    else:
        old_values = jnp.where(mask, as_f32(old_values), 0.0)
        clipped = jnp.square(jnp.clip(values, old_values - clip_eps, old_values + clip_eps) - returns)
        per_token = 0.5 * jnp.maximum(unclipped, clipped)
        stats["vf_clipfrac"] = masked_mean(clipped > unclipped, mask)
    loss = aggregate_loss(per_token, mask, aggregation)
    returns_var = masked_var(returns, mask, unbiased=False)
    stats["vf_loss"] = loss.value()
    stats["explained_variance"] = jnp.where(
        returns_var > 0, 1.0 - safe_divide(masked_var(returns - values, mask, unbiased=False), returns_var), 0.0
    )
    stats["value_mean"] = masked_mean(values, mask)
    stats["returns_mean"] = masked_mean(returns, mask)
    return (loss if as_sum_count else loss.value()), stats
