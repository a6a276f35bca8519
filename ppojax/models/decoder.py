"""One configurable Flax (linen) decoder for the Llama, Qwen2, Qwen3 and GPT-2 families, with LM, value
and reward heads and an explicit KV cache.

`DecoderModel` is a frozen, hashable dataclass (config, head, dtype): pass it as a static argument to
`jax.jit`. Its `apply(params, input_ids, attention_mask, *, cache, lora, positions, head_at)` is pure over a plain
nested-dict params pytree; nothing is stored in the model. No dropout anywhere.

Params layout (one path per tensor; `hf.py` maps these to Hugging Face names):

    embed/embedding [V, H]              pos_embed/embedding [P, H]        (learned positions, GPT-2)
    layers_{i}/attn_norm/{scale, bias}  layers_{i}/mlp_norm/{scale, bias} (bias only for LayerNorm)
    layers_{i}/attn/{q, k, v, o}/{kernel [in, out], bias}                  (Llama / Qwen families)
    layers_{i}/attn/{qkv, o}/{kernel, bias}                                (GPT-2: fused q/k/v)
    layers_{i}/attn/{q_norm, k_norm}/scale [head_dim]                      (Qwen3)
    layers_{i}/mlp/{gate, up, down}/{kernel, bias}                         (GPT-2: up = c_fc, down = c_proj)
    final_norm/{scale, bias}
    lm_head/kernel [H, V]      (head="lm", untied only; tied models use embed/embedding)
    value_head/kernel [H, 1]   (head="value", zero-initialised)
    score/kernel [H, 1]        (head="reward", HF `score.weight`)
    {value_head, score}/bias [1]  (config.head_bias only: a LLaMA-Factory / TRL `v_head.summary.bias`)

Positions come from the attention mask: `position = valid tokens before it (cache included)`, so a
left-padded row and the same row unpadded give the same logits at real tokens.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import itertools
import math
import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ppojax.models.config import ModelConfig
from ppojax.models.rope import apply_rope, rope_cos_sin

HEADS = ("lm", "value", "reward")
_INIT_STD = 0.02


class KVCache(NamedTuple):
    """Decoding state, one pytree. For layer l, `keys[l]`: `[B, num_kv_heads, head_dim, max_length]` (keys
    transposed) and `values[l]`: `[B, num_kv_heads, max_length, head_dim]`, the layouts whose attention
    products are plain matmuls (see `attend_cached`); `index`: int32 scalar, the next slot written (shared by
    all rows); `mask`: `[B, max_length]` bool, True at slots holding real tokens (left padding and finished
    rows stay False)."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    index: jax.Array
    mask: jax.Array


class ModelOutput(NamedTuple):
    """`logits [B, S, V]` (compute dtype, head="lm"), `values [B, S]` float32 (head="value"),
    `scores [B, S]` float32 per-token reward (head="reward"), with S = 1 under `apply(..., head_at="last")` and
    S = stop - start under `head_at=slice(start, stop)`; `hidden [B, S, H]` the last hidden state after the final
    norm at the same columns as the head, `cache` the updated KVCache (None when none was given; every column's
    keys and values, whatever `head_at`)."""

    logits: jax.Array | None
    values: jax.Array | None
    scores: jax.Array | None
    hidden: jax.Array
    cache: KVCache | None


_normal = nn.initializers.normal(_INIT_STD)

# Optional sharding of activations: `ppojax.parallel.activation_sharding` sets hook(x, logical_axes) -> x while
# a sharded program is traced; without it `constrain` is the identity.
ACTIVATION_HOOK = contextvars.ContextVar("ppojax_activation_hook", default=None)


def constrain(x, *logical_axes):
    hook = ACTIVATION_HOOK.get()
    return x if hook is None else hook(x, logical_axes)


def _matmul(x, kernel):
    """`x [..., in] @ kernel [in, out]` as one 2-D dot over the flattened rows. Same values as `jnp.dot`; the
    reason is the backward: for a 3-D x, the kernel gradient contracts two row axes and XLA's CPU layout
    assignment then copies the (larger) output gradient transposed, `[out, B·S]`, for every such dot; over 2-D
    rows it reads both operands in place. Measured on the benchmark's gated MLP (`[3072, 256]` rows, 688):
    forward + backward ≈ 17 % less CPU time."""
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


# A decode step on CPU with at most this many rows per device runs its projections weights-major; see `project`.
WEIGHTS_MAJOR_MAX_ROWS = 32


