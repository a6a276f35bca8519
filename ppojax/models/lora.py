"""LoRA adapters as a separate pytree: the base params stay frozen and are shared with the reference
model, which is the same params applied with `lora=None`.

A projection `W [in, out]` becomes `W + scale * a @ b` with `a [in, rank]` uniform(±1/sqrt(in)) (PEFT's
default bound) and `b [rank, out]` zero, so a fresh adapter leaves the model unchanged; `scale =
alpha / rank`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# Projection names per layer, as (sub-module, module) in the params tree.
_PROJECTIONS = {
    "q": ("attn", "q"),
    "k": ("attn", "k"),
    "v": ("attn", "v"),
    "o": ("attn", "o"),
    "gate": ("mlp", "gate"),
    "up": ("mlp", "up"),
    "down": ("mlp", "down"),
}
ALL_TARGETS = tuple(_PROJECTIONS)


@struct.dataclass
class Lora:
    """`adapters` mirrors the params tree down to the adapted modules, each `{"a", "b"}`; `scale` is
    static (not a leaf), so an optimizer over this pytree trains only `a` and `b`."""

    adapters: dict
    scale: float = struct.field(pytree_node=False)

    def per_module(self) -> dict:
        """The adapters tree with each module's `{"a", "b"}` paired with `scale`, as the model reads it."""

        def pair(tree):
            if set(tree) == {"a", "b"}:
                return (tree, self.scale)
            return {name: pair(sub) for name, sub in tree.items()}

        return pair(self.adapters)


def resolve_targets(model, targets) -> tuple[tuple[str, str], ...]:
    """Target names -> (sub-module, module) pairs present in this family. GPT-2's fused `c_attn` is our
    `qkv`: any of "q", "k", "v" selects it (one adapter on all three); its `c_fc` / MLP `c_proj` are
    "up" / "down" and its attention `c_proj` is "o"; it has no "gate"."""
    names = ALL_TARGETS if targets == "all" else ((targets,) if isinstance(targets, str) else tuple(targets))
    fused = model.config.fused_qkv
    resolved = []
    for name in names:
        if name not in _PROJECTIONS and not (fused and name == "qkv"):
            raise ValueError(f"unknown LoRA target {name!r}; choose from {ALL_TARGETS} or 'all'")
        if fused and name in ("q", "k", "v", "qkv"):
            pair = ("attn", "qkv")
        elif name == "gate" and not model.config.gated_mlp:
            if targets == "all":
                continue
            raise ValueError(f"LoRA target 'gate': {model.config.model_type} has no gate projection")
        else:
            pair = _PROJECTIONS[name]
        if pair not in resolved:
            resolved.append(pair)
    return tuple(resolved)


def init_lora(
    model, key: jax.Array, *, rank: int = 8, alpha: float = 16.0, targets=("q", "v"), dtype=jnp.float32
) -> Lora:
    """Adapters of `rank` on `targets` (names from `ALL_TARGETS`, or "all") in every layer; b = 0."""
    shapes = model.param_shapes()
    adapters: dict = {}
    pairs = resolve_targets(model, targets)
    keys = iter(jax.random.split(key, model.config.num_layers * len(pairs)))
    for layer in range(model.config.num_layers):
        for sub, module in pairs:
            fan_in, fan_out = shapes[f"layers_{layer}"][sub][module]["kernel"].shape
            bound = 1.0 / fan_in**0.5
            a = jax.random.uniform(next(keys), (fan_in, rank), dtype, -bound, bound)
            adapters.setdefault(f"layers_{layer}", {}).setdefault(sub, {})[module] = {
                "a": a,
                "b": jnp.zeros((rank, fan_out), dtype),
            }
    return Lora(adapters=adapters, scale=alpha / rank)


def merge_lora(model, params: dict, lora: Lora) -> dict:
    """params with every adapted kernel replaced by `W + scale * a @ b` (in float32, cast back to W's
    dtype). The input params are not modified."""
    del model  # the adapters tree already names the kernels

    def merge(param_tree, adapter_tree):
        out = dict(param_tree)
        for name, sub in adapter_tree.items():
            if set(sub) == {"a", "b"}:
                kernel = param_tree[name]["kernel"]
                delta = lora.scale * jnp.dot(sub["a"].astype(jnp.float32), sub["b"].astype(jnp.float32))
                out[name] = {**param_tree[name], "kernel": (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)}
            else:
                out[name] = merge(param_tree[name], sub)
        return out

    return merge(params, lora.adapters)
