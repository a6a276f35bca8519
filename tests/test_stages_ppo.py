"""Staged PPO training end to end (in-process, tiny llama): stages switch at the right iterations, β is set at each
stage's start, the health report lands in summary.json, and an interrupted run resumes in the right stage with
the same numbers as an uninterrupted one."""

import json

import numpy as np
import pytest

from ppojax import reports, runner
from ppojax.config import config_from_dict
from test_data import make_tokenizer
from tiny_models import save_tiny_model

pytestmark = pytest.mark.slow  # three stage programs compiled twice: ~2-3 min on the shared 2-core machine

STAGES = [
    {"name": "warm-up", "iterations": 2, "learning_rate": 1e-3, "cliprange": 0.1, "kl_coef": 0.05, "ppo_epochs": 1},
    {"name": "main", "iterations": 2, "learning_rate": 3e-3, "cliprange": 0.2, "kl_coef": 0.02, "ppo_epochs": 2},
    {"name": "finish", "iterations": 1, "learning_rate": 1e-3, "cliprange": 0.15, "kl_coef": 0.03, "ppo_epochs": 1},
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny llama policy and a reward model sharing one tokenizer (with its own pad token), and prompts."""
    root = tmp_path_factory.mktemp("stages")
    tokenizer = make_tokenizer(pad="<unk>")
    for name, head, seed in (("policy", "lm", 0), ("reward", "reward", 1)):
        save_tiny_model(root / name, tokenizer, head=head, seed=seed, max_position_embeddings=64)
    words = "hi there write a poem good bad yes no and the cat sat".split()
    rng = np.random.default_rng(0)
    prompts = [{"prompt": " ".join(rng.choice(words, size=rng.integers(1, 4)))} for _ in range(8)]
    (root / "prompts.json").write_text(json.dumps(prompts))
    return root


def ppo_config(root, output_dir):
    return config_from_dict(
        {
            "model_name_or_path": str(root / "policy"),
            "reward_model": str(root / "reward"),
            "stage": "ppo",
            "dataset": str(root / "prompts.json"),
            "output_dir": str(root / output_dir),
            "template": "none",
            "finetuning_type": "full",
            "critic_mode": "shared",
            "adap_kl_ctrl": False,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 2,
            "batch_size": 4,
            "max_new_tokens": 4,
            "max_prompt_length": 8,
            "logging_steps": 1,
            "save_steps": 1,
            "samples_every": 0,
            "stages": STAGES,
        }
    )


def read(root, output_dir):
    metrics = root / output_dir / "ppo_metrics"
    rows = reports.read_metrics_csv(str(metrics / "training_metrics.csv"))
    events = [json.loads(line) for line in (metrics / "events.jsonl").read_text().splitlines()]
    return rows, events, json.loads((metrics / "summary.json").read_text())


def test_stages_switch_and_resume(workdir, monkeypatch):
    summary = runner.run(ppo_config(workdir, "whole"), progress=False)
    rows, events, _ = read(workdir, "whole")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    # ppo_epochs × 2 minibatches per iteration, β and the learning rate of the stage running each iteration.
    assert [r["train/updates"] for r in rows] == [2, 2, 4, 4, 2]
    np.testing.assert_allclose([r["objective/kl_coef"] for r in rows], [0.05, 0.05, 0.02, 0.02, 0.03], rtol=1e-6)
    np.testing.assert_allclose([r["lr/policy"] for r in rows], [1e-3, 1e-3, 3e-3, 3e-3, 1e-3], rtol=1e-6)
    stage_events = [(e["step"], e["name"], e["first_iteration"]) for e in events if e["event"] == "stage"]
    assert stage_events == [(0, "warm-up", 1), (2, "main", 3), (4, "finish", 5)]
    assert [(s["name"], s["first_iteration"]) for s in summary["stages"]] == [
        ("warm-up", 1),
        ("main", 3),
        ("finish", 5),
    ]
    assert summary["health"]["last_iteration"] == 5 and "kl" in summary["health"]["checked"]

    # Interrupted after iteration 3 (checkpointed), in the middle of "main"; the rerun resumes there.
    real_log = reports.MetricsWriter.log

    def log_then_stop(self, step, metrics):
        if step == 4:
            raise KeyboardInterrupt
        return real_log(self, step, metrics)

    monkeypatch.setattr(reports.MetricsWriter, "log", log_then_stop)
    with pytest.raises(KeyboardInterrupt):
        runner.run(ppo_config(workdir, "resumed"), progress=False)
    monkeypatch.setattr(reports.MetricsWriter, "log", real_log)
    runner.run(ppo_config(workdir, "resumed"), progress=False)
    resumed, resumed_events, _ = read(workdir, "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert [(e["step"], e["name"]) for e in resumed_events if e["event"] == "stage"][-1] == (4, "finish")
    for key in ("train/updates", "objective/kl_coef", "lr/policy", "objective/scores", "objective/kl", "loss/policy"):
        np.testing.assert_allclose([r[key] for r in resumed], [r[key] for r in rows], rtol=1e-6, err_msg=key)