def project(x, kernel=None, *, kernel_t=None):
    """`x @ kernel` (x `[..., K]`, kernel `[K, N]`, or `kernel_t` `[N, K]` = its transpose, as the tied
    embedding is stored).

    A decode step on CPU multiplies a few rows (the batch) by every weight matrix. The CPU matmul library
    repacks its right-hand operand on every call, so `x @ kernel` repacks all the weights at every step; as
    `(kernel_t @ xᵀ)ᵀ` the weights are the left operand, read in place, and only xᵀ (a few rows) is packed:
    ~25 % less CPU per projection at 32 rows, a whole rollout −9 to −13 % (`BUILD_NOTES.md`, Rollout); at 64 rows
    it is 1–5 % slower. The transposed kernel is loop-invariant (XLA hoists it out of the decode loop) and the
    optimisation barriers keep XLA's dot canonicalisation from folding the transposes back into `x @ kernel`.
    Used on the CPU backend when x has one column (`[B, 1, K]`) and at most `WEIGHTS_MAJOR_MAX_ROWS` rows per
    device (rows / `jax.device_count()`: a jitted function sees global shapes, so this assumes the batch is split
    over every device, as the data-parallel rollout does); elsewhere the plain product (`_matmul`). Same result
    either way (up to summation order).
    """
    rows = math.prod(x.shape[:-1])
    decode_step = x.ndim >= 2 and x.shape[-2] == 1 and rows <= WEIGHTS_MAJOR_MAX_ROWS * jax.device_count()
    if not decode_step or jax.default_backend() != "cpu":
        return _matmul(x, kernel_t.T if kernel is None else kernel)
    barrier = jax.lax.optimization_barrier
    weights = barrier(kernel.T) if kernel_t is None else kernel_t
    y_t = barrier(jnp.dot(weights, barrier(x.reshape(rows, x.shape[-1]).T)))
    return y_t.T.reshape(*x.shape[:-1], weights.shape[0])


class _Dense(nn.Module):
    features: int
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self, x, lora=None):
        kernel = self.param("kernel", _normal, (x.shape[-1], self.features), self.dtype)
        y = project(x, kernel.astype(self.dtype))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), self.dtype).astype(self.dtype)
        if lora is not None:
            adapter, scale = lora
            y = y + _matmul(_matmul(x, adapter["a"].astype(self.dtype)), adapter["b"].astype(self.dtype)) * scale
        return y


class _DenseParams(nn.Module):
    """The params of a `_Dense` (same names, shapes and initialisers), returned instead of applied, so that
    several projections of one input can run as one matmul (`_dense_group`)."""

    in_features: int
    features: int
    use_bias: bool
    dtype: Any

    @nn.compact
    def __call__(self):
        kernel = self.param("kernel", _normal, (self.in_features, self.features), self.dtype)
        bias = None
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        return kernel, bias


def _dense_group(x, params, loras, dtype):
    """Several `_Dense` projections of the same x, as one matmul over their concatenated kernels (one larger
    dot instead of several small ones is faster on CPU). params: [(kernel, bias or None)], loras: matching
    (adapter, scale) or None. Returns the outputs, split back."""
    kernel = jnp.concatenate([k.astype(dtype) for k, _ in params], axis=1)
    y = project(x, kernel)
    if params[0][1] is not None:
        y = y + jnp.concatenate([b.astype(dtype) for _, b in params]).astype(dtype)
    sizes = [k.shape[1] for k, _ in params]
    outs = jnp.split(y, list(itertools.accumulate(sizes))[:-1], axis=-1)
    for i, lora in enumerate(loras):
        if lora is not None:
            adapter, scale = lora
            outs[i] = outs[i] + _matmul(_matmul(x, adapter["a"].astype(dtype)), adapter["b"].astype(dtype)) * scale
    return outs


