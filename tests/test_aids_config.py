"""Config keys of the practitioner aids (issue 10): the KL step rule, RM length filtering, length-aware rewards."""

import pytest

from ppojax.config import config_from_dict
from ppojax.train import kl_controller
from test_config import base, error, workdir  # noqa: F401  (workdir is a fixture)


def test_kl_rule_selects_the_step_controller(workdir):
    config = config_from_dict(base(kl_rule="step"))
    assert config.convention.kl_rule == "step" and config.convention.adaptive_kl
    controller = kl_controller(config.convention)
    state = controller.update(controller.init(), 100.0, 8)  # far above 1.5 × 6 nats
    assert abs(float(state.coef) - 0.2 * 1.5) < 1e-7
    assert config_from_dict(base()).convention.kl_rule == "proportional"


def test_kl_rule_errors(workdir):
    msg = error(config_from_dict, base(kl_rule="pid"))
    assert "'kl_rule'" in msg and "proportional, step" in msg
    # A fixed-β preset would ignore the rule: an error, not a silent no-op.
    msg = error(config_from_dict, base(preset="trl", kl_rule="step"))
    assert "'kl_rule'" in msg and "adap_kl_ctrl" in msg
    assert config_from_dict(base(preset="trl", kl_rule="step", adap_kl_ctrl=True)).convention.kl_rule == "step"
    msg = error(config_from_dict, base(stage="rm", kl_rule="step"))
    assert "PPO setting" in msg


# ---- rm_max_length_diff: length-balanced reward-model pairs ---------------------------------------------

PAIRS = [
    {"prompt": "hi", "chosen": "yes the cat sat", "rejected": "no"},  # 4 + eos vs 1 + eos: diff 3
    {"prompt": "hi", "chosen": "good", "rejected": "bad"},  # diff 0
    {"prompt": "the cat", "chosen": "sat", "rejected": "no no"},  # diff 1
    {"prompt": "write", "chosen": "a poem and a poem and a poem", "rejected": "no"},  # diff 7
]


def rm_base(**changes):
    raw = base(stage="rm", dataset="pairs.jsonl", **changes)
    del raw["reward_model"]
    return raw


def test_drop_length_mismatched_pairs(tmp_path):
    from ppojax.data import drop_length_mismatched_pairs, load_preferences
    from test_data import make_tokenizer
    from test_data import write as write_data

    path = write_data(tmp_path, "pairs.jsonl", PAIRS)
    dataset = load_preferences(path, make_tokenizer(), template="none", cutoff_len=64)
    differences = [abs(len(c) - len(r)) for c, r in dataset.responses]
    assert differences == [3, 0, 1, 7]
    for limit, kept_rows in ((0, [1]), (1, [1, 2]), (3, [0, 1, 2]), (7, [0, 1, 2, 3])):
        kept, dropped = drop_length_mismatched_pairs(dataset, limit)
        assert dropped == 4 - len(kept_rows)
        assert kept.sources == tuple(dataset.sources[i] for i in kept_rows)
        assert kept.responses == tuple(dataset.responses[i] for i in kept_rows)
        assert kept.prompts == tuple(dataset.prompts[i] for i in kept_rows)


def test_rm_max_length_diff_key(workdir):
    assert config_from_dict(rm_base(rm_max_length_diff=5)).rm_max_length_diff == 5
    assert "must be >= 0" in error(config_from_dict, rm_base(rm_max_length_diff=-1))
    msg = error(config_from_dict, base(rm_max_length_diff=5))  # stage ppo
    assert "'rm_max_length_diff'" in msg and "stage is 'ppo'" in msg


def test_rm_run_says_what_the_filter_left(tmp_path, monkeypatch):
    """The runner applies the filter before loading any weights; too few pairs left is a one-line error."""
    from ppojax import runner
    from ppojax.config import ConfigError
    from test_data import make_tokenizer
    from test_data import write as write_data

    model_dir = tmp_path / "model"
    make_tokenizer().save_pretrained(str(model_dir))
    (model_dir / "config.json").write_text('{"model_type": "llama"}')
    write_data(tmp_path, "pairs.jsonl", PAIRS)
    monkeypatch.chdir(tmp_path)
    config = config_from_dict(
        rm_base(rm_max_length_diff=0, per_device_train_batch_size=2, template="none", output_dir=str(tmp_path / "out"))
    )
    with pytest.raises(ConfigError, match="rm_max_length_diff 0 dropped 3 pairs, leaving 1, fewer than one"):
        runner.run(config, progress=False)


@pytest.mark.slow  # an rm training step compiles: ~20 s on the shared 2-core machine
def test_rm_run_reports_dropped_pairs(tmp_path, monkeypatch):
    import json

    from ppojax import runner
    from tiny_models import save_tiny_model
    from test_data import make_tokenizer
    from test_data import write as write_data

    tokenizer = make_tokenizer()
    save_tiny_model(tmp_path / "model", tokenizer)
    write_data(tmp_path, "pairs.jsonl", PAIRS)
    monkeypatch.chdir(tmp_path)
    cfg = config_from_dict(
        rm_base(rm_max_length_diff=3, per_device_train_batch_size=2, template="none", max_steps=1, output_dir="out")
    )
    summary = runner.run(cfg, progress=False)
    assert summary["dropped_pairs_length_diff"] == 1 and summary["dataset_rows"] == 3
    with open(tmp_path / "out" / "rm_metrics" / "summary.json") as f:
        assert json.load(f)["dropped_pairs_length_diff"] == 1


# ---- length_reward / length_penalty ---------------------------------------------------------------------


