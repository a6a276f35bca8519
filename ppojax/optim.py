"""Optimizers for PPO: PyTorch-style AdamW, TF-style Adam, global-norm clipping, learning-rate schedules.

PPO_DETAILS item 21. With raw moments m_t, v_t after t steps (m_0 = v_0 = 0):

    PyTorch / optax Adam:  Δ = −lr · m̂ / (√v̂ + ε)                  m̂ = m_t / (1 − β1^t), v̂ = v_t / (1 − β2^t)
    TF Adam:               Δ = −lr · √(1 − β2^t) / (1 − β1^t) · m_t / (√v_t + ε)

The two differ only in where ε sits relative to the bias correction: TF's ε is PyTorch's ε · √(1 − β2^t),
so with the same ε the PyTorch form takes much larger steps while v_t is still small (early training).
OpenAI's lm-human-preferences used TF's form.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

ADAM_STYLES = ("pytorch", "tf")
SCHEDULES = ("constant", "linear", "cosine")


class ScaleByTFAdamState(NamedTuple):
    count: jax.Array  # int32 steps taken
    mu: optax.Updates
    nu: optax.Updates


def scale_by_tf_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """TF-style Adam direction (ε outside the bias correction), without the learning rate.

    updates_t = √(1 − β2^t) / (1 − β1^t) · m_t / (√v_t + ε); chain with `optax.scale_by_learning_rate`.
    Moments keep the dtype of the params.
    """

    def init(params):
        zeros = lambda p: jnp.zeros_like(p)
        return ScaleByTFAdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: (b1 * m + (1.0 - b1) * g).astype(m.dtype), updates, state.mu)
        nu = jax.tree.map(lambda g, v: (b2 * v + (1.0 - b2) * jnp.square(g)).astype(v.dtype), updates, state.nu)
        count = state.count + 1
        t = count.astype(jnp.float32)
        step_scale = jnp.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        out = jax.tree.map(lambda m, v: (step_scale * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
        return out, ScaleByTFAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """One optimizer: Adam (PyTorch or TF style) with decoupled weight decay, clipping and a schedule.

    schedule: "constant" (after warmup) or "linear" (after warmup, linearly to 0 at `total_steps`).
    warmup_steps: linear warmup from 0 (step 0 has lr 0, as transformers' schedules).
    max_grad_norm: clip by global norm before Adam; None disables.
    weight_decay: decoupled (AdamW: p ← p − lr · weight_decay · p), on the parameters `decay_mask` selects.
    """

    learning_rate: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    adam: str = "pytorch"
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0

    def __post_init__(self):
        if self.adam not in ADAM_STYLES:
            raise ValueError(f"OptimizerConfig.adam must be one of {ADAM_STYLES}, got {self.adam!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.schedule in ("linear", "cosine") and self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"OptimizerConfig: schedule {self.schedule!r} needs total_steps > warmup_steps, got {self.total_steps} "
                f"and {self.warmup_steps}"
            )


def make_schedule(config: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """step -> learning rate (float32).

    warmup (step < W):  lr · step / W
    constant:           lr
    linear:             lr · max(0, (total − step) / (total − W))
    cosine:             lr · ½ (1 + cos(π · min(1, (step − W) / (total − W))))   (transformers' cosine, half a cycle)
    """
    lr, warmup = config.learning_rate, config.warmup_steps
    after = optax.constant_schedule(lr)
    if config.schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, config.total_steps - warmup)
    elif config.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, config.total_steps - warmup)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def decay_mask(params):
    """True for the parameters weight decay applies to: all but biases and normalisation weights.

    transformers' `Trainer.get_decay_parameter_names` (which LLaMA-Factory's trainers use) leaves out every HF
    parameter name matching bias / layernorm / rmsnorm / norm; in ppojax's names those are the leaves called
    `bias` and everything under a module whose name ends in `norm` (attn_norm, mlp_norm, final_norm, q_norm,
    k_norm). Embeddings, kernels, heads and LoRA matrices decay. A bare array (no names) decays.
    """

    def decays(path, _):
        names = [_key_name(k) for k in path]
        return not (names and names[-1] == "bias") and not any(n.endswith("norm") for n in names[:-1])

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """clip by global norm → Adam (PyTorch or TF form) → decoupled weight decay (`decay_mask`) → −schedule(step)."""
    parts = []
    if config.max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    if config.adam == "pytorch":
        parts.append(optax.scale_by_adam(config.b1, config.b2, config.eps))
    else:
        parts.append(scale_by_tf_adam(config.b1, config.b2, config.eps))
    if config.weight_decay:
        parts.append(optax.add_decayed_weights(config.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(make_schedule(config)))
    return optax.chain(*parts)
