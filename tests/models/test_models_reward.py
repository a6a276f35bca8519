"""Reward and value heads: scores read where transformers' ForSequenceClassification reads them."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import hf_builders
from ppojax.models import init_value_head, load_pretrained, score_index, sequence_scores, values_from_hidden

REWARD_FAMILIES = ["llama3", "qwen2", "qwen3", "gpt2"]
LENGTHS = (11, 16, 4)
jit_sequence_scores = jax.jit(sequence_scores, static_argnums=0)


@pytest.mark.parametrize("name", REWARD_FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_sequence_scores_match_transformers(checkpoint, name, side):
    directory, torch_model = checkpoint(name, head="reward")
    model, params = load_pretrained(directory, head="reward")
    ids, mask = hf_builders.padded_batch(LENGTHS, max(LENGTHS), model.config.vocab_size, side=side, seed=6)
    # Right padding: transformers' default positions are already right. Left padding: positions from the
    # mask, as TRL's get_reward passes them.
    reference = hf_builders.torch_forward(torch_model, ids, mask, positions=side == "left")[:, 0]
    ours = np.asarray(jit_sequence_scores(model, params, ids, mask))
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
    scores = jit_sequence_scores(model, params, ids, mask)
    np.testing.assert_allclose(np.asarray(scores), reference, atol=1e-4)


def test_critic_initialised_from_reward_checkpoint(checkpoint):
    directory, _ = checkpoint("llama3", head="reward")
    reward_model, reward_params = load_pretrained(directory, head="reward")
    critic, critic_params = load_pretrained(directory, head="value")
    ids, mask = hf_builders.padded_batch(LENGTHS, max(LENGTHS), critic.config.vocab_size, seed=8)
    values = hf_builders.jit_apply(critic, critic_params, ids, mask).values
    reward_out = hf_builders.jit_apply(reward_model, reward_params, ids, mask)
    assert values.shape == ids.shape and values.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(values), np.asarray(reward_out.scores))
    # A value head on a shared trunk: the same head applied to another model's last hidden state.
    assert not np.asarray(values_from_hidden(init_value_head(critic.config), reward_out.hidden)).any()
    shared = values_from_hidden(critic_params["value_head"], reward_out.hidden)
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(reward_out.scores))


def test_value_head_from_causal_lm_starts_at_zero(checkpoint):
    directory, _ = checkpoint("gpt2")
    critic, params = load_pretrained(directory, head="value")
    ids, mask = hf_builders.padded_batch((5, 3), 5, critic.config.vocab_size, seed=9)
    out = hf_builders.jit_apply(critic, params, ids, mask)
    assert out.logits is None and out.scores is None
    np.testing.assert_array_equal(np.asarray(out.values), 0.0)
    assert np.abs(np.asarray(out.hidden)).max() > 0
