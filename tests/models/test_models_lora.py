"""LoRA: zero-init is the base model, trained adapters change it, merged export equals the adapted model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

import hf_builders
from ppojax.models import init_lora, load_pretrained, merge_lora, save_pretrained


def _perturbed(lora, key):
    """Non-zero `b` everywhere (what training would produce)."""
    leaves, treedef = jax.tree_util.tree_flatten(lora)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    )


@pytest.mark.parametrize("name,targets", [("qwen2", "all"), ("gpt2", ("q", "down"))])
def test_lora_zero_init_identity_then_change_then_merged_export(checkpoint, name, targets, tmp_path):
    directory, _ = checkpoint(name)
    model, params = load_pretrained(directory)
    ids, mask = hf_builders.padded_batch((10, 6), 10, model.config.vocab_size, seed=13)
    real = mask.astype(bool)
    base = np.asarray(hf_builders.jit_apply(model, params, ids, mask).logits)

    lora = init_lora(model, jax.random.key(0), rank=4, alpha=8, targets=targets)
    # Exactly the base model in math (b = 0; bitwise equal un-jitted, see below); jitted, XLA groups the
    # q/k/v dots differently when some carry adapters, which moves the last float bits (~6e-7 here,
    # the same size as jit-vs-eager of the base model itself).
    np.testing.assert_allclose(
        np.asarray(hf_builders.jit_apply(model, params, ids, mask, lora).logits), base, rtol=0, atol=2e-6
    )

    lora = _perturbed(lora, jax.random.key(1))
    adapted = np.asarray(hf_builders.jit_apply(model, params, ids, mask, lora).logits)
    assert np.abs(adapted - base)[real].max() > 1e-2

    merged = merge_lora(model, params, lora)
    np.testing.assert_allclose(
        np.asarray(hf_builders.jit_apply(model, merged, ids, mask).logits)[real], adapted[real], atol=1e-5
    )
    # the base params are untouched: the reference model is `params` with lora=None
    np.testing.assert_array_equal(np.asarray(hf_builders.jit_apply(model, params, ids, mask).logits), base)

    save_pretrained(str(tmp_path), model, params, lora=lora)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    exported = hf_builders.torch_forward(reloaded, ids, mask)
    np.testing.assert_allclose(exported[real], adapted[real], atol=1e-4)


def test_lora_targets_and_shapes(checkpoint):
    model, _ = load_pretrained(checkpoint("llama3")[0])
    lora = init_lora(model, jax.random.key(0), rank=3, alpha=6, targets=("q", "down"))
    assert lora.scale == 2.0
    assert set(lora.adapters["layers_1"]["attn"]) == {"q"} and set(lora.adapters["layers_1"]["mlp"]) == {"down"}
    q = lora.adapters["layers_0"]["attn"]["q"]
    assert q["a"].shape == (64, 3) and q["b"].shape == (3, 4 * 24)
    assert not np.asarray(q["b"]).any() and np.asarray(q["a"]).any()
    # only a and b are leaves: an optimizer never sees the scale
    assert len(jax.tree_util.tree_leaves(lora)) == 2 * 2 * model.config.num_layers


def test_gpt2_targets_map_to_fused_and_conv_projections(checkpoint):
    model, _ = load_pretrained(checkpoint("gpt2")[0])
    lora = init_lora(model, jax.random.key(0), targets=("q", "k", "o", "up", "down"))
    layer = lora.adapters["layers_0"]
    assert set(layer["attn"]) == {"qkv", "o"} and set(layer["mlp"]) == {"up", "down"}
    assert layer["attn"]["qkv"]["b"].shape == (8, 3 * 32)
    with pytest.raises(ValueError, match="no gate projection"):
        init_lora(model, jax.random.key(0), targets=("gate",))
    with pytest.raises(ValueError, match="unknown LoRA target 'c_attn'"):
        init_lora(model, jax.random.key(0), targets=("c_attn",))


def test_lora_is_differentiable_and_base_stays_frozen(checkpoint):
    model, params = load_pretrained(checkpoint("gpt2")[0])
    ids, mask = hf_builders.padded_batch((6, 4), 6, model.config.vocab_size, seed=14)
    lora = init_lora(model, jax.random.key(0), rank=2, targets=("q", "down"))

    def loss(lora):
        return jnp.mean(model.apply(params, ids, mask, lora=lora).logits ** 2)

    grads = jax.jit(jax.grad(loss))(lora)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(lora)
    # with b = 0 only b gets a gradient at the first step
    b_grad = grads.adapters["layers_0"]["mlp"]["down"]["b"]
    assert np.abs(np.asarray(b_grad)).max() > 0


def test_zero_init_lora_is_bitwise_the_base_model_unjitted(checkpoint):
    model, params = load_pretrained(checkpoint("gpt2")[0])
    # same shapes as the un-jitted parity test, so the eager op compilations are shared
    ids, mask = hf_builders.padded_batch((12, 7), 12, model.config.vocab_size, seed=15)
    lora = init_lora(model, jax.random.key(0), rank=2, targets=("q", "up"))
    np.testing.assert_array_equal(
        np.asarray(model.apply(params, ids, mask, lora=lora).logits), np.asarray(model.apply(params, ids, mask).logits)
    )
