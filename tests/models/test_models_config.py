"""config.json reading: both rope spellings, defaults, prefix-less and tied-with-copy checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_builders
from ppojax.models import CheckpointError, from_hf_config, load_pretrained, to_hf_config


def test_transformers4_rope_keys_read_like_rope_parameters():
    new = hf_builders.make_config("llama3").to_dict()
    old = {k: v for k, v in new.items() if k != "rope_parameters"}
    params = new["rope_parameters"]
    old["rope_theta"] = params["rope_theta"]
    old["rope_scaling"] = {
        "type": params["rope_type"],
        **{k: v for k, v in params.items() if k not in ("rope_theta", "rope_type")},
    }
    read_new, read_old = from_hf_config(new), from_hf_config(old)
    assert read_new.rope_type == "llama3" and read_new.rope_original_max_position_embeddings == 128
    fields = lambda c: {k: v for k, v in vars(c).items() if k != "hf_config_json"}  # noqa: E731
    assert fields(read_old) == fields(read_new)
    assert "rope_scaling" not in to_hf_config(read_old, "lm")


def test_defaults_follow_transformers_config_classes():
    qwen3 = {
        "model_type": "qwen3",
        "vocab_size": 10,
        "hidden_size": 32,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
    }
    assert from_hf_config(qwen3).head_dim == 128  # Qwen3Config's default, not hidden / heads
    assert from_hf_config({**qwen3, "model_type": "qwen2"}).head_dim == 8
    assert from_hf_config({**qwen3, "model_type": "qwen2"}).qkv_bias
    assert from_hf_config({**qwen3, "model_type": "llama"}).num_kv_heads == 4
    with pytest.raises(CheckpointError, match="rope_type 'yarn'"):
        from_hf_config({**qwen3, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(CheckpointError, match="must be an integer"):
        from_hf_config({**qwen3, "hidden_size": "32"})


def _rewrite(directory, tmp_path, edit):
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    path = os.path.join(target, "model.safetensors")
    tensors = load_file(path)
    save_file(edit(tensors), path, metadata={"format": "pt"})
    return str(target)


def test_checkpoint_saved_from_the_bare_model_loads(checkpoint, tmp_path):
    directory, _ = checkpoint("gpt2")
    strip = lambda t: {k.removeprefix("transformer."): v for k, v in t.items()}  # noqa: E731
    _, expected = load_pretrained(directory)
    _, params = load_pretrained(_rewrite(directory, tmp_path, strip))
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)


def test_tied_checkpoint_with_an_lm_head_copy_loads(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen2")
    assert json.loads(open(os.path.join(directory, "config.json")).read())["tie_word_embeddings"]
    add_copy = lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]}  # noqa: E731
    model, params = load_pretrained(_rewrite(directory, tmp_path, add_copy))
    assert "lm_head" not in params and model.config.tie_word_embeddings
