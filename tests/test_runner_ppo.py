"""The PPO runner's pieces in-process: the YAML → PPOConfig mapping, the run guard, the score normalisation."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from ppojax import train
from ppojax.config import config_from_dict
from ppojax.data import PromptDataset
from ppojax.models import DecoderModel, ModelConfig, init_params
from ppojax.runner_ppo import PPOInputs, RunControl, fit_score_normalisation, make_ppo_config, rejection


@pytest.fixture
def paths(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "prompts.json").write_text("[]")
    return tmp_path


def ppo_train_config(paths, **keys):
    raw = dict(
        model_name_or_path=str(paths / "model"),
        reward_model=str(paths / "model"),
        stage="ppo",
        dataset=str(paths / "prompts.json"),
        output_dir=str(paths / "out"),
    )
    return config_from_dict({**raw, **keys})


def test_ppo_config_mapping(paths):
    config = ppo_train_config(
        paths,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        ppo_buffer_size=3,
        ppo_epochs=2,
        target_kl=0.1,
        bf16=True,
        learning_rate=1e-6,
        critic_learning_rate=1e-5,
        warmup_steps=2,
        max_grad_norm=0.0,
        cliprange=0.1,
        top_k=5,
        repetition_penalty=1.2,
        old_logprobs="rollout",
    )
    control = RunControl(lr_scale=0.5, reward_gain=2.0, reward_bias=-1.0)
    ppo = make_ppo_config(config, iterations=7, pad_token_id=9, stop_ids=(3, 4), control=control)
    assert (ppo.batch_size, ppo.minibatch_size, ppo.micro_batch_size) == (24, 8, 2)
    assert ppo.ppo_epochs == 2 and ppo.updates_per_iteration == 2 * 3
    assert ppo.early_stop_kl == pytest.approx(0.15)  # TRL 0.x: 1.5 × target_kl
    assert ppo.master_dtype == "float32" and ppo.top_k == 5 and ppo.stop_token_ids == (3, 4)
    assert ppo.pad_token_id == 9 and ppo.reward_gain == 2.0 and ppo.reward_bias == -1.0
    assert ppo.old_logprobs == "rollout" and ppo.repetition_penalty == 1.2
    assert ppo.convention.clip_eps == 0.1 and ppo.convention.adaptive_kl and ppo.convention.kl_coef == 0.2
    for optimizer, lr in ((ppo.policy_optimizer, 1e-6), (ppo.critic_optimizer, 1e-5)):
        assert optimizer.learning_rate == pytest.approx(0.5 * lr)
        assert optimizer.total_steps == 7 * 2 * 3 and optimizer.warmup_steps == 2
        assert optimizer.max_grad_norm is None and optimizer.schedule == "linear"
    plain = make_ppo_config(ppo_train_config(paths), iterations=1, pad_token_id=0, stop_ids=(), control=RunControl())
    assert plain.early_stop_kl is None and plain.master_dtype is None and plain.critic_mode == "separate"
    assert plain.old_logprobs == "score" and plain.repetition_penalty == 1.0


def test_cosine_schedule_and_warmup_ratio_reach_both_optimizers(paths):
    config = ppo_train_config(paths, lr_scheduler_type="cosine", warmup_ratio=0.1, learning_rate=1e-6)
    control = RunControl(lr_scale=1.0, reward_gain=1.0, reward_bias=0.0)
    ppo = make_ppo_config(config, iterations=7, pad_token_id=9, stop_ids=(3,), control=control)
    total = 7 * config.ppo_epochs * (config.rollout_batch_size // config.optimizer_batch_size)
    for optimizer in (ppo.policy_optimizer, ppo.critic_optimizer):
        assert optimizer.schedule == "cosine" and optimizer.total_steps == total
        assert optimizer.warmup_steps == math.ceil(0.1 * total)


def test_rejection_rules(paths):
    config = ppo_train_config(paths, early_stop_kl=2.0)
    ok = {"objective/kl": 1.9, "loss/total": 0.3}
    assert rejection(ok, config) is None
    assert rejection({**ok, "objective/kl": 2.5}, config) == "KL 2.5 > early_stop_kl 2"
    assert rejection({**ok, "loss/total": math.nan}, config) == "non-finite loss"
    assert rejection({**ok, "objective/kl": math.inf}, config) == "non-finite KL"
    off = ppo_train_config(paths, early_stop_kl=None)
    assert rejection({**ok, "objective/kl": 1e9}, off) is None


@pytest.mark.slow  # two compilations of the collect phase (~20 s on the shared 2-core machine)
def test_score_normalisation_gives_mean_0_std_1_on_the_fitted_responses(paths):
    config = ppo_train_config(paths, max_new_tokens=4, max_prompt_length=8, ppo_score_norm=True, seed=3)
    model_config = ModelConfig(
        model_type="qwen2",
        vocab_size=16,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    policy = DecoderModel(model_config)
    reward = DecoderModel(model_config, head="reward")
    policy_params = init_params(policy, jax.random.PRNGKey(0))
    reward_params = init_params(reward, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    prompts = tuple(tuple(int(t) for t in rng.integers(1, 15, size=rng.integers(1, 8))) for _ in range(40))
    tokenizer = type("Tok", (), {"pad_token_id": 15})()
    inputs = PPOInputs(
        tokenizer, PromptDataset(prompts, ("",) * 40, 0), policy, policy_params, policy_params, reward, reward_params
    )
    ppo = make_ppo_config(config, iterations=1, pad_token_id=15, stop_ids=(0,), control=RunControl())
    ppo = dataclasses.replace(ppo, batch_size=32, minibatch_size=32, micro_batch_size=32)
    state, models = train.init_ppo_state(
        ppo, policy, policy_params, jax.random.PRNGKey(0), reward_model=reward, reward_params=reward_params
    )
    gain, bias = fit_score_normalisation(config, ppo, models, state, inputs)
    # The same two batches with the fitted map applied inside collect: mean 0, population std 1.
    normalised = ppo.replace(reward_gain=gain, reward_bias=bias)
    raw = ppo.replace(reward_gain=1.0, reward_bias=0.0)
    scores, raw_scores = [], []
    from ppojax.data import prompt_batches

    for cfg, out in ((normalised, scores), (raw, raw_scores)):
        s = state.replace(key=jax.random.fold_in(jax.random.PRNGKey(config.seed), 0x5C0))
        batches = prompt_batches(inputs.dataset, 32, pad_token_id=15, seed=config.seed, bucket=8)
        for _ in range(2):
            batch = next(batches)
            s, experience = train.collect(
                s, (batch.ids, batch.mask), policy_params, reward_params, config=cfg, models=models
            )
            out.append(np.asarray(experience.scores, np.float64))
    scores, raw_scores = np.concatenate(scores), np.concatenate(raw_scores)
    assert raw_scores.std() > 0 and abs(gain - 1 / raw_scores.std()) < 1e-4 * gain
    assert abs(scores.mean()) < 1e-4 and abs(scores.std() - 1) < 1e-4


def test_stop_ids_include_the_generation_config_eos(tmp_path):
    """transformers' `generate` stops at generation_config.json's eos_token_id too: Llama 3 Instruct's first
    release lists its end-of-turn token (<|eot_id|>) only there."""
    import json
    from types import SimpleNamespace

    from ppojax.config import ConfigError
    from ppojax.runner_ppo import stop_token_ids

    model = SimpleNamespace(config=SimpleNamespace(eos_token_ids=(5,)))
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert stop_token_ids(tokenizer, model) == (5, 7) == stop_token_ids(tokenizer, model, str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 5], "do_sample": True}))
    assert stop_token_ids(tokenizer, model, str(tmp_path)) == (5, 7, 9)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert stop_token_ids(tokenizer, model, str(tmp_path)) == (5, 7, 11)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "eot"}))
    with pytest.raises(ConfigError, match=r"generation_config.json: eos_token_id must be an id or a list of ids"):
        stop_token_ids(tokenizer, model, str(tmp_path))
