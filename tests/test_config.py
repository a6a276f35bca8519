"""Config loading and validation: every error is one ConfigError line naming the key, value and what is allowed."""

import os

import pytest
import yaml

from ppojax.config import ConfigError, TrainConfig, config_from_dict, load_config, parse_overrides
from ppojax.presets import PRESETS


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A current directory holding a fake model dir, a reward dir and a dataset, so relative paths resolve."""
    monkeypatch.chdir(tmp_path)
    for d in ("model", "saves/reward"):
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{}")
    with open("prompts.json", "w") as f:
        f.write('[{"instruction": "hi", "input": ""}]')
    with open("pairs.jsonl", "w") as f:
        f.write('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    return tmp_path


RM_YAML = """\
model_name_or_path: model
stage: rm
finetuning_type: lora
dataset: pairs.jsonl
template: qwen
output_dir: saves/reward
"""

PPO_YAML = """\
model_name_or_path: model
stage: ppo
do_train: true
finetuning_type: lora
reward_model: saves/reward
ppo_epochs: 4
ppo_target: 6.0
lora_rank: 64
lora_target: all
dataset: prompts.json
template: qwen
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-6
bf16: true
output_dir: saves/ppo
"""


def write(text, name="run.yaml"):
    with open(name, "w") as f:
        f.write(text)
    return name


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def base(**changes):
    raw = {
        "model_name_or_path": "model",
        "stage": "ppo",
        "dataset": "prompts.json",
        "output_dir": "out",
        "reward_model": "saves/reward",
    }
    raw.update(changes)
    return raw


def test_the_two_example_yamls_validate(workdir):
    rm = load_config(write(RM_YAML))
    assert rm.stage == "rm" and rm.finetuning_type == "lora" and rm.template == "qwen"
    assert rm.model_name_or_path == str(workdir / "model") and os.path.isabs(rm.dataset)
    ppo = load_config(write(PPO_YAML))
    assert ppo.stage == "ppo" and ppo.learning_rate == 1e-6 and ppo.bf16 and ppo.lora_rank == 64
    assert ppo.lora_target == "all" and ppo.lora_scale_alpha == 128.0
    assert (ppo.micro_batch_size, ppo.optimizer_batch_size, ppo.rollout_batch_size) == (1, 8, 8)
    # LLaMA-Factory passes no KL settings to TRL 0.x: adaptive from 0.2 towards ppo_target.
    conv = ppo.convention
    assert conv.adaptive_kl and conv.kl_coef == 0.2 and conv.kl_target == 6.0 and conv.kl_horizon == 10000.0
    assert ppo.early_stop_kl == 10.0


def test_overrides_are_yaml_scalars_and_win(workdir):
    cfg = load_config(write(PPO_YAML), ["learning_rate=2e-6", "bf16=false", "lora_target=q_proj,v_proj", "seed=7"])
    assert cfg.learning_rate == 2e-6 and cfg.bf16 is False and cfg.lora_target == ("q", "v") and cfg.seed == 7
    assert parse_overrides(["init_kl_coef=0.1"]) == {"kl_coef": 0.1}
    assert "not key=value" in error(parse_overrides, ["learning_rate"])


def test_unknown_key_names_the_nearest(workdir):
    msg = error(load_config, write(PPO_YAML + "ppo_epoch: 2\n"))
    assert "run.yaml" in msg and "'ppo_epoch'" in msg and "did you mean 'ppo_epochs'" in msg
    msg = error(load_config, write(PPO_YAML), ["learnig_rate=1e-5"])
    assert msg.startswith("command line") and "'learning_rate'" in msg
    assert "bf16" in error(config_from_dict, base(fp16=True))


def test_wrong_type_names_key_value_and_expected(workdir):
    msg = error(config_from_dict, base(ppo_epochs="four"))
    assert "'ppo_epochs'" in msg and "'four'" in msg and "integer" in msg
    assert "boolean" in error(config_from_dict, base(bf16="yes please"))
    assert "integer" in error(config_from_dict, base(lora_rank=True))
    assert "integer" in error(config_from_dict, base(ppo_epochs=1.5))
    # PyYAML reads 1e-6 (no dot) as a string; a number field accepts it.
    assert config_from_dict(base(learning_rate="1e-6")).learning_rate == 1e-6


def test_out_of_range_and_choices(workdir):
    msg = error(config_from_dict, base(learning_rate=0))
    assert "'learning_rate'" in msg and "> 0" in msg
    assert "<= 1.0" in error(config_from_dict, base(top_p=1.5))
    msg = error(config_from_dict, base(stage="ppo2"))
    assert "allowed: sft, rm, ppo" in msg and "did you mean 'ppo'" in msg
    assert "q_proj" in error(config_from_dict, base(lora_target="qkv_proj"))


def test_missing_required_and_paths(workdir):
    raw = base()
    del raw["output_dir"]
    assert "missing required key 'output_dir'" in error(config_from_dict, raw)
    assert "stage: rm" in error(config_from_dict, base(reward_model="saves/none"))
    assert "config.json" in error(config_from_dict, base(model_name_or_path="saves"))
    assert "dataset_info.json" in error(config_from_dict, base(dataset="my_ppo_prompts"))
    raw = base()
    del raw["reward_model"]
    assert "needs 'reward_model'" in error(config_from_dict, raw)


def test_inconsistent_batch_sizes_are_explained(workdir):
    msg = error(config_from_dict, base(batch_size=10, per_device_train_batch_size=2, gradient_accumulation_steps=4))
    assert "'batch_size' 10" in msg and "2 × 4 = 8" in msg and "multiple of 8" in msg
    msg = error(config_from_dict, base(batch_size=16, ppo_buffer_size=3, gradient_accumulation_steps=8))
    assert "ppo_buffer_size 3" in msg and "set only one" in msg
    cfg = config_from_dict(base(batch_size=32, mini_batch_size=2, gradient_accumulation_steps=4))
    assert (cfg.micro_batch_size, cfg.optimizer_batch_size, cfg.rollout_batch_size) == (2, 8, 32)
    assert config_from_dict(base(ppo_buffer_size=4, gradient_accumulation_steps=2)).rollout_batch_size == 8


def test_aliases_conflict(workdir):
    msg = error(config_from_dict, base(kl_coef=0.1, init_kl_coef=0.2))
    assert "kl_coef" in msg and "keep one" in msg


def test_preset_with_explicit_overrides(workdir):
    cfg = config_from_dict(base(preset="openrlhf", cliprange=0.1, lam=0.9))
    conv = cfg.convention
    assert conv.name == "openrlhf" and conv.clip_eps == 0.1 and conv.lam == 0.9
    assert conv.value_clip_eps == PRESETS["openrlhf"].value_clip_eps and conv.kl_clamp == 10.0
    assert config_from_dict(base(preset="trl")).convention == PRESETS["trl"]
    assert config_from_dict(base(preset="trl", cliprange_value=None)).convention.value_clip_eps is None
    # ppo_target with a fixed-β preset is a mistake, not a silent no-op.
    msg = error(config_from_dict, base(preset="trl", ppo_target=6.0))
    assert "no effect" in msg and "adap_kl_ctrl" in msg
    assert config_from_dict(base(preset="trl", ppo_target=3.0, adap_kl_ctrl=True)).convention.kl_target == 3.0
    assert "kl_estimator" in error(config_from_dict, base(kl_penalty="kl"))
    # LLaMA-Factory's own convention (TRL 0.9.6): its ppo_target applies, the micro-batch rules come with it.
    conv = config_from_dict(base(preset="llamafactory", ppo_target=3.0)).convention
    assert conv.loss_aggregation == "micro-token-mean" and conv.ratio_threshold == 10.0
    assert conv.adaptive_kl and conv.kl_coef == 0.2 and conv.kl_target == 3.0 and conv.log_ratio_clamp is None
    # TRL 0.9.6 scores log-probs at T = 1 whatever the sampling temperature; a key overrides it either way.
    assert conv.logprob_temperature == 1.0
    assert config_from_dict(base()).convention.logprob_temperature is None
    assert config_from_dict(base(logprob_temperature=0.7)).convention.logprob_temperature == 0.7
    msg = error(config_from_dict, base(preset="llamafactory", temperature=0.95, old_logprobs="rollout"))
    assert "old_logprobs: rollout reuses the log-probs sampled at temperature 0.95" in msg and "(preset)" in msg
    assert config_from_dict(base(preset="llamafactory", old_logprobs="rollout")).old_logprobs == "rollout"  # T 1
    msg = error(config_from_dict, base(logprob_temperature=1.0, temperature=0.7, old_logprobs="rollout"))
    assert "scored at 1.0 (logprob_temperature)" in msg
    # The shared value head has TRL's bias under the llamafactory preset (or when asked for).
    assert config_from_dict(base(preset="llamafactory", critic_mode="shared")).shared_value_head_bias
    assert not config_from_dict(base(critic_mode="shared")).shared_value_head_bias
    assert config_from_dict(base(critic_mode="shared", value_head_bias=True)).shared_value_head_bias
    assert not config_from_dict(
        base(preset="llamafactory", critic_mode="shared", value_head_bias=False)
    ).shared_value_head_bias
    assert "'value_head_bias' is for critic_mode: shared" in error(config_from_dict, base(value_head_bias=True))


def test_stage_and_finetuning_consistency(workdir):
    raw = base(stage="rm", ppo_epochs=2)
    del raw["reward_model"]
    assert "PPO setting" in error(config_from_dict, raw)
    assert "finetuning_type is 'full'" in error(config_from_dict, base(finetuning_type="full", lora_rank=4))


def test_frozen_and_hash(workdir):
    cfg = config_from_dict(base())
    with pytest.raises(Exception):
        cfg.seed = 1
    assert cfg.hash() == config_from_dict(base(logging_steps=3)).hash()
    assert cfg.hash() != config_from_dict(base(seed=3)).hash()
    assert isinstance(cfg, TrainConfig) and yaml.safe_dump(cfg.to_dict())


def test_yaml_errors_are_one_line(workdir):
    assert "invalid YAML" in error(load_config, write("a: [1, 2\n"))
    assert "mapping" in error(load_config, write("- 1\n- 2\n"))
    assert "no such config file" in error(load_config, "nope.yaml")


def test_choice_lists_match_the_library():
    from ppojax import config as C
    from ppojax import train

    assert C.CRITIC_MODES == train.CRITIC_MODES
    assert C.OLD_LOGPROBS == train.OLD_LOGPROBS


# LLaMA-Factory's own PPO example (examples/train_lora/llama3_lora_ppo.yaml, removed in its 2025 release), with
# local paths: every key either maps to ppojax or is an infrastructure knob accepted without effect.
LLAMAFACTORY_PPO_EXAMPLE = """\
### model
model_name_or_path: model
reward_model: saves/reward
trust_remote_code: true

