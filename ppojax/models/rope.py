"""Rotary position embedding: inverse frequencies for the `default`, `linear`, `llama3` and `dynamic` rope
types, computed in float32 exactly as transformers 5.23 computes them (`modeling_rope_utils.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from ppojax.models.config import ModelConfig


def _base_inverse_frequencies(theta, dim: int, xp):
    exponents = xp.arange(0, dim, 2).astype(xp.float32) / xp.float32(dim)
    return 1.0 / (theta**exponents)


def static_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """`[head_dim // 2] float32` for the rope types whose frequencies do not depend on the input."""
    dim = config.head_dim
    inv_freq = _base_inverse_frequencies(np.float32(config.rope_theta), dim, np)
    if config.rope_type == "linear":
        return (inv_freq / np.float32(config.rope_factor)).astype(np.float32)
    if config.rope_type == "llama3":
        old_context = config.rope_original_max_position_embeddings
        low, high, factor = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > old_context / low, inv_freq / np.float32(factor), inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    return inv_freq.astype(np.float32)


def inverse_frequencies(config: ModelConfig, positions: jax.Array) -> jax.Array:
    """`[head_dim // 2] float32`. For `dynamic` (NTK) scaling the base grows with the longest position
    in this call, as transformers does per forward call (`seq_len = max(position_ids) + 1`)."""
    if config.rope_type != "dynamic":
        return jnp.asarray(static_inverse_frequencies(config))
    dim = config.head_dim
    factor = config.rope_factor
    max_len = config.max_position_embeddings
    seq_len = jnp.maximum(jnp.max(positions) + 1, max_len).astype(jnp.float32)
    base = config.rope_theta * ((factor * seq_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inverse_frequencies(base, dim, jnp)


def rope_cos_sin(
    config: ModelConfig, positions: jax.Array, table_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """positions `[B, S] int32` -> cos, sin `[B, S, head_dim] float32` (halves repeated, HF layout).

    With `table_size` (static; every position must be below it) and a rope type whose frequencies do not
    depend on the input, cos and sin are gathered from a `[table_size, head_dim]` constant table
    (`rope_table`): computed directly, XLA repeats the sin / cos inside every layer's fused rotation of q and
    k, which costs more than the decode step's attention on CPU.
    """
    if table_size is not None and config.rope_type != "dynamic":
        cos_table, sin_table = rope_table(config, table_size)
        return jnp.take(cos_table, positions, axis=0), jnp.take(sin_table, positions, axis=0)
    angles = positions[..., None].astype(jnp.float32) * inverse_frequencies(config, positions)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


@functools.lru_cache(maxsize=32)
def rope_table(config: ModelConfig, size: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin `[size, head_dim] float32` for positions 0 .. size - 1 (static rope types only): the angle
    `position * inverse frequency` rounded to float32 as transformers computes it, then cos / sin in float64,
    rounded once (deterministic, whatever XLA's own cos would give)."""
    angles = np.arange(size, dtype=np.float32)[:, None] * static_inverse_frequencies(config)[None, :]
    angles = np.concatenate([angles, angles], axis=-1).astype(np.float64)
    tables = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    for table in tables:
        table.setflags(write=False)  # shared by every caller through the cache
    return tables


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x `[B, S, heads, head_dim]`; rotation in float32, result in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
