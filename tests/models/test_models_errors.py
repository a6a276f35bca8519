"""Every unreadable checkpoint raises a one-line CheckpointError naming the file and the tensor or key."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ppojax.models import CheckpointError, load_pretrained


def _copy(directory, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(directory, target)
    return target


def _edit_tensors(target, edit):
    path = os.path.join(target, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        load_pretrained(str(path), **kwargs)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "\n" not in message
    return message


def test_unsupported_model_type(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    message = _error(target)
    assert "config.json" in message and "'mistral'" in message
    assert "llama, qwen2, qwen3, gpt2" in message


def test_missing_config(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    os.remove(target / "config.json")
    assert "config.json: missing" in _error(target)


def test_malformed_config(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    (target / "config.json").write_text("{not json")
    assert "config.json: malformed JSON" in _error(target)


def test_config_missing_required_key(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    config = json.loads((target / "config.json").read_text())
    del config["hidden_size"]
    (target / "config.json").write_text(json.dumps(config))
    assert "config.json: required key 'hidden_size'" in _error(target)


def test_missing_tensor(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    _edit_tensors(target, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    message = _error(target)
    assert "model.safetensors" in message and "missing tensor 'model.layers.1.self_attn.k_proj.bias'" in message


def test_unexpected_tensor(checkpoint, tmp_path):
    target = _copy(checkpoint("gpt2")[0], tmp_path)
    _edit_tensors(target, lambda t: t.update({"transformer.h.0.attn.extra.weight": np.zeros(3, np.float32)}))
    message = _error(target)
    assert "model.safetensors" in message and "unexpected tensor 'transformer.h.0.attn.extra.weight'" in message


def test_lm_head_of_untied_model_is_required(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen3")[0], tmp_path)
    _edit_tensors(target, lambda t: t.pop("lm_head.weight"))
    assert "missing tensor 'lm_head.weight'" in _error(target)


def test_shape_mismatch(checkpoint, tmp_path):
    target = _copy(checkpoint("llama3")[0], tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensors(target, lambda t: t.update({name: t[name][:-1]}))
    message = _error(target)
    assert f"tensor '{name}' has shape (95, 64), expected (96, 64)" in message


def test_reward_with_two_labels_is_a_shape_mismatch(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2", head="reward")[0], tmp_path)
    _edit_tensors(target, lambda t: t.update({"score.weight": np.concatenate([t["score.weight"]] * 2)}))
    assert "num_labels=1" in _error(target, head="reward")


def test_pickle_checkpoints_are_refused_without_unpickling(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    os.remove(target / "model.safetensors")
    (target / "pytorch_model.bin").write_bytes(b"not a pickle; must never be opened")
    message = _error(target)
    assert "pytorch_model.bin" in message and "convert it to model.safetensors" in message


def test_no_weights(checkpoint, tmp_path):
    target = _copy(checkpoint("qwen2")[0], tmp_path)
    os.remove(target / "model.safetensors")
    assert "no model.safetensors or model.safetensors.index.json" in _error(target)


def test_not_a_directory(tmp_path):
    assert "not a directory" in _error(tmp_path / "nowhere")
