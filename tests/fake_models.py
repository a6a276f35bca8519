"""FAKE language models for the rollout tests. They are not ppojax.models.

They follow the `ppojax.models` apply / init_cache contract (left-padded input, explicit cache with one shared
write index and a per-slot validity mask, positions from the attention mask), which is all the rollout loop
and the scoring functions rely on, so the loop logic (stopping, padding, cache use, log-probs) can be tested
fast and independently of the real decoders. The real models are tested against transformers elsewhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class FakeCache:
    keys: jax.Array  # [B, L, D]
    mask: jax.Array  # [B, L] int32, 1 on valid slots
    index: jax.Array  # int32 scalar: the next slot to write


@struct.dataclass
class FakeOutput:
    logits: jax.Array  # [B, S, V]
    values: jax.Array  # [B, S]
    scores: jax.Array  # [B, S]
    cache: Any


@dataclasses.dataclass(frozen=True)
class BagOfWordsLM:
    """h_s = tanh(emb[x_s] + mean of emb over the valid tokens up to s + pos_emb[position_s]).

    logits = h @ out (+ lora["bias"] when lora is given); values = h @ value; scores = h @ score.
    Context-dependent, so a wrong cache, mask or position changes the logits.
    """

    vocab_size: int = 17
    dim: int = 8
    max_positions: int = 64

    def init(self, key):
        k = jax.random.split(key, 5)
        return {
            "emb": jax.random.normal(k[0], (self.vocab_size, self.dim)),
            "pos": 0.5 * jax.random.normal(k[1], (self.max_positions, self.dim)),
            "out": 2.0 * jax.random.normal(k[2], (self.dim, self.vocab_size)),
            "value": jax.random.normal(k[3], (self.dim,)),
            "score": jax.random.normal(k[4], (self.dim,)),
        }

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        return FakeCache(
            keys=jnp.zeros((batch_size, max_length, self.dim), dtype),
            mask=jnp.zeros((batch_size, max_length), jnp.int32),
            index=jnp.int32(0),
        )

    def apply(self, params, input_ids, attention_mask, *, cache=None, lora=None, positions=None):
        batch, length = input_ids.shape
        x = params["emb"][input_ids]
        store = cache if cache is not None else self.init_cache(batch, length, x.dtype)
        if positions is None:
            positions = store.mask.sum(-1, keepdims=True) + jnp.cumsum(attention_mask, -1) - 1
        keys = jax.lax.dynamic_update_slice(store.keys, x, (0, store.index, 0))
        mask = jax.lax.dynamic_update_slice(store.mask, attention_mask.astype(jnp.int32), (0, store.index))
        query_slot = store.index + jnp.arange(length)
        visible = (jnp.arange(keys.shape[1])[None, None, :] <= query_slot[None, :, None]) & (mask[:, None, :] > 0)
        context = jnp.einsum("bqk,bkd->bqd", visible.astype(x.dtype), keys)
        context = context / jnp.maximum(visible.sum(-1, keepdims=True), 1)
        h = jnp.tanh(x + context + params["pos"][jnp.clip(positions, 0, self.max_positions - 1)])
        logits = h @ params["out"]
        if lora is not None:
            logits = logits + lora["bias"]
        new_cache = FakeCache(keys=keys, mask=mask, index=store.index + length) if cache is not None else None
        return FakeOutput(logits=logits, values=h @ params["value"], scores=h @ params["score"], cache=new_cache)


@dataclasses.dataclass(frozen=True)
class TableLM:
    """Logits are a fixed table row, whatever the input: for distribution tests of the sampler in the loop."""

    vocab_size: int = 6

    def init_cache(self, batch_size, max_length, dtype=jnp.float32):
        return FakeCache(
            keys=jnp.zeros((batch_size, 1, 1), dtype), mask=jnp.zeros((batch_size, 1), jnp.int32), index=jnp.int32(0)
        )

    def apply(self, params, input_ids, attention_mask, *, cache=None, lora=None, positions=None):
        batch, length = input_ids.shape
        logits = jnp.broadcast_to(params["table"], (batch, length, self.vocab_size))
        zeros = jnp.zeros((batch, length))
        return FakeOutput(logits=logits, values=zeros, scores=zeros, cache=cache)
