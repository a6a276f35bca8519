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


# ---- adapter_name_or_path: starting from LLaMA-Factory LoRA adapters (e.g. its sft output_dir) ----------------


def build_peft_adapter(base_dir, out_dir, targets, seed: int, **options):
    """A PEFT LoRA adapter on `base_dir` with non-zero factors, saved to `out_dir`; returns the torch PeftModel."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options)
    model = peft.get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.mul_(8.0)
    model.save_pretrained(out_dir)
    return model


def torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module")
def sft_adapters(lf_setup):
    root = lf_setup[0]
    first = build_peft_adapter(root / "base", root / "sft1", "all-linear", seed=1)
    second = build_peft_adapter(root / "base", root / "sft2", ["q_proj", "v_proj"], seed=2)
    return root, first, second


def test_the_last_adapter_is_resumed_and_the_reference_is_the_base(sft_adapters):
    from ppojax.models.peft_adapters import adapter_as_lora

    root, first, _ = sft_adapters
    config = ppo_config(root, adapter_name_or_path=str(root / "sft1"))
    assert config.adapters_to_merge == () and config.adapter_to_resume == str(root / "sft1")
    inputs = load_inputs(config)
    lora = adapter_as_lora(config.adapter_to_resume, inputs.policy_model)
    assert lora.scale == 2.0 and set(lora.adapters["layers_0"]["attn"]) == {"q", "k", "v", "o"}
    ids = np.random.default_rng(1).integers(3, 20, (3, 7))
    mask = np.ones_like(ids)
    vocab = first.config.vocab_size
    policy = inputs.policy_model.apply(inputs.policy_params, ids, mask, lora=lora).logits[..., :vocab]
    np.testing.assert_allclose(np.asarray(policy), torch_logits(first, ids), atol=1e-4)
    with first.disable_adapter():  # LLaMA-Factory's reference: the same model with its adapter off
        np.testing.assert_allclose(
            np.asarray(inputs.policy_model.apply(inputs.policy_params, ids, mask).logits[..., :vocab]),
            torch_logits(first, ids),
            atol=1e-4,
        )


def test_merged_adapters_reach_the_policy_and_the_lora_reward_base(lf_setup, sft_adapters):
    root, first, second = sft_adapters
    _, reward_torch, head = lf_setup
    adapters = f"{root / 'sft1'},{root / 'sft2'}"
    inputs = load_inputs(ppo_config(root, adapter_name_or_path=adapters, create_new_adapter=True))
    # PEFT merging the two adapters in turn, as LLaMA-Factory does.
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    for name in ("sft1", "sft2"):
        merged = peft.PeftModel.from_pretrained(merged, root / name).merge_and_unload()
    ids = np.random.default_rng(2).integers(3, 20, (3, 7))
    mask = np.ones_like(ids)
    vocab = merged.config.vocab_size
    ours = inputs.policy_model.apply(inputs.policy_params, ids, mask).logits[..., :vocab]
    np.testing.assert_allclose(np.asarray(ours), torch_logits(merged, ids), atol=1e-4)
    # The LoRA reward model goes on the merged model (LLaMA-Factory loads it onto the policy's pretrained model).
    rm = peft.PeftModel.from_pretrained(merged, root / "rm").eval()
    with torch.no_grad():
        hidden = rm(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states[-1]
        reference = head(hidden)[..., 0].numpy()
    scores = inputs.reward_model.apply(inputs.reward_params, ids, mask).scores
    np.testing.assert_allclose(np.asarray(scores), reference, atol=1e-4)


def test_ref_and_reward_model_adapters_are_merged_as_llamafactory_does(lf_setup, sft_adapters):
    """LLaMA-Factory's ref_model_adapters / reward_model_adapters (reward_model_type: full): the adapters are merged
    into that model in turn; for the reward model the last adapter is a LoRA rm output_dir whose value head is the
    head (LLaMA-Factory's `load_model(add_valuehead=True)` reads it from the last adapter)."""
    root, first, second = sft_adapters
    _, _, head = lf_setup
    config = ppo_config(
        root,
        finetuning_type="full",
        ref_model=str(root / "base"),
        ref_model_adapters=f"{root / 'sft1'},{root / 'sft2'}",
        reward_model=str(root / "base"),
        reward_model_type="full",
        reward_model_adapters=[str(root / "sft2"), str(root / "rm")],
    )
    inputs = load_inputs(config)

    def merged(*names):
        model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        for name in names:
            model = peft.PeftModel.from_pretrained(model, root / name).merge_and_unload()
        return model

    ids = np.random.default_rng(3).integers(3, 20, (3, 7))
    mask = np.ones_like(ids)
    reference = merged("sft1", "sft2")
    vocab = reference.config.vocab_size
    ref_logits = inputs.policy_model.apply(inputs.ref_params, ids, mask).logits[..., :vocab]
    np.testing.assert_allclose(np.asarray(ref_logits), torch_logits(reference, ids), atol=1e-4)
    # The policy itself is the plain base (no adapter_name_or_path): the reference's adapters are its own.
    policy_logits = inputs.policy_model.apply(inputs.policy_params, ids, mask).logits[..., :vocab]
    assert np.abs(np.asarray(policy_logits) - np.asarray(ref_logits)).max() > 1e-2
    rm = peft.PeftModel.from_pretrained(merged("sft2"), root / "rm").eval()
    with torch.no_grad():
        hidden = rm(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states[-1]
        want = head(hidden)[..., 0].numpy()
    scores = inputs.reward_model.apply(inputs.reward_params, ids, mask).scores
    np.testing.assert_allclose(np.asarray(scores), want, atol=1e-4)
    # With LoRA (LLaMA-Factory allows a ref_model there too): the adapters sit on the policy's base, the reference
    # is the model of its own.
    lora_inputs = load_inputs(config.replace(finetuning_type="lora"))
    assert isinstance(lora_inputs.ref_params, train.LoraReference)
    assert lora_inputs.ref_params.base is lora_inputs.policy_params
    lora_ref = inputs.policy_model.apply(lora_inputs.ref_params.reference, ids, mask).logits[..., :vocab]
    np.testing.assert_allclose(np.asarray(lora_ref), torch_logits(reference, ids), atol=1e-4)
    without = peft.PeftModel.from_pretrained(merged(), root / "rm").eval()  # the first adapter matters here
    with torch.no_grad():
        hidden = without(input_ids=torch.from_numpy(ids.astype(np.int64)), output_hidden_states=True).hidden_states[-1]
        assert np.abs(head(hidden)[..., 0].numpy() - want).max() > 1e-2


def test_adapter_keys_are_checked(lf_setup, sft_adapters, tmp_path):
    from ppojax.models import CheckpointError, load_pretrained
    from ppojax.models.peft_adapters import adapter_as_lora

    root = lf_setup[0]
    with pytest.raises(ConfigError, match="'adapter_name_or_path' needs finetuning_type: lora"):
        ppo_config(root, adapter_name_or_path=str(root / "sft1"), finetuning_type="full")
    with pytest.raises(ConfigError, match=r"has no adapter_config.json \(expected a local PEFT LoRA adapter"):
        ppo_config(root, adapter_name_or_path=str(root / "base"))
    with pytest.raises(ConfigError, match="'create_new_adapter' needs 'adapter_name_or_path'"):
        ppo_config(root, create_new_adapter=True)
    with pytest.raises(ConfigError, match="'ref_model_adapters' needs 'ref_model'"):
        ppo_config(root, ref_model_adapters=str(root / "sft1"))
    with pytest.raises(ConfigError, match=r"'reward_model_adapters' applies to a full reward_model .*rm is a LoRA"):
        ppo_config(root, reward_model_adapters=str(root / "sft1"))
    with pytest.raises(ConfigError, match=r"must be a LLaMA-Factory LoRA reward model .*sft1/value_head.safetensors"):
        ppo_config(root, reward_model=str(root / "base"), reward_model_adapters=str(root / "sft1"))
    with pytest.raises(ConfigError, match=r"'ref_model_adapters' has .*base.* no adapter_config.json"):
        ppo_config(root, ref_model=str(root / "base"), ref_model_adapters=str(root / "base"), finetuning_type="full")
    model, _ = load_pretrained(str(root / "base"))
    build_peft_adapter(root / "base", tmp_path / "pattern", ["q_proj", "v_proj"], seed=3, alpha_pattern={"v_proj": 2})
    with pytest.raises(CheckpointError, match=r"different scales \[0.5, 2.0\].*merge it \(create_new_adapter: true\)"):
        adapter_as_lora(str(tmp_path / "pattern"), model)
    build_peft_adapter(root / "base", tmp_path / "saved", ["q_proj"], seed=4, modules_to_save=["embed_tokens"])
    with pytest.raises(CheckpointError, match="modules_to_save: 'model.embed_tokens.weight'"):
        adapter_as_lora(str(tmp_path / "saved"), model)


def test_rm_and_sft_stages_resume_or_merge_the_adapter_too(sft_adapters):
    from safetensors.numpy import load_file

    from ppojax import runner

    root = sft_adapters[0]
    (root / "pairs.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": "yes", "rejected": "no"}) + "\n")
    keys = dict(stage="rm", model_name_or_path=str(root / "base"), dataset=str(root / "pairs.jsonl"))
    config = config_from_dict({**keys, "output_dir": str(root / "rm_out"), "adapter_name_or_path": str(root / "sft1")})
    model, params = runner.load_model(config, "reward")
    trainable, base = runner._trainable(config, model, params)
    factors = load_file(str(root / "sft1" / "adapter_model.safetensors"))
    a = factors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    np.testing.assert_array_equal(np.asarray(trainable["lora"].adapters["layers_0"]["mlp"]["up"]["a"]), a.T)
    assert set(trainable) == {"lora", "score"} and base is params
    # create_new_adapter: the adapter is in the weights and a fresh LoRA (b = 0) is trained on top.
    config = config.replace(create_new_adapter=True)
    model, params = runner.load_model(config, "reward")
    trainable, _ = runner._trainable(config, model, params)
    assert not np.asarray(trainable["lora"].adapters["layers_0"]["attn"]["q"]["b"]).any()
    fresh = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(fresh, root / "sft1").merge_and_unload()
    up = merged.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy().T
    np.testing.assert_allclose(np.asarray(params["layers_0"]["mlp"]["up"]["kernel"]), up, atol=1e-6)


def test_ppo_reads_a_llamafactory_dataset_name(lf_setup):
    """The seed documents' PPO YAML names its prompts (`dataset: my_ppo_prompts`), described in
    dataset_info.json as alpaca records with empty inputs."""
    root = lf_setup[0]
    data = root / "lf_data"
    data.mkdir(exist_ok=True)
    records = [{"instruction": "hi there", "input": ""}, {"instruction": "write", "input": "a poem"}]
    (data / "ppo.json").write_text(json.dumps(records))
    (data / "dataset_info.json").write_text(json.dumps({"my_ppo_prompts": {"file_name": "ppo.json"}}))
    named = load_inputs(ppo_config(root, dataset="my_ppo_prompts", dataset_dir=str(data), template="qwen"))
    by_file = load_inputs(ppo_config(root, template="qwen"))  # prompts.json: "hi there", "write a poem"
    assert named.dataset.prompts == by_file.dataset.prompts