class _Norm(nn.Module):
    kind: str  # "rms" | "layer"
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x):
        size = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (size,), self.dtype)
        x32 = x.astype(jnp.float32)
        if self.kind == "rms":
            # As transformers: normalise in float32, cast back, then multiply by the weight.
            normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return scale.astype(self.dtype) * normed.astype(self.dtype)
        bias = self.param("bias", nn.initializers.zeros, (size,), self.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def _activation(name: str, x):
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    return jax.nn.gelu(x, approximate=True)  # gelu_new / gelu_pytorch_tanh: the tanh approximation


def attend(q, k, v, q_slots, k_slots, k_valid, scale):
    """Causal attention over slots. q `[B, S, Hq, D]`, k/v `[B, T, Hkv, D]`; q_slots `[S]`, k_slots `[T]`
    int32 slot numbers; k_valid `[B, T]` bool. A query sees valid keys at slots <= its own. Softmax in
    float32; a query with no visible key (a pad position) gets a finite, meaningless output.

    Computed head-major, with one explicit transpose per operand: per KV head, the G query heads' rows (g, s)
    stacked into one `[G·S, D]` matrix against `[T, D]` keys and values, so both products (and their
    backward) are plain batched matmuls. Written as einsums over `[B, S, Hkv, G, D]`, XLA inserted a transposed
    copy around every product in the forward and backward instead: ≈ 25 % more CPU time for this function's
    forward + backward at the benchmark's training shape (64 rows × 48, 4 heads, 2 KV heads, head dim 64)."""
    batch, seq, num_heads, head_dim = q.shape
    num_kv, length = k.shape[2], k.shape[1]
    group = num_heads // num_kv
    q = q.reshape(batch, seq, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv, group * seq, head_dim)  # rows (g, s) per KV head
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D]
    logits = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32) * scale
    visible = k_valid[:, None, :] & (k_slots[None, :] <= q_slots[:, None])[None]  # [B, S, T]
    visible = jnp.broadcast_to(visible[:, None, None], (batch, 1, group, seq, length))
    logits = jnp.where(visible.reshape(batch, 1, group * seq, length), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, v)  # [B, Hkv, G * S, D]
    out = out.reshape(batch, num_kv, group, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, num_heads * head_dim)


def attend_cached(q, keys_t, values, q_slots, k_slots, k_valid, scale):
    """`attend` over the KV cache's layout: q `[B, S, Hq, D]`, keys_t `[B, Hkv, D, T]` (transposed),
    values `[B, Hkv, T, D]`; returns `[B, S, Hq * D]`. Both products are plain batched matmuls over the stored
    layout: q·k contracts D against the keys' rows and probs·v T against the values' rows, so the library dot
    packs nothing (with `[B, T, Hkv, D]` keys it transposed every layer's cache on every decode step: ≈ 3×
    the CPU time of this attention at batch 32, 48 slots)."""
    batch, seq, num_heads, head_dim = q.shape
    num_kv = keys_t.shape[1]
    group = num_heads // num_kv
    # Query rows (g, s) per KV head; a bitcast when S = 1.
    q = q.reshape(batch, seq, num_kv, group, head_dim).transpose(0, 2, 3, 1, 4)
    q = q.reshape(batch, num_kv, group * seq, head_dim)
    logits = jnp.einsum("bkqd,bkdt->bkqt", q, keys_t, preferred_element_type=jnp.float32) * scale
    visible = k_valid[:, None, :] & (k_slots[None, :] <= q_slots[:, None])[None]  # [B, S, T]
    visible = jnp.broadcast_to(visible[:, None, None], (batch, 1, group, seq, visible.shape[-1]))
    logits = jnp.where(visible.reshape(batch, 1, group * seq, -1), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, values)  # [B, Hkv, G * S, D]
    out = out.reshape(batch, num_kv, group, seq, head_dim).transpose(0, 3, 1, 2, 4)
    return out.reshape(batch, seq, num_heads * head_dim)


