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


# ----------------------------------------------------------------------------------------------------------
# Weight decay on the parameters transformers' Trainer decays (the config's weight_decay / adam_* keys)


@pytest.mark.parametrize("head", ["lm", "reward"])
@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "gpt2"])
def test_decay_mask_is_transformers_trainer_rule(family, head, tmp_path):
    """`decay_mask` on ppojax's names selects exactly the HF parameters `Trainer.get_decay_parameter_names` decays
    (biases, RMSNorm / LayerNorm weights and Qwen3's q / k norms left out), mapped through the import table."""
    import transformers

    from ppojax.models import load_pretrained
    from ppojax.models.hf import expand_table
    from ppojax.optim import decay_mask
    from tests.models.hf_builders import build

    torch_model = build(family, tmp_path, head=head)
    model, params = load_pretrained(str(tmp_path), head=head)
    hf_decay = set(transformers.Trainer.get_decay_parameter_names(None, torch_model))
    hf_names = {name for name, _ in torch_model.named_parameters()}
    mask = {
        "/".join(k.key for k in path): bool(v) for path, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))
    }
    rules = expand_table(model)
    assert set(mask) == set(rules)
    for ours, rule in rules.items():
        assert rule.hf in hf_names, (ours, rule.hf)
        assert mask[ours] == (rule.hf in hf_decay), (ours, rule.hf)
    assert any(mask.values()) and not all(mask.values())  # both kinds are present in every family


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_adamw_decay_groups_match_torch(jit):
    """make_optimizer with weight decay, betas, ε and clipping against torch.optim.AdamW with transformers' two
    parameter groups (no decay on biases and norms), gradients clipped by torch's clip_grad_norm_."""
    rng = np.random.default_rng(5)
    shapes = {
        "embed": {"embedding": (6, 4)},
        "layers_0": {"attn": {"q": {"kernel": (4, 4), "bias": (4,)}}, "attn_norm": {"scale": (4,)}},
        "final_norm": {"scale": (4,), "bias": (4,)},
        "value_head": {"kernel": (4, 1), "bias": (1,)},
    }
    params = jax.tree.map(
        lambda s: rng.normal(size=s).astype(np.float32), shapes, is_leaf=lambda x: isinstance(x, tuple)
    )
    steps = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.3, params) for _ in range(5)]
    config = OptimizerConfig(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.2, max_grad_norm=1.0)
    tx = make_optimizer(config)
    update = jax.jit(tx.update) if jit else tx.update
    ours, state = jax.tree.map(jnp.asarray, params), tx.init(jax.tree.map(jnp.asarray, params))

    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = ["/".join(k.key for k in path) for path, _ in flat]
    weights = [torch.nn.Parameter(torch.tensor(p)) for _, p in flat]
    no_decay = {n for n in names if n.endswith("bias") or "norm/" in n}
    assert no_decay == {
        "layers_0/attn/q/bias",
        "layers_0/attn_norm/scale",
        "final_norm/scale",
        "final_norm/bias",
        "value_head/bias",
    }
    groups = [
        {"params": [w for n, w in zip(names, weights) if n in no_decay], "weight_decay": 0.0},
        {"params": [w for n, w in zip(names, weights) if n not in no_decay], "weight_decay": 0.2},
    ]
    opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    for grads in steps:
        for w, g in zip(weights, jax.tree.leaves(grads)):
            w.grad = torch.tensor(g)
        torch.nn.utils.clip_grad_norm_(weights, 1.0)
        opt.step()
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, ours)
        ours = optax.apply_updates(ours, updates)
        for name, w, got in zip(names, weights, jax.tree.leaves(ours)):
            np.testing.assert_allclose(np.asarray(got), w.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
    # The groups matter here: decaying everything moves the no-decay leaves by ~lr · 0.2 · |p| per step.
    everything = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(0.8, 0.95, 1e-6),
        optax.add_decayed_weights(0.2),
        optax.scale_by_learning_rate(0.05),
    )
    alt, alt_state = jax.tree.map(jnp.asarray, params), everything.init(jax.tree.map(jnp.asarray, params))
    for grads in steps:
        u, alt_state = everything.update(jax.tree.map(jnp.asarray, grads), alt_state, alt)
        alt = optax.apply_updates(alt, u)
    assert abs(float(alt["final_norm"]["scale"][0] - ours["final_norm"]["scale"][0])) > 1e-3