def test_length_reward_keys(workdir):
    conv = config_from_dict(base(length_reward="penalty", length_penalty=0.01)).convention
    assert (conv.length_reward, conv.length_penalty) == ("penalty", 0.01)
    assert config_from_dict(base(length_reward="sqrt")).convention.length_reward == "sqrt"
    assert config_from_dict(base()).convention.length_reward == "none"
    for bad in ({"length_penalty": 0.01}, {"length_reward": "penalty"}, {"length_reward": "sqrt", "length_penalty": 1}):
        msg = error(config_from_dict, base(**bad))
        assert "length_reward: penalty needs length_penalty > 0" in msg
    assert "allowed: none, penalty, sqrt" in error(config_from_dict, base(length_reward="log"))
    assert "PPO setting" in error(config_from_dict, rm_base(length_reward="sqrt"))


# ---- stages: staged training ----------------------------------------------------------------------------

WARMUP_MAIN_FINISH = [
    {
        "name": "warm-up",
        "iterations": 500,
        "learning_rate": 5e-7,
        "cliprange": 0.1,
        "init_kl_coef": 0.05,
        "ppo_epochs": 2,
    },
    {"name": "main", "iterations": 5000, "overrides": {"learning_rate": 1e-6, "cliprange": 0.2, "kl_coef": 0.02}},
    {"iterations": 500, "learning_rate": "5e-7", "cliprange": 0.15, "kl_coef": 0.03, "ppo_epochs": 3},
]


def test_stages_parse_and_apply(workdir):
    from ppojax.config import stage_at, stage_config, stage_starts
    from ppojax.runner_ppo import total_iterations, total_optimizer_steps

    config = config_from_dict(
        base(stages=WARMUP_MAIN_FINISH, ppo_epochs=4, per_device_train_batch_size=2, batch_size=4)
    )
    assert [s.name for s in config.stages] == ["warm-up", "main", "stage 3"]
    assert stage_starts(config) == (1, 501, 5501)
    assert [stage_at(config, i) for i in (1, 500, 501, 5500, 5501, 6000, 7000)] == [0, 0, 1, 1, 2, 2, 2]
    warm, main, finish = (stage_config(config, i) for i in range(3))
    assert (warm.learning_rate, warm.convention.clip_eps, warm.convention.kl_coef, warm.ppo_epochs) == (
        5e-7,
        0.1,
        0.05,
        2,
    )
    assert (main.learning_rate, main.convention.clip_eps, main.convention.kl_coef, main.ppo_epochs) == (
        1e-6,
        0.2,
        0.02,
        4,
    )
    assert (finish.learning_rate, finish.convention.clip_eps, finish.ppo_epochs) == (5e-7, 0.15, 3)
    assert finish.convention.adaptive_kl  # what a stage does not override is the run's
    assert total_iterations(config, 10) == 6000
    # The schedule spans the whole run: iterations × the stage's ppo_epochs × 2 minibatches, summed.
    assert total_optimizer_steps(config, 6000) == (500 * 2 + 5000 * 4 + 500 * 3) * 2
    assert config.hash() != config_from_dict(base(ppo_epochs=4, per_device_train_batch_size=2, batch_size=4)).hash()


def test_stage_errors(workdir):
    msg = error(config_from_dict, base(stages=[{"iterations": 0}]))
    assert "stages[0]: 'iterations' is 0" in msg
    msg = error(config_from_dict, base(stages=[{"iterations": 5, "lora_rank": 4}]))
    assert "stages[0]: 'lora_rank' cannot change between stages" in msg
    msg = error(config_from_dict, base(stages=[{"iterations": 5, "clip_range": 0.1}]))
    assert "stages[0]: unknown key 'clip_range'" in msg
    msg = error(config_from_dict, base(stages=[{"iterations": 5, "cliprange": -1}]))
    assert "stages[0]: 'cliprange' is -1" in msg
    assert "non-empty list" in error(config_from_dict, base(stages={"iterations": 5}))
    msg = error(config_from_dict, base(stages=[{"iterations": 5}, {"iterations": 2}], max_steps=6))
    assert "'max_steps' 6 differs from the stages' 7 iterations" in msg
    msg = error(config_from_dict, base(preset="trl", stages=[{"iterations": 5, "ppo_target": 3.0}]))
    assert "stages[0]" in msg and "adap_kl_ctrl" in msg
    assert "PPO setting" in error(config_from_dict, rm_base(stages=[{"iterations": 5}]))


def test_staged_example_yaml_validates(workdir):
    import os

    from ppojax.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "experiments", "configs", "ppo_staged.yaml")) as f:
        text = f.read()
    text = text.replace("path/to/local/hf-model", "model").replace("path/to/prompts.json", "prompts.json")
    with open("staged.yaml", "w") as f:
        f.write(text)
    config = load_config("staged.yaml")
    assert [(s.name, s.iterations) for s in config.stages] == [("warm-up", 500), ("main", 5000), ("finish", 500)]
    conv = config.convention
    assert (conv.kl_rule, conv.length_reward, conv.length_penalty, conv.adaptive_kl) == ("step", "penalty", 0.001, True)


def test_ppo_runner_config_carries_the_aids(workdir):
    """The PPO runner's PPOConfig gets the step rule and the length-aware reward through the convention."""
    from ppojax.runner_ppo import RunControl, make_ppo_config

    config = config_from_dict(base(kl_rule="step", length_reward="sqrt", max_steps=10))
    ppo = make_ppo_config(config, iterations=10, pad_token_id=0, stop_ids=(1,), control=RunControl())
    assert (ppo.convention.kl_rule, ppo.convention.length_reward) == ("step", "sqrt")
    controller = kl_controller(ppo.convention)
    state = controller.update(controller.init(), 1.0, 8)  # below 0.5 × 6 nats: β × 0.75
    assert abs(float(state.coef) - 0.2 * 0.75) < 1e-7