class _Attention(nn.Module):
    """Self-attention. With `query_columns = (start, stop)` only those columns are queries (the output is
    `[B, stop - start, H]`), while every column's keys and values are computed (and cached): the last layer
    needs no more when the head runs at a few columns only (`apply(head_at=...)`)."""

    config: ModelConfig
    layer_index: int
    dtype: Any
    query_columns: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, cos, sin, slots, layer_cache, lora):
        cfg = self.config
        batch, seq, _ = x.shape
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        lora = lora or {}
        columns = slice(None) if self.query_columns is None else slice(*self.query_columns)
        if cfg.fused_qkv:
            qkv = _Dense(q_size + 2 * kv_size, cfg.qkv_bias, self.dtype, name="qkv")(x, lora.get("qkv"))
            q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
            q = q[:, columns]
        else:
            hidden = x.shape[-1]
            params = [
                _DenseParams(hidden, size, cfg.qkv_bias, self.dtype, name=name)()
                for name, size in (("q", q_size), ("k", kv_size), ("v", kv_size))
            ]
            loras = [lora.get(name) for name in "qkv"]
            if self.query_columns is None:
                q, k, v = _dense_group(x, params, loras, self.dtype)
            else:
                (q,) = _dense_group(x[:, columns], params[:1], loras[:1], self.dtype)
                k, v = _dense_group(x, params[1:], loras[1:], self.dtype)
        q = q.reshape(batch, q.shape[1], cfg.num_heads, cfg.head_dim)
        k = k.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(batch, seq, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = _Norm("rms", cfg.norm_eps, self.dtype, name="q_norm")(q)
            k = _Norm("rms", cfg.norm_eps, self.dtype, name="k_norm")(k)
        if cfg.position == "rope":
            q, k = apply_rope(q, cos[:, columns], sin[:, columns]), apply_rope(k, cos, sin)
        q_slots, k_slots, k_valid, write_index = slots
        q_slots = q_slots[columns]
        scale = cfg.head_dim**-0.5
        if cfg.attn_scale_by_layer:
            scale /= self.layer_index + 1
        if layer_cache is None:
            out = attend(q, k, v, q_slots, k_slots, k_valid, scale)
        else:
            cache_k, cache_v = layer_cache  # [B, Hkv, D, T] and [B, Hkv, T, D]
            k = k.transpose(0, 2, 3, 1).astype(cache_k.dtype)
            v = v.transpose(0, 2, 1, 3).astype(cache_v.dtype)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k, (0, 0, 0, write_index))
            cache_v = jax.lax.dynamic_update_slice(cache_v, v, (0, 0, write_index, 0))
            layer_cache = (cache_k, cache_v)
            keys_t, values = cache_k.astype(self.dtype), cache_v.astype(self.dtype)
            out = attend_cached(q, keys_t, values, q_slots, k_slots, k_valid, scale)
        return _Dense(cfg.hidden_size, cfg.o_bias, self.dtype, name="o")(out, lora.get("o")), layer_cache


class _Mlp(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, lora):
        cfg = self.config
        lora = lora or {}
        if cfg.gated_mlp:
            params = [
                _DenseParams(x.shape[-1], cfg.intermediate_size, cfg.mlp_bias, self.dtype, name=name)()
                for name in ("gate", "up")
            ]
            gate, up = _dense_group(x, params, [lora.get("gate"), lora.get("up")], self.dtype)
            hidden = _activation(cfg.activation, gate) * up
        else:
            up = _Dense(cfg.intermediate_size, cfg.mlp_bias, self.dtype, name="up")(x, lora.get("up"))
            hidden = _activation(cfg.activation, up)
        return _Dense(cfg.hidden_size, cfg.mlp_bias, self.dtype, name="down")(hidden, lora.get("down"))


class _Block(nn.Module):
    """A pre-norm decoder layer; with `query_columns` its output is those columns only (see `_Attention`)."""

    config: ModelConfig
    layer_index: int
    dtype: Any
    query_columns: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, cos, sin, slots, layer_cache, lora):
        cfg = self.config
        lora = lora or {}
        attn_in = _Norm(cfg.norm, cfg.norm_eps, self.dtype, name="attn_norm")(x)
        attn_out, layer_cache = _Attention(cfg, self.layer_index, self.dtype, self.query_columns, name="attn")(
            attn_in, cos, sin, slots, layer_cache, lora.get("attn")
        )
        if self.query_columns is not None:
            x = x[:, slice(*self.query_columns)]
        x = x + attn_out
        mlp_in = _Norm(cfg.norm, cfg.norm_eps, self.dtype, name="mlp_norm")(x)
        return x + _Mlp(cfg, self.dtype, name="mlp")(mlp_in, lora.get("mlp")), layer_cache


