"""A reward model trained by LLaMA-Factory (`stage: rm`, LoRA: its default) used by a ppojax PPO config, as the
seed documents' users run step 1 in LLaMA-Factory and step 2 here: `reward_model` points at LLaMA-Factory's
output_dir, the adapter is applied to `model_name_or_path` (LLaMA-Factory applies it to the policy's base), the
value head's bias is kept, and a tokenizer without a pad token (LLaMA-Factory pads with EOS) still lines up."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from ppojax import train
from ppojax.config import ConfigError, config_from_dict
from ppojax.generation import sequence_reward
from ppojax.runner_ppo import load_inputs
from tests.test_data import make_tokenizer
from tests.tiny_models import save_tiny_model

BIAS = -0.6


def build_llamafactory_lora_rm(base_dir, out_dir, seed: int = 0):
    """PEFT adapter + tokenizer (pad = EOS, LLaMA-Factory's fallback) + value_head.safetensors, as
    LLaMA-Factory's rm stage leaves its output_dir; returns the torch reference `(peft model, v_head)`."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(base, lora).eval()
    with torch.no_grad():  # PEFT's non-default init is small; make the adapter matter at this size
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(8.0)
    model.save_pretrained(out_dir)
    lf_tokenizer = make_tokenizer(pad="<eos>")
    lf_tokenizer.save_pretrained(out_dir)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.5)
        head.bias.fill_(BIAS)
    tensors = {"v_head.summary.weight": head.weight.detach().numpy(), "v_head.summary.bias": head.bias.detach().numpy()}
    save_file(tensors, os.path.join(out_dir, "value_head.safetensors"), metadata={"format": "pt"})
    return model, head


@pytest.fixture(scope="module")
def lf_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lf_rm")
    tokenizer = make_tokenizer()  # no pad token: ppojax adds one, LLaMA-Factory used EOS
    save_tiny_model(root / "base", tokenizer, model_type="qwen2", max_position_embeddings=64)
    torch_model, head = build_llamafactory_lora_rm(root / "base", root / "rm")
    (root / "prompts.json").write_text(json.dumps([{"prompt": "hi there"}, {"prompt": "write a poem"}]))
    return root, torch_model, head


def ppo_config(root, **keys):
    raw = dict(
        stage="ppo",
        model_name_or_path=str(root / "base"),
        reward_model=str(root / "rm"),
        dataset=str(root / "prompts.json"),
        output_dir=str(root / "out"),
        max_prompt_length=16,
        max_new_tokens=8,
    )
    return config_from_dict({**raw, **keys})


def test_ppo_inputs_read_the_llamafactory_reward_as_llamafactory_computes_it(lf_setup):
    root, torch_model, head = lf_setup
    inputs = load_inputs(ppo_config(root, reward_model_type="lora"))
    reward_model, reward_params = inputs.reward_model, inputs.reward_params
    pad = inputs.tokenizer.pad_token_id
    assert reward_model.config.head_bias and reward_model.config.vocab_size == pad + 1 == len(inputs.tokenizer)
    # Prompts left-padded with ppojax's pad, responses right-padded; LLaMA-Factory scores the concatenation
    # right-padded and reads attention_mask.sum(-1) - 1.
    rng = np.random.default_rng(0)
    prompt_lengths, response_lengths = [3, 5, 2, 4], [4, 1, 6, 3]
    prompt_ids = np.full((4, 5), pad, np.int32)
    prompt_mask = np.zeros((4, 5), np.int32)
    response_ids = np.full((4, 6), pad, np.int32)
    response_mask = np.zeros((4, 6), np.int32)
    reference = []
    for row, (p, r) in enumerate(zip(prompt_lengths, response_lengths)):
        tokens = rng.integers(3, pad, p + r)
        prompt_ids[row, 5 - p :], prompt_mask[row, 5 - p :] = tokens[:p], 1
        response_ids[row, :r], response_mask[row, :r] = tokens[p:], 1
        with torch.no_grad():
            out = torch_model(input_ids=torch.from_numpy(tokens[None].astype(np.int64)), output_hidden_states=True)
            reference.append(float(head(out.hidden_states[-1])[0, -1, 0]))
    args = (prompt_ids, prompt_mask, response_ids, response_mask)
    ours = sequence_reward(reward_model, reward_params, *args)
    np.testing.assert_allclose(np.asarray(ours), reference, atol=1e-4)
    jitted = jax.jit(sequence_reward, static_argnums=0)(reward_model, reward_params, *args)
    np.testing.assert_allclose(np.asarray(jitted), reference, atol=1e-4)
    # The critic initialised from it (critic_mode separate / joint) starts from the same head, bias included.
    critic_model, critic_params = train.critic_from_reward(reward_model, reward_params)
    assert float(critic_params["value_head"]["bias"][0]) == pytest.approx(BIAS)
    ids = np.concatenate([prompt_ids, response_ids], axis=1)
    mask = np.concatenate([prompt_mask, response_mask], axis=1)
    values = critic_model.apply(critic_params, ids, mask).values
    scores = reward_model.apply(reward_params, ids, mask).scores
    np.testing.assert_array_equal(np.asarray(values), np.asarray(scores))


def test_reward_model_type_is_checked_against_the_directory(lf_setup):
    root, _, _ = lf_setup
    with pytest.raises(ConfigError, match=r"'reward_model_type' is 'full' but reward_model .*rm holds a LoRA adapter"):
        ppo_config(root, reward_model_type="full")
    with pytest.raises(ConfigError, match="reward_model_type"):
        ppo_config(root, reward_model_type="api")


def test_eval_rm_scores_a_llamafactory_lora_reward_model(lf_setup, capsys):
    from ppojax.cli import main
    from ppojax.data import ensure_pad_token, load_preferences, load_tokenizer

    root, torch_model, head = lf_setup
    pairs = root / "pairs.jsonl"
    rows = [
        {"prompt": "hi there", "chosen": "good yes", "rejected": "bad"},
        {"prompt": "a", "chosen": "cat", "rejected": "no no"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["eval-rm", "--model", str(root / "rm"), "--data", str(pairs)]
    assert main(args) == 2
    assert "a LoRA reward model (adapter_config.json); pass the base model" in capsys.readouterr().err
    assert main([*args, "--base", str(root / "base"), "--json", str(root / "eval.json")]) == 0
    result = json.loads((root / "eval.json").read_text())
    # Reference: the same token ids through PEFT + the value head, the score at each sequence's last token.
    tokenizer, _ = ensure_pad_token(load_tokenizer(str(root / "rm")))
    dataset = load_preferences(str(pairs), tokenizer, template="default", cutoff_len=2048)
    scores = []
    for prompt, answers in zip(dataset.prompts, dataset.responses):
        for answer in answers:
            ids = torch.tensor([list(prompt) + list(answer)])
            with torch.no_grad():
                scores.append(
                    float(head(torch_model(input_ids=ids, output_hidden_states=True).hidden_states[-1])[0, -1, 0])
                )
    assert result["responses"] == 4
    assert result["score_mean"] == pytest.approx(np.mean(scores), abs=1e-4)
