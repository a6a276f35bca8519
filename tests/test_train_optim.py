"""Optimizers and schedules (ppojax.optim) against numpy transcriptions of their formulas and torch."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from ppojax.optim import OptimizerConfig, make_optimizer, make_schedule, scale_by_tf_adam

B1, B2 = 0.9, 0.999


def _grads(steps, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, 4)).astype(np.float32) * (0.1 + i) for i in range(steps)]


def _run(tx, params, grads, jit):
    update = jax.jit(tx.update) if jit else tx.update
    state = tx.init(params)
    out = []
    for g in grads:
        updates, state = update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, updates)
        out.append(np.asarray(params))
    return out


def _numpy_adam(params, grads, lr, eps, style, weight_decay=0.0):
    """Both Adam forms, transcribed from torch.optim.AdamW's and tf.train.AdamOptimizer's docs."""
    p = np.asarray(params, np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    out = []
    for t, g in enumerate(grads, start=1):
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        if style == "pytorch":
            step = (m / (1 - B1**t)) / (np.sqrt(v / (1 - B2**t)) + eps)
        else:
            lr_t = np.sqrt(1 - B2**t) / (1 - B1**t)
            step = lr_t * m / (np.sqrt(v) + eps)
        p = p - lr * step - lr * weight_decay * p
        out.append(p)
    return out


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("style", ["pytorch", "tf"])
def test_adam_styles_match_their_formulas(style, jit):
    # A large ε makes the two forms differ visibly; the transcription must still match each to fp32 rounding.
    eps = 1e-3
    params = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)), jnp.float32)
    grads = [g * 1e-3 for g in _grads(6)]
    tx = make_optimizer(OptimizerConfig(learning_rate=0.01, adam=style, eps=eps, max_grad_norm=None))
    got = _run(tx, params, grads, jit)
    want = _numpy_adam(params, grads, 0.01, eps, style)
    other = _numpy_adam(params, grads, 0.01, eps, "tf" if style == "pytorch" else "pytorch")
    for g, w, o in zip(got, want, other):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
    assert np.abs(got[0] - other[0]).max() > 1e-4  # the other form is a different optimizer


def test_pytorch_style_adamw_matches_torch():
    params = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)
    grads = _grads(5, seed=3)
    tx = make_optimizer(OptimizerConfig(learning_rate=0.05, weight_decay=0.1, eps=1e-6, max_grad_norm=None))
    got = _run(tx, jnp.asarray(params), grads, jit=True)
    weight = torch.nn.Parameter(torch.tensor(params))
    opt = torch.optim.AdamW([weight], lr=0.05, betas=(B1, B2), eps=1e-6, weight_decay=0.1)
    for g, ours in zip(grads, got):
        weight.grad = torch.tensor(g)
        opt.step()
        np.testing.assert_allclose(ours, weight.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_tf_adam_transform_alone_is_the_tf_direction():
    tx = scale_by_tf_adam(B1, B2, eps=1e-8)
    g = jnp.asarray([[0.5, -2.0]])
    updates, state = jax.jit(tx.update)(g, tx.init(g))
    # First step: m = 0.1 g, v = 0.001 g², √(1-β2)/(1-β1) · m / (√v + ε) = g / (|g| + ε/√0.001). The
    # tolerance is float32's rounding of 1 − β2 (relative 1.3e-5, halved by the square root).
    g64 = np.asarray(g, np.float64)
    np.testing.assert_allclose(np.asarray(updates), g64 / (np.abs(g64) + 1e-8 / np.sqrt(1e-3)), rtol=1e-5)
    assert int(state.count) == 1


def test_gradient_clipping_by_global_norm():
    params = {"a": jnp.zeros((2,)), "b": jnp.zeros((3,))}
    grads = {"a": jnp.asarray([3.0, 0.0]), "b": jnp.asarray([0.0, 4.0, 0.0])}  # global norm 5
    # With lr 1 and plain SGD-like first Adam step the direction is sign(g): test the clipped grads directly.
    tx = optax.clip_by_global_norm(1.0)
    clipped, _ = tx.update(grads, tx.init(params))
    np.testing.assert_allclose(np.asarray(clipped["a"]), [0.6, 0.0], rtol=1e-6)
    # Inside make_optimizer the clip runs before Adam: huge and clipped gradients give the same first-step
    # moments ratio, but the second-moment state differs; check the state sees clipped gradients.
    tx = make_optimizer(OptimizerConfig(learning_rate=1.0, max_grad_norm=1.0))
    _, state = tx.update(grads, tx.init(params), params)
    adam_state = state[1]
    np.testing.assert_allclose(np.asarray(adam_state.mu["b"]), [0.0, 0.1 * 0.8, 0.0], rtol=1e-6)


def _hf_schedule(step, lr, kind, warmup, total):
    """transformers' get_constant_schedule_with_warmup / get_linear_schedule_with_warmup, transcribed."""
    if step < warmup:
        return lr * step / max(1, warmup)
    if kind == "constant":
        return lr
    return lr * max(0.0, (total - step) / max(1, total - warmup))


@pytest.mark.parametrize("kind,warmup", [("constant", 0), ("constant", 5), ("linear", 0), ("linear", 4)])
def test_schedules(kind, warmup):
    total = 20
    cfg = OptimizerConfig(learning_rate=0.3, schedule=kind, warmup_steps=warmup, total_steps=total)
    chex.clear_trace_counter()
    schedule = jax.jit(chex.assert_max_traces(make_schedule(cfg), n=1))
    for step in range(total + 3):
        np.testing.assert_allclose(
            float(schedule(jnp.int32(step))), _hf_schedule(step, 0.3, kind, warmup, total), rtol=1e-6, atol=0.3e-6
        )


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_cosine_schedule_is_transformers_cosine(warmup, jit):
    """Against transformers' own get_cosine_schedule_with_warmup (LLaMA-Factory's lr_scheduler_type: cosine)."""
    import torch
    import transformers

    total, lr = 17, 0.3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    reference = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, total)
    expected = []
    for _ in range(total + 3):
        expected.append(reference.get_last_lr()[0])
        optimizer.step()
        reference.step()
    schedule = make_schedule(
        OptimizerConfig(learning_rate=lr, schedule="cosine", warmup_steps=warmup, total_steps=total)
    )
    schedule = jax.jit(schedule) if jit else schedule
    ours = [float(schedule(jnp.int32(step))) for step in range(total + 3)]
    # Steps 0..total (a run takes steps 0..total-1); past the end transformers' cosine rises again, ours stays 0.
    np.testing.assert_allclose(ours[: total + 1], expected[: total + 1], rtol=1e-6, atol=1e-7)
    assert ours[total + 1 :] == [0.0, 0.0]
    assert expected[total] == 0.0 and max(expected) == pytest.approx(lr)


def test_schedule_drives_the_update_size():
    # SGD-like check through the full chain: with a linear schedule the last step (lr 0) moves nothing.
    cfg = OptimizerConfig(learning_rate=0.1, schedule="linear", total_steps=3, max_grad_norm=None)
    params = jnp.ones((2,))
    history = _run(make_optimizer(cfg), params, [np.ones(2, np.float32)] * 4, jit=True)
    np.testing.assert_array_equal(history[3], history[2])
    assert not np.array_equal(history[1], history[0])


def test_config_errors():
    with pytest.raises(ValueError, match="adam"):
        OptimizerConfig(adam="sgd")
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(schedule="linear", total_steps=0)
    with pytest.raises(ValueError, match="schedule 'cosine' needs total_steps > warmup_steps"):
        OptimizerConfig(schedule="cosine", total_steps=4, warmup_steps=4)
