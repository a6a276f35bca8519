"""LLaMA-Factory reward models (a causal LM or a PEFT LoRA adapter, plus `value_head.safetensors`): read as
LLaMA-Factory computes them (PEFT applying the adapter, TRL's value head on the last hidden state, the score at
`attention_mask.sum(-1) - 1` of a right-padded batch), written back in the same layout."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import save_file

import hf_builders
from ppojax import parallel as PL
from ppojax.models import (
    CheckpointError,
    init_value_head,
    load_pretrained,
    load_valuehead_checkpoint,
    save_pretrained,
    values_from_hidden,
)
from ppojax.models.valuehead import VALUE_HEAD_FILE

LENGTHS = (11, 16, 4, 9)
BIAS = 0.75  # far from 0: a reader that drops the bias is off by this much


def _value_head(directory, hidden: int, seed: int) -> torch.nn.Linear:
    """A random TRL-style `v_head.summary` saved as LLaMA-Factory saves it; returns it as a torch layer."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=generator))
        head.bias.fill_(BIAS)
    tensors = {
        "v_head.summary.weight": head.weight.detach().numpy().copy(),
        "v_head.summary.bias": head.bias.detach().numpy().copy(),
    }
    save_file(tensors, os.path.join(directory, VALUE_HEAD_FILE), metadata={"format": "pt"})
    return head


def _torch_values(torch_model, head, ids, mask) -> np.ndarray:
    """TRL's AutoModelForCausalLMWithValueHead in eval mode: v_head(hidden_states[-1]), `[B, S]`."""
    with torch.no_grad():
        out = torch_model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            position_ids=torch.from_numpy(hf_builders.mask_positions(mask)),
            output_hidden_states=True,
        )
        return head(out.hidden_states[-1].float())[..., 0].numpy()


def _lf_rewards(torch_model, head, ids, mask) -> np.ndarray:
    """LLaMA-Factory's get_rewards on a right-padded batch: the value at attention_mask.sum(-1) - 1."""
    values = _torch_values(torch_model, head, ids, mask)
    return values[np.arange(len(ids)), mask.sum(-1) - 1]


def _ours(model, params, ids, mask, jit: bool) -> np.ndarray:
    apply = hf_builders.jit_apply if jit else hf_builders._apply
    return np.asarray(apply(model, params, ids, mask).scores)


def _full_checkpoint(checkpoint, tmp_path, name="qwen2"):
    base_dir, torch_model = checkpoint(name)
    directory = tmp_path / "rm_full"
    torch_model.save_pretrained(directory)  # LLaMA-Factory's fix_valuehead_checkpoint: the causal LM ...
    head = _value_head(directory, torch_model.config.hidden_size, seed=3)  # ... and the head beside it
    return str(directory), torch_model, head


# (family, LoraConfig options): plain all-linear LoRA; rsLoRA with a per-module alpha and a trained embedding
# (modules_to_save); GPT-2, whose Conv1D projections PEFT adapts with fan_in_fan_out.
ADAPTERS = {
    "qwen2": ("qwen2", dict(target_modules="all-linear")),
    "qwen2_rslora": (
        "qwen2",
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            use_rslora=True,
            alpha_pattern={"down_proj": 3.0},
            modules_to_save=["embed_tokens"],
        ),
    ),
    "llama3": ("llama3", dict(target_modules="all-linear")),
    "gpt2": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
}


def _lora_checkpoint(checkpoint, tmp_path, case: str):
    name, options = ADAPTERS[case]
    base_dir, base_model = checkpoint(name)
    fresh = hf_builders.CAUSAL_LM[type(base_model.config)](base_model.config)
    fresh.load_state_dict(base_model.state_dict())
    lora = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **options)
    torch_model = peft.get_peft_model(fresh, lora).eval()
    with torch.no_grad():  # the trained embedding differs from the base one
        for module_name, param in torch_model.named_parameters():
            if "modules_to_save" in module_name:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(9)))
    directory = tmp_path / f"rm_lora_{case}"
    torch_model.save_pretrained(directory)
    head = _value_head(directory, base_model.config.hidden_size, seed=4)
    return str(directory), base_dir, torch_model, head


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_full_reward_model_matches_llamafactory(checkpoint, tmp_path, jit):
    directory, torch_model, head = _full_checkpoint(checkpoint, tmp_path)
    model, params = load_pretrained(directory, head="reward")  # recognised by its value_head.safetensors
    assert model.config.head_bias and float(params["score"]["bias"][0]) == pytest.approx(BIAS)
    for side in ("left", "right"):
        ids, mask = hf_builders.padded_batch(LENGTHS, 16, model.config.vocab_size, side=side, seed=5)
        reference = _torch_values(torch_model, head, ids, mask)
        ours = _ours(model, params, ids, mask, jit)
        np.testing.assert_allclose(ours * mask, reference * mask, atol=1e-4, rtol=0)
    # The reward LLaMA-Factory reads (right padding) is the one ppojax.sequence_reward reads (last real token).
    ids, mask = hf_builders.padded_batch(LENGTHS, 16, model.config.vocab_size, side="right", seed=6)
    last = np.asarray(mask).cumsum(-1).argmax(-1)
    np.testing.assert_allclose(
        _ours(model, params, ids, mask, jit)[np.arange(len(ids)), last],
        _lf_rewards(torch_model, head, ids, mask),
        atol=1e-4,
    )