class _Decoder(nn.Module):
    config: ModelConfig
    head: str
    dtype: Any
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, positions, slots, layer_caches, lora, head_at="all", rope_table_size=None):
        cfg = self.config
        embedding = _Weight("embedding", (cfg.vocab_size, cfg.hidden_size), _normal, self.dtype, name="embed")()
        x = jnp.take(embedding, input_ids, axis=0).astype(self.dtype)
        cos = sin = None
        if cfg.position == "learned":
            table = _Weight(
                "embedding", (cfg.max_position_embeddings, cfg.hidden_size), _normal, self.dtype, name="pos_embed"
            )()
            x = x + jnp.take(table, positions, axis=0).astype(self.dtype)
        else:
            cos, sin = rope_cos_sin(cfg, positions, rope_table_size)
        x = constrain(x, "batch", "length", "embed_act")
        lora = lora or {}
        new_caches = []
        # The head's columns: the last layer computes only those (plus every column's keys and values); the
        # layers below it feed the last layer's keys and values, so they run at every column.
        seq = input_ids.shape[1]
        if head_at == "last":
            head_columns = (seq - 1, seq)
        elif isinstance(head_at, slice):
            head_columns = head_at.indices(seq)[:2]
        else:
            head_columns = None
        # Gradient checkpointing: a rematerialised block keeps only its input for the backward pass.
        block = nn.remat(_Block) if self.remat else _Block
        for i in range(cfg.num_layers):
            layer_cache = None if layer_caches is None else layer_caches[i]
            query_columns = head_columns if i == cfg.num_layers - 1 else None
            x, layer_cache = block(cfg, i, self.dtype, query_columns, name=f"layers_{i}")(
                x, cos, sin, slots, layer_cache, lora.get(f"layers_{i}")
            )
            x = constrain(x, "batch", "length", "embed_act")
            new_caches.append(layer_cache)
        if head_columns is not None and cfg.num_layers == 0:
            x = x[:, slice(*head_columns)]
        hidden = _Norm(cfg.norm, cfg.norm_eps, self.dtype, name="final_norm")(x)
        if self.head == "lm":
            if cfg.tie_word_embeddings:
                return hidden, project(hidden, kernel_t=embedding.astype(self.dtype)), new_caches
            kernel = _Weight("kernel", (cfg.hidden_size, cfg.vocab_size), _normal, self.dtype, name="lm_head")()
            return hidden, project(hidden, kernel.astype(self.dtype)), new_caches
        # A scalar head: the critic's starts at zero, the reward model's is always loaded.
        name, initializer = ("value_head", nn.initializers.zeros) if self.head == "value" else ("score", _normal)
        head_params = _ScalarHead(cfg.hidden_size, cfg.head_bias, initializer, self.dtype, name=name)()
        return hidden, values_from_hidden(head_params, hidden), new_caches


class _Weight(nn.Module):
    """A module holding one named parameter, for the nesting `embed/embedding`, `lm_head/kernel`, ..."""

    param_name: str
    shape: tuple[int, ...]
    initializer: Any
    dtype: Any

    @nn.compact
    def __call__(self):
        return self.param(self.param_name, self.initializer, self.shape, self.dtype)


class _ScalarHead(nn.Module):
    """The value / reward head's params: `kernel [H, 1]`, and `bias [1]` (zero-initialised) if `bias`."""

    hidden_size: int
    bias: bool
    initializer: Any
    dtype: Any

    @nn.compact
    def __call__(self) -> dict:
        head = {"kernel": self.param("kernel", self.initializer, (self.hidden_size, 1), self.dtype)}
        if self.bias:
            head["bias"] = self.param("bias", nn.initializers.zeros, (1,), self.dtype)
        return head


def values_from_hidden(head_params: dict, hidden: jax.Array) -> jax.Array:
    """A scalar head on the last hidden state: `{"kernel": [H, 1]}` (and `"bias": [1]` if the config has
    `head_bias`), hidden `[B, S, H]` -> `[B, S]` float32. The value model (`head="value"`), the reward model
    (`head="reward"`) and a value head on a policy's shared trunk (`values_from_hidden(value_head,
    policy_out.hidden)`) all use this."""
    kernel = head_params["kernel"].astype(jnp.float32)
    values = jnp.dot(hidden.astype(jnp.float32), kernel)[..., 0]
    if "bias" in head_params:
        values = values + head_params["bias"].astype(jnp.float32)[0]
    return values


def init_value_head(config: ModelConfig, dtype=jnp.float32) -> dict:
    """Zero-initialised value head params `{"kernel": [H, 1]}` (plus `"bias": [1]` when `config.head_bias`),
    for a value head on a shared trunk."""
    head = {"kernel": jnp.zeros((config.hidden_size, 1), dtype)}
    if config.head_bias:
        head["bias"] = jnp.zeros((1,), dtype)
    return head


