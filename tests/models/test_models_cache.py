"""Cached decoding (prefill + one-token steps) equals the full forward pass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_builders
from ppojax.models import init_lora, load_pretrained

PROMPT_LENGTHS = (6, 10, 3)
STEPS = 5


TRACES = []


def _apply(model, params, ids, mask, cache):
    TRACES.append(ids.shape)  # runs only when jax traces
    return model.apply(params, ids, mask, cache=cache)


@pytest.mark.parametrize("name", ["llama3", "gpt2"])
def test_prefill_then_decode_equals_full_forward(checkpoint, name):
    directory, _ = checkpoint(name)
    model, params = load_pretrained(directory)
    prompt_len = max(PROMPT_LENGTHS)
    ids, mask = hf_builders.padded_batch(PROMPT_LENGTHS, prompt_len, model.config.vocab_size, seed=4)
    new_tokens = np.random.default_rng(5).integers(1, model.config.vocab_size, (len(ids), STEPS))
    # Row 1 has finished after its 2nd new token: its later steps are masked out.
    step_mask = np.ones_like(new_tokens)
    step_mask[1, 2:] = 0
    full_ids = np.concatenate([ids, new_tokens], axis=1)
    full_mask = np.concatenate([mask, step_mask], axis=1)
    full = np.asarray(hf_builders.jit_apply(model, params, full_ids, full_mask).logits)

    step = jax.jit(functools.partial(_apply, model))
    TRACES.clear()
    cache = model.init_cache(len(ids), prompt_len + STEPS + 3)  # spare slots stay empty
    out = step(params, ids, mask, cache)
    cached = [np.asarray(out.logits)]
    cache = out.cache
    for t in range(STEPS):
        out = step(params, new_tokens[:, t : t + 1], step_mask[:, t : t + 1], out.cache)
        cached.append(np.asarray(out.logits))
    cached = np.concatenate(cached, axis=1)
    assert int(out.cache.index) == prompt_len + STEPS
    assert len(TRACES) == 2, "one trace for the prefill, one for every decode step"
    np.testing.assert_array_equal(np.asarray(out.cache.mask)[:, : prompt_len + STEPS], full_mask.astype(bool))
    real = full_mask.astype(bool)
    assert np.abs(cached - full)[real].max() <= 1e-4


def test_cache_layout(checkpoint):
    directory, _ = checkpoint("llama3")
    model, _ = load_pretrained(directory)
    cache = model.init_cache(2, 16, dtype=jnp.bfloat16)
    cfg = model.config
    assert len(cache.keys) == len(cache.values) == cfg.num_layers
    assert cache.keys[0].shape == (2, cfg.num_kv_heads, cfg.head_dim, 16)  # keys transposed
    assert cache.values[0].shape == (2, cfg.num_kv_heads, 16, cfg.head_dim)
    assert cache.keys[0].dtype == cache.values[0].dtype == jnp.bfloat16
    assert cache.index.dtype == jnp.int32 and cache.index.shape == ()
    assert cache.mask.shape == (2, 16) and not cache.mask.any()


@pytest.mark.parametrize("name", ["llama3", "gpt2"])
def test_grown_cache_decodes_as_the_full_size_cache(checkpoint, name):
    # Prefill into a cache with just enough slots, grow it, decode: the same logits as with the full-size cache
    # from the start (rope positions and learned positions); the filled slots and the index are kept.
    model, params = load_pretrained(checkpoint(name)[0])
    prompt_len = max(PROMPT_LENGTHS)
    ids, mask = hf_builders.padded_batch(PROMPT_LENGTHS, prompt_len, model.config.vocab_size, seed=4)
    new_tokens = np.random.default_rng(6).integers(1, model.config.vocab_size, (len(ids), STEPS))
    step = jax.jit(functools.partial(_apply, model))
    results = []
    for slots in ((prompt_len + 1, prompt_len + STEPS), (prompt_len + STEPS, prompt_len + STEPS)):
        out = step(params, ids, mask, model.init_cache(len(ids), slots[0]))
        small = out.cache
        grown = model.grow_cache(small, slots[1])
        for old, new, axis in [(k, g, 3) for k, g in zip(small.keys, grown.keys)] + [
            (v, g, 2) for v, g in zip(small.values, grown.values)
        ]:
            np.testing.assert_array_equal(np.take(np.asarray(new), np.arange(slots[0]), axis=axis), old)
            assert not np.take(np.asarray(new), np.arange(slots[0], slots[1]), axis=axis).any()
        assert int(grown.index) == int(small.index) == prompt_len
        assert grown.mask.shape == (len(ids), slots[1]) and not np.asarray(grown.mask)[:, slots[0] :].any()
        logits = [np.asarray(out.logits)]
        cache = grown
        for t in range(STEPS - 1):
            out = step(params, new_tokens[:, t : t + 1], np.ones((len(ids), 1), np.int32), cache)
            cache = out.cache
            logits.append(np.asarray(out.logits))
        results.append(np.concatenate(logits, axis=1))
    real = np.concatenate([mask, np.ones((len(ids), STEPS - 1), mask.dtype)], axis=1).astype(bool)  # not the pads
    np.testing.assert_allclose(results[0][real], results[1][real], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="grow_cache: max_length 3"):
        model.grow_cache(model.init_cache(2, 8), 3)


def test_shape_errors(checkpoint):
    model, params = load_pretrained(checkpoint("gpt2")[0])
    with pytest.raises(ValueError, match="input_ids must be"):
        model.apply(params, np.ones(4, np.int32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model.apply(params, np.ones((2, 4), np.int32), np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="cache batch"):
        model.apply(params, np.ones((2, 4), np.int32), cache=model.init_cache(3, 8))


@pytest.mark.parametrize(
    "name, head",
    [("llama3", "lm"), ("llama3", "reward"), ("qwen3", "lm"), ("gpt2", "lm")],  # GQA, qk-norm, fused q/k/v
)
def test_head_at_last_or_columns_is_that_slice_of_the_full_head(checkpoint, name, head):
    # head_at also prunes the last layer to those columns (keys and values still at every column): the head,
    # the hidden state and a filled cache must equal the full pass's, and so must the gradient of a loss on
    # those columns (training asks for the response columns only). The edge loss reads the first and last of
    # the columns, so a column mix-up inside the pruned layer changes the gradient. LoRA adapters on every
    # projection (b random, so they change the output) take the pruned layer's split q / k, v path too.
    directory, _ = checkpoint(name, head=head)
    model, params = load_pretrained(directory, head=head)
    lora = init_lora(model, jax.random.key(1), rank=2, targets="all")
    lora = lora.replace(
        adapters=jax.tree.map(lambda x: jax.random.normal(jax.random.key(2), x.shape) * 0.05, lora.adapters)
    )
    ids, mask = hf_builders.padded_batch(PROMPT_LENGTHS, max(PROMPT_LENGTHS), model.config.vocab_size, seed=4)
    columns = slice(3, 8)  # what teacher-forced scoring asks for: the response positions P-1 .. P+N-2
    field = "logits" if head == "lm" else "scores"
    wheres = ("all", "last", columns, slice(-2, None))

    def edge_loss(head_out):  # the first and last of the columns
        return jnp.sum(head_out[:, :: max(1, head_out.shape[1] - 1)] ** 2)

    fast = {"xla_backend_optimization_level": 0}  # compiles faster; the values are what is checked

    @functools.partial(jax.jit, compiler_options=fast)
    def run(p, lora):
        outs = [model.apply(p, ids, mask, lora=lora, head_at=where) for where in wheres]
        cache = model.init_cache(len(ids), ids.shape[1] + 2)
        prefills = [model.apply(p, ids, mask, cache=cache, lora=lora, head_at=w).cache for w in ("all", "last")]

        # The gradient through the pruned last layer, against slicing the full pass's head.
        def pruned(p, lora):
            return edge_loss(getattr(model.apply(p, ids, mask, lora=lora, head_at=columns), field))

        def sliced(p, lora):
            return edge_loss(getattr(model.apply(p, ids, mask, lora=lora), field)[:, columns])

        return outs, prefills, (jax.grad(pruned, (0, 1))(p, lora), jax.grad(sliced, (0, 1))(p, lora))

    (full, last, middle, tail), (cache_full, cache_last), (grad, want_grad) = run(params, lora)
    want = np.asarray(getattr(full, field))
    for out, cols in ((last, slice(-1, None)), (middle, columns), (tail, slice(-2, None))):
        got = np.asarray(getattr(out, field))
        assert got.shape == want[:, cols].shape
        np.testing.assert_allclose(got, want[:, cols], rtol=1e-5, atol=1e-6)
        assert out.hidden.shape == full.hidden[:, cols].shape
        np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(full.hidden)[:, cols], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(cache_full), jax.tree.leaves(cache_last)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    for g, w in zip(jax.tree.leaves(grad), jax.tree.leaves(want_grad)):
        g, w = np.asarray(g), np.asarray(w)  # float32 rounding, relative to the tensor's scale (seen: ≤ 1.1e-6)
        assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()
    with pytest.raises(ValueError, match="head_at must be 'all', 'last' or a slice of columns, found 'first'"):
        model.apply(params, ids, mask, head_at="first")
    with pytest.raises(ValueError, match=r"head_at slice must have int \(static\) start / stop and step 1"):
        model.apply(params, ids, mask, head_at=slice(0, 8, 2))
    with pytest.raises(
        ValueError, match=r"head_at slice slice\(20, 30, None\) selects no column of an input of length 10"
    ):
        model.apply(params, ids, mask, head_at=slice(20, 30))


@pytest.mark.parametrize("jit", [False, True])
def test_project_weights_major_equals_the_plain_product(jit):
    """A decode step's projections run as (kernelᵀ · xᵀ)ᵀ on CPU (`decoder.project`); same values as x @ kernel
    (float64 numpy reference) for a kernel and for a transposed (tied-embedding) kernel, and the weights-major
    branch is the one taken for a one-column input of few rows, not for a prefill."""
    from ppojax.models import decoder

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 1, 24)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
    expected = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    run = jax.jit(decoder.project) if jit else decoder.project
    np.testing.assert_allclose(run(x, kernel), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(x, kernel_t=kernel.T), expected, rtol=1e-5, atol=1e-5)

    def barriers(args, **kw):
        jaxpr = jax.make_jaxpr(functools.partial(decoder.project, **kw))(*args)
        return sum(eqn.primitive.name == "optimization_barrier" for eqn in jaxpr.eqns)

    assert jax.default_backend() == "cpu"
    assert barriers((x, kernel)) == 3 and barriers((x,), kernel_t=kernel.T) == 2
    prefill = jnp.ones((4, 3, 24), jnp.float32)
    assert barriers((prefill, kernel)) == 0
    many_rows = jnp.ones((decoder.WEIGHTS_MAJOR_MAX_ROWS * jax.device_count() + 1, 1, 24), jnp.float32)
    assert barriers((many_rows, kernel)) == 0
