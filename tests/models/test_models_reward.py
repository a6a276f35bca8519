"""Reward and value heads: scores read where transformers' ForSequenceClassification reads them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import hf_builders
from ppojax.models import load_pretrained, score_index, sequence_scores

REWARD_FAMILIES = ["llama3", "qwen2", "qwen3", "gpt2"]
LENGTHS = (11, 16, 4)


@pytest.mark.parametrize("name", REWARD_FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_scores_match_transformers(checkpoint, name, side):
    directory, torch_model = checkpoint(name, head="reward")
    model, params = load_pretrained(directory, head="reward")
    ids, mask = hf_builders.padded_batch(LENGTHS, max(LENGTHS), model.config.vocab_size, side=side, seed=6)
    # Right padding: transformers' default positions are already right. Left padding: positions from the
    # mask, as TRL's get_reward passes them.
    reference = hf_builders.torch_forward(torch_model, ids, mask, positions=side == "left")[:, 0]
    ours = np.asarray(jax.jit(sequence_scores, static_argnums=0)(model, params, ids, mask))
    assert np.abs(reference).std() > 0.05
    np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


def test_score_index_is_rightmost_non_pad():
    ids = np.array([[0, 0, 5, 6], [5, 6, 0, 0], [5, 0, 6, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(score_index(ids, 0), [3, 1, 2, 0])
    np.testing.assert_array_equal(score_index(ids, None), [3, 3, 3, 3])


def test_no_pad_id_reads_last_token_like_transformers(checkpoint):
    directory, torch_model = checkpoint("qwen2", head="reward", pad_token_id=None)
    model, params = load_pretrained(directory, head="reward")
    assert model.config.pad_token_id is None
    ids, mask = hf_builders.padded_batch((9,), 9, model.config.vocab_size, seed=7)
    reference = hf_builders.torch_forward(torch_model, ids, mask)[:, 0]
    np.testing.assert_allclose(np.asarray(sequence_scores(model, params, ids, mask)), reference, atol=1e-4)


def test_critic_initialised_from_reward_checkpoint(checkpoint):
    directory, _ = checkpoint("llama3", head="reward")
    reward_model, reward_params = load_pretrained(directory, head="reward")
    critic, critic_params = load_pretrained(directory, head="value")
    ids, mask = hf_builders.padded_batch(LENGTHS, max(LENGTHS), critic.config.vocab_size, seed=8)
    values = critic.apply(critic_params, ids, mask).values
    scores = reward_model.apply(reward_params, ids, mask).scores
    assert values.shape == ids.shape and values.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(values), np.asarray(scores))


def test_value_head_from_causal_lm_starts_at_zero(checkpoint):
    directory, _ = checkpoint("gpt2")
    critic, params = load_pretrained(directory, head="value")
    ids, mask = hf_builders.padded_batch((5, 3), 5, critic.config.vocab_size, seed=9)
    out = critic.apply(params, ids, mask)
    assert out.logits is None and out.scores is None
    np.testing.assert_array_equal(np.asarray(out.values), 0.0)
    assert np.abs(np.asarray(out.hidden)).max() > 0
