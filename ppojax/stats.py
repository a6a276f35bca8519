"""Masked reductions and whitening over `[B, T]` arrays.

Conventions used across ppojax:
  * `mask` is 1.0 (or True) on valid tokens and 0.0 on padding; any non-zero value counts as valid.
  * Reductions select with `jnp.where`, never multiply by the mask, so NaN or inf at masked positions
    never reaches a result (NaN * 0 is NaN).
  * Every count is guarded: an empty mask gives 0, not a division by zero.
  * Math is float32 whatever the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

Axis = Optional[Union[int, Sequence[int]]]


def check_same_shape(fn_name: str, rank: Optional[int] = None, **arrays) -> None:
    """Raise a one-line ValueError unless all arrays share one shape (of the given rank).

    Example message: "compute_gae: values has shape (2, 4) but rewards has shape (2, 5); expected equal [B, T] arrays".
    """
    names = list(arrays)
    shapes = {name: jnp.shape(arrays[name]) for name in names}
    first = names[0]
    if rank is not None:
        for name in names:
            if len(shapes[name]) != rank:
                raise ValueError(f"{fn_name}: {name} has shape {shapes[name]}; expected a rank-{rank} array")
    for name in names[1:]:
        if shapes[name] != shapes[first]:
            raise ValueError(
                f"{fn_name}: {name} has shape {shapes[name]} but {first} has shape {shapes[first]}; expected equal shapes"
            )


def as_f32(x: jax.Array) -> jax.Array:
    """`x` as float32 (bf16 / fp16 inputs are upcast; float64 stays float64 only under x64)."""
    x = jnp.asarray(x)
    return (
        x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if jnp.issubdtype(x.dtype, jnp.floating)
        else x.astype(jnp.float32)
    )


def as_bool_mask(mask: jax.Array) -> jax.Array:
    """Boolean view of a 0/1 (or bool) mask."""
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != 0


def masked_sum(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Sum of `x` over valid positions; masked entries (even NaN) contribute 0."""
    return jnp.sum(jnp.where(as_bool_mask(mask), as_f32(x), 0.0), axis=axis)


def masked_count(mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Number of valid positions, as float32."""
    return jnp.sum(as_bool_mask(mask), axis=axis, dtype=jnp.float32)


def safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def masked_mean(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Mean of `x` over valid positions; 0 when there are none."""
    return safe_divide(masked_sum(x, mask, axis), masked_count(mask, axis))


def masked_var(x: jax.Array, mask: jax.Array, axis: Axis = None, *, unbiased: bool = True) -> jax.Array:
    """Variance over valid positions.

    unbiased=True applies Bessel's correction n / (n - 1) (TRL, verl); unbiased=False is the population
    variance (TF's `nn.moments`, OpenRLHF). With fewer than two valid entries the Bessel form falls back to
    the population variance (which is 0 for one entry), and an empty mask gives 0.
    """
    mask = as_bool_mask(mask)
    mean = masked_mean(x, mask, axis)
    mean = mean if axis is None else jnp.expand_dims(mean, axis)
    centred = jnp.where(mask, as_f32(x) - mean, 0.0)
    count = masked_count(mask, axis)
    var = safe_divide(jnp.sum(centred * centred, axis=axis), count)
    if unbiased:
        var = var * jnp.where(count > 1, count / jnp.maximum(count - 1.0, 1.0), 1.0)
    return var


def masked_max(x: jax.Array, mask: jax.Array, axis: Axis = None) -> jax.Array:
    """Max over valid positions; 0 when there are none."""
    mask = as_bool_mask(mask)
    best = jnp.max(jnp.where(mask, as_f32(x), -jnp.inf), axis=axis)
    return jnp.where(jnp.any(mask, axis=axis), best, 0.0)


def whiten(
    x: jax.Array,
    mask: jax.Array,
    *,
    shift_mean: bool = True,
    unbiased: bool = True,
    eps: float = 1e-8,
    eps_mode: str = "add",
) -> jax.Array:
    """Masked standardisation over all valid positions of `x`.

    whitened = (x - mean) / sqrt(var + eps)            (eps_mode="add": TRL, verl, OpenAI)
    whitened = (x - mean) / sqrt(max(var, eps))        (eps_mode="max": OpenRLHF)
    With shift_mean=False the mean is added back (TRL's reward whitening). Masked positions are 0.

    Args:
      x: [B, T] (any shape) values.
      mask: same shape, valid positions.
      unbiased: Bessel-corrected variance (True) or population variance (False).
    """
    check_same_shape("whiten", x=x, mask=mask)
    mask = as_bool_mask(mask)
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=unbiased)
    if eps_mode == "add":
        inv_std = jax.lax.rsqrt(var + eps)
    elif eps_mode == "max":
        inv_std = jax.lax.rsqrt(jnp.maximum(var, eps))
    else:
        raise ValueError(f"whiten: eps_mode must be 'add' or 'max', got {eps_mode!r}")
    whitened = (as_f32(x) - mean) * inv_std
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask, whitened, 0.0)


class SumCount(NamedTuple):
    """A masked aggregate kept as numerator and denominator.

    Summing SumCounts over micro-batches or devices and dividing at the end gives exactly the aggregate of
    the whole batch, which a mean of means does not.
    """

    total: jax.Array
    count: jax.Array

    def value(self) -> jax.Array:
        return safe_divide(self.total, self.count)

    def __add__(self, other: "SumCount") -> "SumCount":  # type: ignore[override]
        return SumCount(self.total + other.total, self.count + other.count)