@pytest.mark.parametrize("case", sorted(ADAPTERS))
def test_lora_reward_model_matches_peft(checkpoint, tmp_path, case):
    directory, base_dir, torch_model, head = _lora_checkpoint(checkpoint, tmp_path, case)
    model, params = load_valuehead_checkpoint(directory, base=base_dir)
    _, base_params = load_pretrained(base_dir, head="value")
    ids, mask = hf_builders.padded_batch(LENGTHS, 16, model.config.vocab_size, side="right", seed=7)
    reference = _lf_rewards(torch_model, head, ids, mask)
    last = mask.cumsum(-1).argmax(-1)
    for jit in (False, True):
        ours = _ours(model, params, ids, mask, jit)[np.arange(len(ids)), last]
        np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
    # The adapter changed the trunk (so the comparison above saw it): the base trunk with the same head is off.
    _, base_trunk = load_pretrained(base_dir, head="value")
    unadapted = {**{k: v for k, v in base_trunk.items() if k != "value_head"}, "score": params["score"]}
    off = _ours(model, unadapted, ids, mask, True)[np.arange(len(ids)), last]
    assert np.abs(off - reference).max() > 1e-2


def test_critic_from_llamafactory_reward_model_keeps_the_bias(checkpoint, tmp_path):
    directory, torch_model, head = _full_checkpoint(checkpoint, tmp_path)
    reward_model, reward_params = load_pretrained(directory, head="reward")
    critic, critic_params = load_pretrained(directory, head="value")
    assert critic.config.head_bias and set(critic_params["value_head"]) == {"kernel", "bias"}
    ids, mask = hf_builders.padded_batch(LENGTHS, 16, critic.config.vocab_size, seed=8)
    reward_out = hf_builders.jit_apply(reward_model, reward_params, ids, mask)
    np.testing.assert_array_equal(hf_builders.jit_apply(critic, critic_params, ids, mask).values, reward_out.scores)
    # values_from_hidden applies the bias eagerly and jitted; a shared-trunk head of this config starts at 0.
    for fn in (values_from_hidden, jax.jit(values_from_hidden)):
        shared = np.asarray(fn(critic_params["value_head"], reward_out.hidden))
        np.testing.assert_allclose(shared, np.asarray(reward_out.scores), atol=1e-6)
        without = np.asarray(fn({"kernel": critic_params["value_head"]["kernel"]}, reward_out.hidden))
        np.testing.assert_allclose(shared - without, BIAS, atol=1e-6)
    zero = init_value_head(critic.config)
    assert set(zero) == {"kernel", "bias"} and not np.asarray(values_from_hidden(zero, reward_out.hidden)).any()