### method
stage: ppo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all

### dataset
dataset: prompts.json
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/llama3-8b/lora/ppo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-5
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000

### generate
max_new_tokens: 512
top_k: 0
top_p: 0.9
"""


def test_llamafactory_example_yaml_runs_as_written(workdir):
    from ppojax.config import INERT_KEYS, load_config

    config = load_config(write(LLAMAFACTORY_PPO_EXAMPLE))
    assert config.ignored_keys == (
        "dataloader_num_workers",
        "ddp_timeout",
        "overwrite_cache",
        "plot_loss",
        "preprocessing_num_workers",
        "report_to",
        "trust_remote_code",
    )
    assert set(config.ignored_keys) <= set(INERT_KEYS)
    assert config.lr_scheduler_type == "cosine" and config.max_samples == 1000 and config.warmup_ratio == 0.1
    assert [config.warmup_for(n) for n in (1, 10, 11, 95)] == [1, 1, 2, 10]  # ceil, as transformers
    assert config.hash() == load_config(write(LLAMAFACTORY_PPO_EXAMPLE.replace("ddp_timeout", "# ddp_timeout"))).hash()
    assert "'report_to' is 'wandb'; ppojax reports to files only" in error(config_from_dict, base(report_to="wandb"))
    assert "not both" in error(config_from_dict, base(warmup_ratio=0.1, warmup_steps=3))
    assert "must be < 1" in error(config_from_dict, base(warmup_ratio=1.0))
    assert config_from_dict(base()).warmup_for(50) == 0


def test_llamafactory_generation_and_quantization_keys(workdir):
    # LLaMA-Factory's generating arguments: at ppojax's behaviour they are accepted (and named as ignored)...
    keys = dict(do_sample=True, num_beams=1, skip_special_tokens=True, temperature=0.95, top_p=0.7, top_k=50)
    config = config_from_dict(base(repetition_penalty=1.1, **keys))
    assert config.ignored_keys == ("do_sample", "num_beams", "skip_special_tokens")
    assert (config.repetition_penalty, config.temperature, config.top_p, config.top_k) == (1.1, 0.95, 0.7, 50)
    assert config.hash() != config_from_dict(base(**keys)).hash()  # the penalty changes the trajectory
    assert config_from_dict(base(**keys)).hash() == config_from_dict(base(temperature=0.95, top_p=0.7, top_k=50)).hash()
    assert config_from_dict(base()).repetition_penalty == 1.0
    # ... any other value is an error that says why.
    assert "'do_sample' is False; only True is accepted: PPO samples" in error(config_from_dict, base(do_sample=False))
    assert "'num_beams' is 4; only 1 is accepted: ppojax samples one" in error(config_from_dict, base(num_beams=4))
    assert "'num_beams' is True" in error(config_from_dict, base(num_beams=True))
    assert "'skip_special_tokens' is False" in error(config_from_dict, base(skip_special_tokens=False))
    for bad in (0, -1.0):
        assert "'repetition_penalty' is" in error(config_from_dict, base(repetition_penalty=bad))
    assert "is a PPO setting" in error(config_from_dict, base(stage="rm", reward_model=None, repetition_penalty=1.1))
    assert config_from_dict(base(default_system="Be brief.", template="qwen")).default_system == "Be brief."
    assert "'default_system' needs a chat template" in error(config_from_dict, base(default_system="Be brief."))
    assert config_from_dict(base(enable_thinking=False, template="qwen")).enable_thinking is False
    assert config_from_dict(base()).enable_thinking is None  # the template's own default
    assert config_from_dict(base(enable_thinking=False)).hash() != config_from_dict(base()).hash()
    assert "'enable_thinking' is 'no' (str); expected" in error(config_from_dict, base(enable_thinking="no"))
    assert "mesh: {fsdp: -1} is ZeRO-3" in error(config_from_dict, base(deepspeed="ds_z3_config.json"))
    assert "does not evaluate during training" in error(config_from_dict, base(val_size=0.1))
    assert config_from_dict(base(save_only_model=False)).ignored_keys == ("save_only_model",)
    for key in ("quantization_bit", "ref_model_quantization_bit", "reward_model_quantization_bit"):
        assert f"key '{key}' is not a ppojax key: ppojax does not quantize" in error(config_from_dict, base(**{key: 4}))


def test_optimizer_keys_as_transformers_names(workdir):
    """weight_decay / adam_beta1 / adam_beta2 / adam_epsilon / optim (transformers' TrainingArguments names, in
    LLaMA-Factory YAMLs) reach both PPO optimizers and the sft / rm one (`optimizer_options`)."""
    from ppojax.runner_ppo import RunControl, make_ppo_config

    keys = dict(weight_decay=0.01, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, optim="adamw_torch_fused")
    config = config_from_dict(base(max_steps=10, critic_learning_rate=1e-5, **keys))
    ppo = make_ppo_config(config, iterations=10, pad_token_id=0, stop_ids=(1,), control=RunControl())
    for opt in (ppo.policy_optimizer, ppo.critic_optimizer):
        assert (opt.weight_decay, opt.b1, opt.b2, opt.eps, opt.max_grad_norm) == (0.01, 0.8, 0.95, 1e-6, 1.0)
    assert (ppo.policy_optimizer.learning_rate, ppo.critic_optimizer.learning_rate) == (5e-5, 1e-5)
    rm_raw = {k: v for k, v in base(stage="rm", dataset="pairs.jsonl", **keys).items() if k != "reward_model"}
    rm = config_from_dict(rm_raw)
    assert rm.optimizer_options() == dict(max_grad_norm=1.0, b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.01)
    # The defaults are transformers' (and what ppojax used before the keys existed): the hash is unchanged.
    plain = config_from_dict(base())
    assert plain.optimizer_options() == dict(max_grad_norm=1.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    assert config_from_dict(base(**{k: v for k, v in keys.items() if k == "optim"})).hash() == plain.hash()
    assert config_from_dict(base(weight_decay=0.01)).hash() != plain.hash()
    assert "'optim' is 'adafactor'; ppojax's optimizer is PyTorch's AdamW" in error(
        config_from_dict, base(optim="adafactor")
    )
    assert "'adam_beta2' is 1.0; must be < 1" in error(config_from_dict, base(adam_beta2=1.0))
    assert "'adam_epsilon' is 0.0; must be > 0" in error(config_from_dict, base(adam_epsilon=0))
    assert "'weight_decay' is -0.1; must be >= 0" in error(config_from_dict, base(weight_decay=-0.1))


def test_more_llamafactory_keys_accepted_at_ppojax_behaviour(workdir):
    """LLaMA-Factory model / LoRA / data keys: at ppojax's behaviour accepted and named as ignored, any other
    value refused with why; use_rslora sets the LoRA scale as PEFT does."""
    import peft
    import torch

    defaults = dict(lora_dropout=0, use_dora=False, packing=False, neat_packing=False, train_on_prompt=False)
    inert = dict(enable_liger_kernel=True, use_unsloth=False, low_cpu_mem_usage=True, cache_dir="/tmp/hf")
    config = config_from_dict(base(use_fast_tokenizer=True, disable_gradient_checkpointing=False, **defaults, **inert))
    assert set(config.ignored_keys) == {*defaults, *inert, "use_fast_tokenizer", "disable_gradient_checkpointing"}
    assert config.hash() == config_from_dict(base()).hash()
    assert "'lora_dropout' is 0.05; only 0.0 is accepted: ppojax uses no dropout" in error(
        config_from_dict, base(lora_dropout=0.05)
    )
    assert "'use_dora' is True; only False is accepted: DoRA is not offered" in error(
        config_from_dict, base(use_dora=True)
    )
    assert "'train_on_prompt' is True" in error(config_from_dict, base(train_on_prompt=True))
    assert "'packing' is True" in error(config_from_dict, base(packing=True))

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    for rslora in (False, True):
        ours = config_from_dict(base(lora_rank=16, lora_alpha=32, use_rslora=rslora))
        lora = peft.LoraConfig(r=16, lora_alpha=32, use_rslora=rslora, target_modules=["q_proj"])
        theirs = peft.get_peft_model(Tiny(), lora).base_model.model.q_proj.scaling["default"]
        assert ours.lora_scale_alpha / ours.lora_rank == pytest.approx(theirs, rel=1e-12), rslora
    assert config_from_dict(base(use_rslora=True)).hash() != config_from_dict(base()).hash()
    assert "'use_rslora' is set but finetuning_type is 'full'" in error(
        config_from_dict, base(finetuning_type="full", use_rslora=True)
    )


# The config keys of ppojax 20ef444 (2026-11-22): a checkpoint written then must still match after an upgrade.
KEYS_OF_20EF444 = (
    "adap_kl_ctrl",
    "adapter_name_or_path",
    "batch_size",
    "bf16",
    "cliprange",
    "cliprange_value",
    "create_new_adapter",
    "critic_learning_rate",
    "critic_mode",
    "cutoff_len",
    "dataset",
    "dataset_dir",
    "distributed",
    "do_train",
    "early_stop_kl",
    "entropy_coef",
    "finetuning_type",
    "gamma",
    "gradient_accumulation_steps",
    "horizon",
    "kl_coef",
    "kl_estimator",
    "kl_rule",
    "lam",
    "learning_rate",
    "length_penalty",
    "length_reward",
    "logging_steps",
    "logprob_temperature",
    "lora_alpha",
    "lora_rank",
    "lora_target",
    "lr_scheduler_type",
    "max_grad_norm",
    "max_new_tokens",
    "max_prompt_length",
    "max_rollbacks",
    "max_samples",
    "max_steps",
    "max_to_keep",
    "mesh",
    "missing_eos_penalty",
    "model_name_or_path",
    "num_samples",
    "num_train_epochs",
    "old_logprobs",
    "on_kl_exceeded",
    "output_dir",
    "overwrite_output_dir",
    "pad_multiple",
    "per_device_train_batch_size",
    "ppo_buffer_size",
    "ppo_epochs",
    "ppo_score_norm",
    "ppo_target",
    "ppo_whiten_rewards",
    "preset",
    "prompt_overflow",
    "ref_model",
    "resume",
    "reward_model",
    "reward_model_type",
    "rm_max_length_diff",
    "rollback_kl_coef_scale",
    "rollback_lr_scale",
    "samples_every",
    "save_steps",
    "seed",
    "stage",
    "stages",
    "target_kl",
    "temperature",
    "template",
    "tensorboard",
    "top_k",
    "top_p",
    "value_head_bias",
    "vf_coef",
    "warmup_ratio",
    "warmup_steps",
)


def test_keys_added_later_leave_the_hash_alone_at_their_default(workdir):
    from ppojax.config import _FIELDS, HASH_NEUTRAL_AT_DEFAULT

    # Every key is one of 20ef444's or listed as neutral at its default (so a new key must choose).
    assert set(_FIELDS) == set(KEYS_OF_20EF444) | HASH_NEUTRAL_AT_DEFAULT
    assert not set(KEYS_OF_20EF444) & HASH_NEUTRAL_AT_DEFAULT
    config = config_from_dict(base(top_k=50))
    # 20ef444's hash: sha256 of its keys' values minus the non-trajectory ones (its formula, written out).
    import hashlib
    import json

    from ppojax.config import _NON_TRAJECTORY_KEYS

    old = {k: getattr(config, k) for k in KEYS_OF_20EF444 if k not in _NON_TRAJECTORY_KEYS}
    assert config.hash() == hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    for key, value in (("repetition_penalty", 1.2), ("default_system", "Be brief.")):
        changed = config_from_dict(base(top_k=50, template="qwen", **{key: value}))
        assert changed.hash() != config_from_dict(base(top_k=50, template="qwen")).hash(), key