def positions_from_mask(attention_mask: jax.Array, valid_before: jax.Array | None = None) -> jax.Array:
    """`[B, S] int32`: valid tokens before each position (cache included), pads clipped to 0."""
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.cumsum(mask, axis=-1) - 1
    if valid_before is not None:
        positions = positions + valid_before[:, None]
    return jnp.maximum(positions, 0)


@dataclasses.dataclass(frozen=True)
class DecoderModel:
    """A decoder definition: static, hashable, holds no arrays. `dtype` is the compute and parameter
    dtype (stored by name, e.g. "float32", "bfloat16")."""

    config: ModelConfig
    head: str = "lm"
    dtype: str = "float32"
    remat: bool = False  # gradient checkpointing of each decoder block (same params, same outputs)

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, found {self.head!r}")
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype).name)

    def _module(self) -> _Decoder:
        return _Decoder(self.config, self.head, jnp.dtype(self.dtype), self.remat)

    def apply(
        self,
        params,
        input_ids,
        attention_mask=None,
        *,
        cache: KVCache | None = None,
        lora=None,
        positions=None,
        head_at: str = "all",
    ) -> ModelOutput:
        """input_ids `[B, S] int32`, attention_mask `[B, S]` (1 = real token; default all ones).

        Without a cache, attention is causal over this input with pads masked out. With a cache (from
        `init_cache`), the S new tokens are written at slots `[cache.index, cache.index + S)` and attend
        to every valid slot up to their own: apply a left-padded prompt to an empty cache (prefill), then
        `[B, 1]` tokens (decode; mask 0 for finished rows). `positions` default: from the masks.
        `lora`: adapters from `init_lora` (None = base model, e.g. the reference policy).
        The cache must have room: `cache.index + S <= max_length` (not checked; the index is traced).
        `head_at`: "all" (default) applies the head (logits, values or scores) at every column; "last" only at
        the last column, giving `[B, 1, ...]` (a prefill needs just that one: it skips the head's matmul over
        the other columns); a `slice(start, stop)` of columns (static ints, step 1) only there, giving
        `[B, stop - start, ...]` (teacher-forced scoring and training need the logits at the response
        positions only, so the LM head never runs on prompt columns). `hidden` is at the same columns as the
        head: the last layer computes only those columns' outputs (and every column's keys and values, so a
        cache is filled as with "all"), which spares most of that layer's work at the other columns.
        """
        if isinstance(head_at, slice):
            _check_head_slice(head_at, jnp.shape(input_ids)[-1])
        elif head_at not in ("all", "last"):
            raise ValueError(f"head_at must be 'all', 'last' or a slice of columns, found {head_at!r}")
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, S], found shape {input_ids.shape}")
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        if jnp.shape(attention_mask) != (batch, seq):
            raise ValueError(f"attention_mask shape {jnp.shape(attention_mask)} != input_ids shape {(batch, seq)}")
        if cache is not None and cache.mask.shape[0] != batch:
            raise ValueError(f"cache batch {cache.mask.shape[0]} != input batch {batch}")
        new_valid = jnp.asarray(attention_mask).astype(bool)
        if cache is None:
            slots = (jnp.arange(seq), jnp.arange(seq), new_valid, None)
            layer_caches = None
            valid_before = None
        else:
            index = cache.index
            valid_before = jnp.sum(cache.mask, axis=-1, dtype=jnp.int32)
            mask = jax.lax.dynamic_update_slice(cache.mask, new_valid, (0, index))
            max_length = cache.mask.shape[1]
            slots = (index + jnp.arange(seq), jnp.arange(max_length), mask, index)
            layer_caches = list(zip(cache.keys, cache.values))
        # Positions from the masks stay below the slot count, so RoPE can read cos / sin from a table that size.
        rope_table_size = None
        if positions is None:
            positions = positions_from_mask(attention_mask, valid_before)
            rope_table_size = slots[1].shape[0]
        lora_tree = None if lora is None else lora.per_module()
        hidden, head_out, new_caches = self._module().apply(
            {"params": params}, input_ids, positions, slots, layer_caches, lora_tree, head_at, rope_table_size
        )
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                keys=tuple(k for k, _ in new_caches),
                values=tuple(v for _, v in new_caches),
                index=cache.index + seq,
                mask=slots[2],
            )
        return ModelOutput(
            logits=head_out if self.head == "lm" else None,
            values=head_out if self.head == "value" else None,
            scores=head_out if self.head == "reward" else None,
            hidden=hidden,
            cache=new_cache,
        )

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache: zeros, `index` 0, no valid slot."""
        cfg = self.config
        dtype = jnp.dtype(dtype or self.dtype)
        keys_shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, max_length)
        values_shape = (batch_size, cfg.num_kv_heads, max_length, cfg.head_dim)
        return KVCache(
            keys=tuple(jnp.zeros(keys_shape, dtype) for _ in range(cfg.num_layers)),
            values=tuple(jnp.zeros(values_shape, dtype) for _ in range(cfg.num_layers)),
            index=jnp.zeros((), jnp.int32),
            mask=jnp.zeros((batch_size, max_length), bool),
        )

    def grow_cache(self, cache: KVCache, max_length: int) -> KVCache:
        """`cache` with room for `max_length` slots: the new slots are empty (zeros, not valid), the filled ones
        and `index` unchanged. Lets a decode loop attend over a window that grows with the response instead of
        every slot of the longest one (`ppojax.generation.rollout`)."""
        slots = cache.mask.shape[1]
        if max_length < slots:
            raise ValueError(f"grow_cache: max_length {max_length} < the cache's {slots} slots; a cache only grows")
        extra = max_length - slots
        pad = lambda x, axis: jnp.pad(x, [(0, extra if i == axis else 0) for i in range(x.ndim)])  # noqa: E731
        return KVCache(
            keys=tuple(pad(k, 3) for k in cache.keys),
            values=tuple(pad(v, 2) for v in cache.values),
            index=cache.index,
            mask=pad(cache.mask, 1),
        )

    def param_shapes(self) -> dict:
        """The params pytree as `jax.ShapeDtypeStruct`s (no allocation; traced once per model)."""
        return _param_shapes(self)

    def init_params(self, key: jax.Array) -> dict:
        """Random params (normal(0.02) kernels and embeddings, unit norms, zero biases, zero value head)."""
        ids = jnp.zeros((1, 1), jnp.int32)
        slots = (jnp.arange(1), jnp.arange(1), jnp.ones((1, 1), bool), None)
        return self._module().init(key, ids, jnp.zeros((1, 1), jnp.int32), slots, None, None)["params"]


def _check_head_slice(columns: slice, seq: int) -> None:
    """A `head_at` slice must be static, step 1, and select at least one of the `seq` columns."""
    bounds = (columns.start, columns.stop)
    if not all(b is None or isinstance(b, numbers.Integral) for b in bounds) or columns.step not in (None, 1):
        raise ValueError(f"head_at slice must have int (static) start / stop and step 1, found {columns!r}")
    if not range(seq)[columns]:
        raise ValueError(f"head_at slice {columns!r} selects no column of an input of length {seq}")


@functools.lru_cache(maxsize=64)
def _param_shapes(model: DecoderModel) -> dict:
    return jax.eval_shape(model.init_params, jax.random.key(0))


def init_params(model: DecoderModel | ModelConfig, key: jax.Array) -> dict:
    """Random params for `model` (a ModelConfig means `DecoderModel(config)`, an fp32 LM), for demos and
    tests; see `DecoderModel.init_params`."""
    if isinstance(model, ModelConfig):
        model = DecoderModel(model)
    return model.init_params(key)


def score_index(input_ids: jax.Array, pad_token_id: int | None) -> jax.Array:
    """`[B] int32`: where transformers' ForSequenceClassification reads the score: the rightmost token that
    is not `pad_token_id` (index 0 for an all-pad row). With no pad id, transformers reads the last column
    (and refuses a batch > 1); here every row reads the last column, right for left-padded input."""
    batch, seq = input_ids.shape
    if pad_token_id is None:
        return jnp.full((batch,), seq - 1, jnp.int32)
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.argmax(jnp.arange(seq, dtype=jnp.int32) * not_pad, axis=-1).astype(jnp.int32)


def sequence_scores(model: DecoderModel, params, input_ids, attention_mask=None, *, lora=None) -> jax.Array:
    """`[B] float32`: the reward model's score of each sequence, read where transformers reads it."""
    if model.head not in ("reward", "value"):
        raise ValueError(f"sequence_scores needs a head='reward' (or 'value') model, found {model.head!r}")
    out = model.apply(params, input_ids, attention_mask, lora=lora)
    per_token = out.scores if model.head == "reward" else out.values
    index = score_index(jnp.asarray(input_ids), model.config.pad_token_id)
    return jnp.take_along_axis(per_token, index[:, None], axis=-1)[:, 0]
