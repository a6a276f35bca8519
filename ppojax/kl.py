"""KL estimators between the policy and the reference, and the KL-coefficient controllers."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ppojax.stats import as_bool_mask, as_f32, check_same_shape, masked_count, masked_mean, masked_sum, safe_divide

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
CONTROLLER_KL_MODES = ("seq_sum", "seq_mean", "token_mean")


def kl_penalty(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    *,
    estimator: str = "k1",
    mask: Optional[jax.Array] = None,
    clamp: Optional[float] = None,
) -> jax.Array:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of the sampled tokens.

    With d = logprobs − ref_logprobs (tokens sampled from π):
        k1  = d                      unbiased, can be negative per token
        k2  = d² / 2                 biased, non-negative
        k3  = exp(−d) − 1 + d        unbiased, non-negative, low variance (Schulman's k3)
        abs = |d|

    Args:
      logprobs: [B, T] log π(a_t) of the sampled tokens.
      ref_logprobs: [B, T] log π_ref(a_t).
      estimator: one of "k1", "k2", "k3", "abs".
      mask: optional [B, T]; masked positions are 0 in the output.
      clamp: optional bound c; the estimate is clipped to [−c, c] (OpenRLHF clamps every estimator to ±10,
        verl clamps k3 to ±10).

    Returns:
      [B, T] float32.
    """
    check_same_shape(
        "kl_penalty", logprobs=logprobs, ref_logprobs=ref_logprobs, **({} if mask is None else {"mask": mask})
    )
    d = as_f32(logprobs) - as_f32(ref_logprobs)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = jnp.expm1(-d) + d
    elif estimator == "abs":
        kl = jnp.abs(d)
    else:
        raise ValueError(f"kl_penalty: estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    if clamp is not None:
        kl = jnp.clip(kl, -clamp, clamp)
    if mask is not None:
        kl = jnp.where(as_bool_mask(mask), kl, 0.0)
    return kl


def kl_from_logits(
    logits: jax.Array,
    ref_logits: jax.Array,
    mask: Optional[jax.Array] = None,
    *,
    temperature: float = 1.0,
) -> jax.Array:
    """Exact per-token KL(π ‖ π_ref) = Σ_v π(v) (log π(v) − log π_ref(v)) over the full vocabulary.

    Args:
      logits: [B, T, V] policy logits. ref_logits: [B, T, V] reference logits.
      mask: optional [B, T]; masked positions are 0.
      temperature: both logit sets are divided by it before the softmax.

    Returns:
      [B, T] float32, ≥ 0 up to rounding.
    """
    check_same_shape("kl_from_logits", logits=logits, ref_logits=ref_logits)
    if mask is not None and jnp.shape(mask) != jnp.shape(logits)[:-1]:
        raise ValueError(
            f"kl_from_logits: mask has shape {jnp.shape(mask)}; expected {jnp.shape(logits)[:-1]} (logits without the vocab axis)"
        )
    logp = jax.nn.log_softmax(as_f32(logits) / temperature, axis=-1)
    ref_logp = jax.nn.log_softmax(as_f32(ref_logits) / temperature, axis=-1)
    # 0 · log 0 is 0: where π(v) underflows to 0 the term is dropped, not NaN from −inf − −inf.
    p = jnp.exp(logp)
    kl = jnp.sum(jnp.where(p > 0, p * (logp - ref_logp), 0.0), axis=-1)
    if mask is not None:
        kl = jnp.where(as_bool_mask(mask), kl, 0.0)
    return kl


def sequence_kl(kl: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-sequence KL: the sum of per-token estimates over valid tokens. [B, T] -> [B]."""
    return masked_sum(kl, mask, axis=-1)


def kl_for_controller(kl: jax.Array, mask: jax.Array, *, mode: str) -> jax.Array:
    """The scalar a KL controller is fed (and ppojax logs as `objective/controller_kl`).

    mode="seq_sum": the batch mean of per-sequence summed KL (OpenAI lm-human-preferences, old TRL; the
      classic target is 6 nats).
    mode="seq_mean": the batch mean of per-sequence token means (verl's `apply_kl_penalty`, OpenRLHF's
      per-sample `kl` info averaged over samples); rows without a valid token are left out.
    mode="token_mean": the mean over every valid token of the batch (long responses weigh more).
    The two means differ when response lengths differ.
    """
    if mode == "seq_sum":
        return jnp.mean(sequence_kl(kl, mask))
    if mode == "seq_mean":
        has_tokens = masked_count(mask, axis=-1) > 0
        per_sequence = jnp.where(has_tokens, masked_mean(kl, mask, axis=-1), 0.0)
        return safe_divide(jnp.sum(per_sequence), jnp.sum(has_tokens, dtype=jnp.float32))
    if mode == "token_mean":
        return masked_mean(kl, mask)
    raise ValueError(f"kl_for_controller: mode must be one of {CONTROLLER_KL_MODES}, got {mode!r}")


class KLControllerState(NamedTuple):
    """State of a KL controller: the current coefficient β."""

    coef: jax.Array


class KLController(NamedTuple):
    """An optax-style pair of pure functions.

    init() -> KLControllerState
    update(state, kl, n_steps) -> KLControllerState
    """

    init: Callable[[], KLControllerState]
    update: Callable[[KLControllerState, jax.Array, jax.Array], KLControllerState]


def fixed_kl_controller(coef: float) -> KLController:
    """β stays at `coef`."""

    def init() -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(coef, jnp.float32))

    def update(state: KLControllerState, kl: jax.Array, n_steps: jax.Array) -> KLControllerState:
        del kl, n_steps
        return state

    return KLController(init, update)


def adaptive_kl_controller(init_coef: float, target: float, horizon: float) -> KLController:
    """Ziegler et al. (2019) proportional controller.

        error = clip(kl / target − 1, −0.2, 0.2)
        β ← β · (1 + error · n_steps / horizon)

    `kl` is whatever measure the target is expressed in (see `kl_for_controller`); `n_steps` is the number
    of samples (sequences) in the batch the KL was measured on.
    """
    if target <= 0:
        raise ValueError(f"adaptive_kl_controller: target must be > 0, got {target}")
    if horizon <= 0:
        raise ValueError(f"adaptive_kl_controller: horizon must be > 0, got {horizon}")

    def init() -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(init_coef, jnp.float32))

    def update(state: KLControllerState, kl: jax.Array, n_steps: jax.Array) -> KLControllerState:
        error = jnp.clip(as_f32(kl) / target - 1.0, -0.2, 0.2)
        return KLControllerState(coef=state.coef * (1.0 + error * as_f32(n_steps) / horizon))

    return KLController(init, update)


def step_kl_controller(
    init_coef: float,
    target: float,
    *,
    high: float = 1.5,
    low: float = 0.5,
    increase: float = 1.5,
    decrease: float = 0.75,
) -> KLController:
    """The practitioners' step rule: a multiplicative jump when the KL leaves a band around the target.

        kl > high · target  ->  β ← increase · β      (defaults: 1.5 · target, β · 1.5)
        kl < low · target   ->  β ← decrease · β      (defaults: 0.5 · target, β · 0.75)
        otherwise           ->  β unchanged

    Unlike the proportional controller the step does not depend on the batch size (`n_steps` is ignored) and
    is large: a few iterations above the band multiply β by 1.5 each. `kl` is in the target's unit (see
    `kl_for_controller`). A KL that is not finite leaves β unchanged (NaN compares false both ways).
    """
    if target <= 0:
        raise ValueError(f"step_kl_controller: target must be > 0, got {target}")
    if not 0 <= low <= high:
        raise ValueError(f"step_kl_controller: need 0 <= low <= high, got low={low}, high={high}")
    if increase < 1 or not 0 < decrease <= 1:
        raise ValueError(
            f"step_kl_controller: need increase >= 1 and 0 < decrease <= 1, got increase={increase}, decrease={decrease}"
        )

    def init() -> KLControllerState:
        return KLControllerState(coef=jnp.asarray(init_coef, jnp.float32))

    def update(state: KLControllerState, kl: jax.Array, n_steps: jax.Array) -> KLControllerState:
        del n_steps
        kl = as_f32(kl)
        factor = jnp.where(kl > high * target, increase, jnp.where(kl < low * target, decrease, 1.0))
        return KLControllerState(coef=state.coef * factor.astype(jnp.float32))

    return KLController(init, update)


KL_RULES = ("proportional", "step")


def make_kl_controller(
    *, adaptive: bool, init_coef: float, target: float = 6.0, horizon: float = 10000.0, rule: str = "proportional"
) -> KLController:
    """The controller a configuration names: fixed β, or adaptive with the proportional (Ziegler) or step rule."""
    if not adaptive:
        return fixed_kl_controller(init_coef)
    if rule == "proportional":
        return adaptive_kl_controller(init_coef, target, horizon)
    if rule == "step":
        return step_kl_controller(init_coef, target)
    raise ValueError(f"make_kl_controller: rule must be one of {KL_RULES}, got {rule!r}")
