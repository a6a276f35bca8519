"""Logit parity with transformers (fp32) on left-padded batches of >= 512 tokens, every family."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

import hf_builders
from ppojax.models import from_hf_config, load_pretrained
from ppojax.models.rope import inverse_frequencies

LONG_LENGTHS = (520, 400, 517)  # left-padded to 520


def _max_diff_at_real_tokens(model, params, torch_model, ids, mask, apply):
    ours = np.asarray(apply(params, ids, mask).logits, np.float32)
    reference = hf_builders.torch_forward(torch_model, ids, mask)
    real = mask.astype(bool)
    return np.abs(ours - reference)[real].max(), np.abs(reference[real]).std()


@pytest.mark.parametrize("name", sorted(hf_builders.CONFIGS))
def test_logits_match_transformers_on_long_left_padded_batch(checkpoint, name):
    directory, torch_model = checkpoint(name)
    model, params = load_pretrained(directory)
    ids, mask = hf_builders.padded_batch(LONG_LENGTHS, max(LONG_LENGTHS), model.config.vocab_size, seed=1)
    diff, scale = _max_diff_at_real_tokens(model, params, torch_model, ids, mask, jax.jit(model.apply))
    assert scale > 0.1, "logits too small for a 1e-4 tolerance to mean anything"
    assert diff <= 1e-4


def test_fixture_configs_exercise_the_features():
    llama3 = hf_builders.make_config("llama3")
    assert llama3.head_dim * llama3.num_attention_heads != llama3.hidden_size
    assert llama3.num_key_value_heads < llama3.num_attention_heads
    # dynamic NTK only changes anything past max_position_embeddings
    assert max(LONG_LENGTHS) > hf_builders.make_config("llama_dynamic").max_position_embeddings


@pytest.mark.parametrize("name", ["llama3", "llama_linear", "llama_dynamic"])
def test_rope_scaling_changes_the_rotation(name):
    """Guards the parity test: at the tested positions the scaled rotation angles differ from unscaled
    ones by far more than the 1e-4 logit tolerance could hide."""
    config = from_hf_config(hf_builders.make_config(name).to_dict())
    unscaled = dataclasses.replace(config, rope_type="default")
    positions = np.arange(max(LONG_LENGTHS))[None]
    angles = positions[..., None] * np.asarray(inverse_frequencies(config, positions))
    unscaled_angles = positions[..., None] * np.asarray(inverse_frequencies(unscaled, positions))
    assert np.abs(np.sin(angles) - np.sin(unscaled_angles)).max() > 0.5


def test_unjitted_apply_matches_transformers(checkpoint):
    directory, torch_model = checkpoint("gpt2")
    model, params = load_pretrained(directory)
    ids, mask = hf_builders.padded_batch((12, 7), 12, model.config.vocab_size, seed=2)
    diff, _ = _max_diff_at_real_tokens(model, params, torch_model, ids, mask, model.apply)
    assert diff <= 1e-4


def test_left_padding_does_not_change_real_token_logits(checkpoint):
    directory, _ = checkpoint("llama3")
    model, params = load_pretrained(directory)
    ids, mask = hf_builders.padded_batch((9,), 9, model.config.vocab_size, seed=3)
    padded_ids = np.concatenate([np.zeros((1, 5), ids.dtype), ids], axis=1)
    padded_mask = np.concatenate([np.zeros((1, 5), mask.dtype), mask], axis=1)
    plain = np.asarray(hf_builders.jit_apply(model, params, ids, mask).logits)
    padded = np.asarray(hf_builders.jit_apply(model, params, padded_ids, padded_mask).logits)[:, 5:]
    np.testing.assert_allclose(padded, plain, atol=1e-5)
