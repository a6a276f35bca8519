"""Smoke test of the PPO benchmark's workload builder (experiments/bench/workload.py): the files it writes
have the shapes issue 9 specifies. The benchmark itself is not a test."""

import json
import os
import sys

import jax
import numpy as np
import pytest
import transformers

import ppojax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench"))
import workload as wl  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("workload"))
    wl.build(wl.get("cpu"), directory)
    return directory


def test_tokenizer_is_byte_level_bpe_with_512_ids_and_distinct_pad_and_eos(built):
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(os.path.join(built, "tokenizer"))
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert tokenizer.padding_side == "left"
    text = "ünïcode → bytes, 123"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte level: no unknown token


def test_models_have_the_specified_qwen2_shapes(built):
    policy, params = ppojax.load_pretrained(os.path.join(built, "policy"), head="lm")
    reward, reward_params = ppojax.load_pretrained(os.path.join(built, "reward"), head="reward")
    for config in (policy.config, reward.config):
        assert (config.vocab_size, config.hidden_size, config.num_layers) == (512, 256, 4)
        assert (config.num_heads, config.num_kv_heads, config.intermediate_size) == (4, 2, 688)
        assert config.tie_word_embeddings and config.pad_token_id == 0
    assert "lm_head" not in params
    assert reward_params["score"]["kernel"].shape == (256, 1)
    # Hand count: per layer q, o 256², k, v 256·128, gate, up, down 256·688 = 724,992 weights; biases of
    # q/k/v 512; norms 2·256; plus the 512 × 256 embedding and the final norm.
    n_policy = sum(x.size for x in jax.tree.leaves(params))
    assert n_policy == 4 * (724_992 + 512 + 512) + 512 * 256 + 256 == wl.param_count(wl.get("cpu"))
    assert wl.matmul_params(wl.get("cpu")) == 4 * 724_992
    with open(os.path.join(built, "policy", "config.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    with open(os.path.join(built, "policy", "generation_config.json")) as f:
        assert json.load(f).get("eos_token_id") is None  # no stop token while sampling


def test_prompts_are_64_of_10_to_16_tokens_left_padded_to_16(built):
    workload, prompts = wl.load(built)
    assert workload == wl.get("cpu")
    lengths = [len(p) for p in prompts]
    assert len(prompts) == 64 and min(lengths) >= 10 and max(lengths) == 16
    assert all(2 <= t < 512 for p in prompts for t in p)  # never pad or eos
    ids, mask = ppojax.pad_prompts(prompts, 0, bucket=16)
    assert ids.shape == (64, 16)
    np.testing.assert_array_equal(np.asarray(mask).sum(1), lengths)
    assert np.all(np.asarray(mask)[:, -1] == 1)  # left-padded


def test_pruned_train_flops_is_the_last_layers_query_side_at_the_prompt_columns():
    # Hand count for the cpu workload: 64 rows × 16 of 48 columns skip the last layer's q, o (256² each), gate,
    # up, down (256·688 each) and their queries' attention over 48 keys (4 · 48 · 256); ×3 forward + backward,
    # ×2 models (policy, critic), ×4 epochs.
    per_column = 2 * (2 * 256 * 256 + 3 * 256 * 688) + 4 * 48 * 256
    expected = 64 * 16 * per_column * 3 * 2 * 4
    assert wl.pruned_train_flops(wl.get("cpu")) == expected
    assert 0.07 < expected / wl.phase_flops(wl.get("cpu"))["train"] < 0.08