def test_export_writes_llamafactory_layout_that_transformers_reads(checkpoint, tmp_path):
    directory, base_dir, torch_model, head = _lora_checkpoint(checkpoint, tmp_path, "qwen2")
    model, params = load_valuehead_checkpoint(directory, base=base_dir, head="value")
    params = jax.tree.map(lambda x: x + 0.01, params)  # as if trained
    out = tmp_path / "exported"
    save_pretrained(str(out), model, params)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", VALUE_HEAD_FILE]
    assert json.load(open(out / "config.json"))["architectures"] == ["Qwen2ForCausalLM"]
    # transformers reads the trunk as a causal LM, the head is the file beside it: LLaMA-Factory's `full` type.
    exported = hf_builders.CAUSAL_LM[type(torch_model.config)].from_pretrained(out).eval()
    from safetensors.torch import load_file

    exported_head = torch.nn.Linear(model.config.hidden_size, 1)
    exported_head.load_state_dict({k.split(".")[-1]: v for k, v in load_file(out / VALUE_HEAD_FILE).items()})
    ids, mask = hf_builders.padded_batch(LENGTHS, 16, model.config.vocab_size, side="right", seed=9)
    values = np.asarray(hf_builders.jit_apply(model, params, ids, mask).values)
    np.testing.assert_allclose(values * mask, _torch_values(exported, exported_head, ids, mask) * mask, atol=1e-4)
    reloaded_model, reloaded = load_pretrained(str(out), head="value")
    assert reloaded_model.config.head_bias and reloaded_model.head == "value"
    for (path, leaf), ref in zip(jax.tree_util.tree_leaves_with_path(reloaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(leaf, ref, err_msg=PL.path_string(path))


def test_sharded_load_equals_plain_load(checkpoint, tmp_path):
    directory, base_dir, _, _ = _lora_checkpoint(checkpoint, tmp_path, "qwen2")
    layout = PL.Layout(PL.MeshConfig(1, 4, 2).make_mesh())
    model, plain = load_valuehead_checkpoint(directory, base=base_dir)
    _, sharded = load_valuehead_checkpoint(
        directory, base=base_dir, shardings=lambda m: layout.params(m.param_shapes())
    )
    for (path, leaf), ref in zip(jax.tree_util.tree_leaves_with_path(sharded), jax.tree.leaves(plain)):
        assert len(leaf.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(leaf), np.asarray(ref), atol=1e-7, err_msg=PL.path_string(path))


def _rewrite_json(path, **changes):
    data = json.load(open(path))
    data.update(changes)
    json.dump(data, open(path, "w"))


def test_errors_name_the_file_and_what_is_wrong(checkpoint, tmp_path):
    directory, base_dir, _, _ = _lora_checkpoint(checkpoint, tmp_path, "qwen2")
    with pytest.raises(CheckpointError, match="LoRA reward model.*pass the base model"):
        load_valuehead_checkpoint(directory)
    with pytest.raises(CheckpointError, match="load_valuehead_checkpoint"):
        load_pretrained(directory, head="reward")
    full_dir, _, _ = _full_checkpoint(checkpoint, tmp_path)
    with pytest.raises(CheckpointError, match="a full reward model.*base= is only for adapters"):
        load_valuehead_checkpoint(full_dir, base=base_dir)
    with pytest.raises(ValueError, match="head 'reward' or 'value'"):
        load_valuehead_checkpoint(full_dir, head="lm")
    # The value head file.
    head_file = os.path.join(full_dir, VALUE_HEAD_FILE)
    save_file({"v_head.summary.weight": np.zeros((1, 32), np.float32)}, head_file)
    with pytest.raises(CheckpointError, match=rf"{VALUE_HEAD_FILE}: missing tensor 'v_head.summary.bias'"):
        load_pretrained(full_dir, head="reward")
    hidden = json.load(open(os.path.join(full_dir, "config.json")))["hidden_size"]
    save_file(
        {"v_head.summary.weight": np.zeros((1, hidden + 1), np.float32), "v_head.summary.bias": np.zeros(1)}, head_file
    )
    with pytest.raises(CheckpointError, match=rf"has {hidden + 1} inputs, the model .* has hidden_size {hidden}"):
        load_pretrained(full_dir, head="reward")
    os.remove(head_file)
    open(os.path.join(full_dir, "value_head.bin"), "wb").close()
    with pytest.raises(CheckpointError, match=r"value_head.bin: pickle checkpoints are never loaded"):
        load_pretrained(full_dir, head="reward")
    # The adapter.
    config_file = os.path.join(directory, "adapter_config.json")
    _rewrite_json(config_file, use_dora=True)
    with pytest.raises(CheckpointError, match=r"adapter_config.json: DoRA \(use_dora\) is not supported"):
        load_valuehead_checkpoint(directory, base=base_dir)
    _rewrite_json(config_file, use_dora=False, peft_type="IA3")
    with pytest.raises(CheckpointError, match="peft_type 'IA3'; only LORA"):
        load_valuehead_checkpoint(directory, base=base_dir)
    _rewrite_json(config_file, peft_type="LORA")
    weights = os.path.join(directory, "adapter_model.safetensors")
    from safetensors.numpy import load_file

    tensors = load_file(weights)
    key_a = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    save_file({k: v for k, v in tensors.items() if k != key_a}, weights)
    with pytest.raises(CheckpointError, match=r"q_proj has lora_B but not both lora_A and lora_B"):
        load_valuehead_checkpoint(directory, base=base_dir)
    key_b = key_a.replace("lora_A", "lora_B")
    rotary = {
        "base_model.model.model.rotary.lora_A.weight": tensors[key_a],
        "base_model.model.model.rotary.lora_B.weight": tensors[key_b],
    }
    save_file({**tensors, **rotary}, weights)
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors: LoRA on 'model.rotary', not a projection"):
        load_valuehead_checkpoint(directory, base=base_dir)
    save_file({**tensors, "base_model.model.model.norm.lora_magnitude_vector": tensors[key_a]}, weights)
    with pytest.raises(
        CheckpointError, match=r"'base_model.model.model.norm.lora_magnitude_vector' is not a LoRA factor"
    ):
        load_valuehead_checkpoint(directory, base=base_dir)
    os.remove(weights)
    with pytest.raises(CheckpointError, match="adapter_config.json but no adapter_model.safetensors"):
        load_valuehead_checkpoint(directory, base=base_dir)
    open(os.path.join(directory, "adapter_model.bin"), "wb").close()
    with pytest.raises(CheckpointError, match=r"adapter_model.bin: pickle checkpoints are never loaded"):
        load_valuehead_checkpoint(directory, base=base_dir)
