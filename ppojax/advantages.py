"""Generalized advantage estimation over masked `[B, T]` token sequences."""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from ppojax.stats import as_bool_mask, as_f32, check_same_shape


def compute_gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float,
    lam: float,
) -> Tuple[jax.Array, jax.Array]:
    """GAE(γ, λ), computed right to left over the valid tokens of each row.

    For consecutive valid positions t < t' (t' the next valid position after t):
        δ_t = r_t + γ · V_{t'} − V_t
        A_t = δ_t + γλ · A_{t'}
    and after the last valid token V = 0 and A = 0. Masked positions are skipped by the recursion, so a
    mask with holes links the valid tokens on either side of the hole (as verl does); for a right-padded
    mask this is the usual GAE with a zero value after the last token.

    Args:
      rewards: [B, T] per-token rewards.
      values: [B, T] value estimates V_t (the critic's, from the rollout).
      mask: [B, T] 1 for valid tokens. NaN/inf at masked positions never reaches a valid output.
      gamma: discount γ.
      lam: GAE λ.

    Returns:
      (advantages, returns), both [B, T] float32, 0 at masked positions, with
      returns = advantages + values computed from the advantages before any whitening.
    """
    check_same_shape("compute_gae", rank=2, rewards=rewards, values=values, mask=mask)
    mask = as_bool_mask(mask)
    rewards = jnp.where(mask, as_f32(rewards), 0.0)
    values = jnp.where(mask, as_f32(values), 0.0)
    gamma = jnp.asarray(gamma, rewards.dtype)
    lam = jnp.asarray(lam, rewards.dtype)

    def step(carry, inputs):
        next_value, next_advantage = carry
        reward, value, valid = inputs
        delta = reward + gamma * next_value - value
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(valid, value, next_value), jnp.where(valid, advantage, next_advantage))
        return carry, jnp.where(valid, advantage, 0.0)

    batch = rewards.shape[0]
    init = (jnp.zeros((batch,), rewards.dtype), jnp.zeros((batch,), rewards.dtype))
    # Scan over time with [T, B] slices.
    _, advantages = jax.lax.scan(step, init, (rewards.T, values.T, mask.T), reverse=True)
    advantages = advantages.T
    returns = jnp.where(mask, advantages + values, 0.0)
    return advantages, returns
