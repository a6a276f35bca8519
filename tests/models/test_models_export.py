"""Export: HF -> ppojax -> HF is bit-identical, transformers loads it, sharded and bf16 checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_builders
from ppojax.models import DecoderModel, ModelConfig, init_params, load_pretrained, save_pretrained

# Measured on these fixtures (2 layers, logit std 0.4-0.7, 40 tokens): ours in bf16 vs transformers fp32,
# max |diff| 0.014-0.036 and mean 0.0024-0.0052; transformers' own bf16 vs fp32 max |diff| is 0.014-0.036.
BF16_MAX_ABS_DIFF = 0.1
BF16_MEAN_ABS_DIFF = 0.01


def _tensors(directory):
    return load_file(os.path.join(directory, "model.safetensors"))


def _assert_bit_identical(original: dict, exported: dict):
    assert sorted(original) == sorted(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype, name
        np.testing.assert_array_equal(exported[name].view(np.uint8), tensor.view(np.uint8), err_msg=name)


@pytest.mark.parametrize("name", sorted(hf_builders.CONFIGS))
def test_lm_round_trip_is_bit_identical_and_loads_in_transformers(checkpoint, name, tmp_path):
    directory, torch_model = checkpoint(name)
    model, params = load_pretrained(directory)
    save_pretrained(str(tmp_path), model, params)
    _assert_bit_identical(_tensors(directory), _tensors(tmp_path))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(torch_model)
    ids, mask = hf_builders.padded_batch((8, 5), 8, model.config.vocab_size, seed=10)
    np.testing.assert_array_equal(
        hf_builders.torch_forward(reloaded, ids, mask), hf_builders.torch_forward(torch_model, ids, mask)
    )


@pytest.mark.parametrize("name", ["qwen3", "gpt2"])
def test_reward_round_trip(checkpoint, name, tmp_path):
    directory, torch_model = checkpoint(name, head="reward")
    model, params = load_pretrained(directory, head="reward")
    save_pretrained(str(tmp_path), model, params)
    _assert_bit_identical(_tensors(directory), _tensors(tmp_path))
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_labels == 1
    ids, mask = hf_builders.padded_batch((8, 5), 8, model.config.vocab_size, side="right", seed=11)
    np.testing.assert_array_equal(
        hf_builders.torch_forward(reloaded, ids, mask, positions=False),
        hf_builders.torch_forward(torch_model, ids, mask, positions=False),
    )


def test_tokenizer_is_saved_beside(checkpoint, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "hello": 2, "world": 3, "<unk>": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    directory, _ = checkpoint("qwen2")
    model, params = load_pretrained(directory)
    save_pretrained(str(tmp_path), model, params, tokenizer=tokenizer)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert loaded("hello world")["input_ids"] == [2, 3]


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    _, torch_model = checkpoint("llama3")
    torch_model.save_pretrained(tmp_path, max_shard_size="60KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model, params = load_pretrained(str(tmp_path))
    _, single = load_pretrained(checkpoint("llama3")[0])
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, single)


def test_bf16_checkpoint_loads_within_tolerance_of_fp32(checkpoint, tmp_path):
    directory, torch_model = checkpoint("llama3")
    copy.deepcopy(torch_model).to(torch.bfloat16).save_pretrained(tmp_path)  # the fixture stays fp32
    model, params = load_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    assert model.dtype == "bfloat16"
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(params))
    ids, mask = hf_builders.padded_batch((40, 25), 40, model.config.vocab_size, seed=12)
    logits = hf_builders.jit_apply(model, params, ids, mask).logits
    assert logits.dtype == jnp.bfloat16
    reference = hf_builders.torch_forward(torch_model, ids, mask)
    real = mask.astype(bool)
    diff = np.abs(np.asarray(logits, np.float32) - reference)[real]
    assert 0 < diff.max() <= BF16_MAX_ABS_DIFF and diff.mean() <= BF16_MEAN_ABS_DIFF
    # bf16 -> ppojax -> bf16 is bit-identical too
    export = tmp_path / "export"
    save_pretrained(str(export), model, params)
    _assert_bit_identical(_tensors(tmp_path), _tensors(export))
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"


def test_fp32_checkpoint_cast_to_bf16_on_load(checkpoint):
    directory, torch_model = checkpoint("gpt2")
    _, params = load_pretrained(directory, dtype=jnp.bfloat16)
    expected = torch_model.transformer.wte.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"]["embedding"], np.float32), expected)


def test_value_model_exports_as_one_label_sequence_classifier(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen3")
    critic, params = load_pretrained(directory, head="value")  # zero value head on the LM's trunk
    params = {**params, "value_head": {"kernel": params["value_head"]["kernel"] + 0.5}}
    save_pretrained(str(tmp_path), critic, params)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert reloaded.config.num_labels == 1 and "lm_head.weight" not in _tensors(tmp_path)
    np.testing.assert_array_equal(reloaded.score.weight.detach().numpy(), 0.5)


def test_loading_never_imports_torch_or_transformers(checkpoint):
    import subprocess
    import sys

    directory, _ = checkpoint("qwen2")
    code = (
        "import sys; from ppojax.models import load_pretrained; load_pretrained(sys.argv[1]); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported'"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code, directory], check=True, env=env)


@pytest.mark.parametrize(
    "model_type,extra",
    [
        ("llama", dict(o_bias=True, qkv_bias=True, mlp_bias=True)),
        ("qwen2", dict(qkv_bias=True, tie_word_embeddings=True)),
    ],
)
def test_config_built_here_exports_to_transformers(model_type, extra, tmp_path):
    config = ModelConfig(
        model_type=model_type,
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_ids=(1,),
        **extra,
    )
    params = init_params(config, jax.random.key(3))
    model = DecoderModel(config)
    save_pretrained(str(tmp_path), model, params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = hf_builders.padded_batch((9, 6), 9, config.vocab_size, seed=16)
    ours = np.asarray(hf_builders.jit_apply(model, params, ids, mask).logits)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], hf_builders.torch_forward(reloaded, ids, mask)[real], atol=1e-5)
    reloaded_model, reloaded_params = load_pretrained(str(tmp_path))
    assert dataclasses.replace(reloaded_model.config, hf_config_json="") == config
