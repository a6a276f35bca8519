"""`ppojax demo`: the whole pipeline end to end at tiny sizes and the notebook (default suite: the notebook cannot
rot), the full demo (slow)."""

import json
import os

import numpy as np
import pytest

from ppojax import cli, demo
from ppojax.data import load_tokenizer
from ppojax.synthetic import reviews

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, demo.run(str(out), demo.FAST, progress=False, log=None)


def test_fast_pipeline_writes_every_stage_and_a_consistent_report(fast_run):
    out, report = fast_run
    for stage in ("sft", "rm", "ppo"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            assert os.path.exists(out / stage / name), (stage, name)
        assert os.path.exists(out / stage / f"{stage}_metrics" / "training_curves.png")
        summary = json.loads((out / stage / f"{stage}_metrics" / "summary.json").read_text())
        assert summary["status"] == "completed", (stage, summary["status"])
    assert os.path.exists(report["plot"]) and os.path.exists(out / "report.json")
    assert json.loads((out / "report.json").read_text())["ppo"] == report["ppo"]
    sft_loss = json.loads((out / "sft" / "sft_metrics" / "summary.json").read_text())["metrics"]["loss"]
    assert sft_loss["last"] < sft_loss["first"]
    # the SFT policy is its own reference: its k1 KL is exactly zero; after PPO the estimate is finite
    assert report["sft"]["kl_mean"] == 0.0
    assert np.isfinite(report["ppo"]["kl_mean"])
    # Bradley-Terry labels follow the gold reward far more often than chance
    assert report["pairs"]["label_agrees_with_gold"] > 0.8
    assert 0.0 <= report["rm"]["accuracy"] <= 1.0 and -1.0 <= report["rm"]["gold_correlation"] <= 1.0
    assert {f["name"] for f in report["hacking_flags"]} >= {"proxy_up_gold_down", "length_drift", "repetition"}
    assert report["config"]["ppo_iterations"] == demo.FAST.ppo_iterations


def test_gold_curve_is_recomputed_from_every_logged_response(fast_run):
    out, _ = fast_run
    rows = [json.loads(line) for line in (out / "ppo" / "ppo_metrics" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == demo.FAST.ppo_iterations * demo.FAST.ppo_batch
    vocab = demo.Vocabulary(load_tokenizer(str(out / "sft")))
    curve = demo.ppo_curve(str(out), vocab, vocab.tokenizer.eos_token)
    assert [int(r["step"]) for r in curve] == list(range(1, demo.FAST.ppo_iterations + 1))
    eos = vocab.tokenizer.eos_token
    last = [r for r in rows if r["step"] == demo.FAST.ppo_iterations]
    gold = [
        reviews.review_gold(r["prompt"], r["response"].removesuffix(eos), r["response"].endswith(eos)) for r in last
    ]
    assert curve[-1]["hacking/gold_mean"] == pytest.approx(np.mean(gold), abs=1e-5)
    assert curve[-1]["hacking/proxy_mean"] == pytest.approx(np.mean([r["score"] for r in last]), abs=1e-5)


def test_task_files_are_deterministic_and_stages_reusable_only_with_the_same_settings(fast_run, tmp_path):
    out, _ = fast_run
    demo.write_task(str(tmp_path), demo.FAST)
    for name in ("sft.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        assert (tmp_path / "data" / name).read_bytes() == (out / "data" / name).read_bytes()
    assert (tmp_path / "init" / "model.safetensors").read_bytes() == (out / "init" / "model.safetensors").read_bytes()
    assert demo._reusable(str(out / "rm"), demo.FAST)
    assert demo._reusable(str(out / "rm"), demo.FAST.replace(kl_coef=0.5, ppo_iterations=9))
    assert not demo._reusable(str(out / "rm"), demo.FAST.replace(sft_steps=31))
    assert not demo._reusable(str(out / "rm"), demo.FAST.replace(length_bias=0.1))
    assert demo._reusable(str(out / "sft"), demo.FAST.replace(length_bias=0.1), "sft")
    assert not demo._reusable(str(out / "sft"), demo.FAST.replace(corpus_size=100), "sft")


def test_cli_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--preset", "nope"])
    assert "unknown preset 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_full_demo_improves_gold_at_a_kl_under_target(tmp_path, capsys):
    assert cli.main(["demo", "--output-dir", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["gold_gain_in_sft_std"] > 0.5, report["sft"]
    assert report["kl_under_target"]
    assert "gold reward" in capsys.readouterr().out


def test_notebook_executes(tmp_path, monkeypatch):
    import nbclient
    import nbformat

    path = os.path.join(ROOT, "experiments", "notebooks", "ppo_by_hand.ipynb")
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the kernel imports this tree
    client = nbclient.NotebookClient(
        notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "display_data" and "image/png" in o.get("data", {}) for o in outputs)


def test_the_committed_stage_configs_are_the_demos():
    """experiments/demo/*.yaml are what `ppojax demo` (default output dir) runs."""
    for stage in ("sft", "rm", "ppo"):
        path = os.path.join(ROOT, "experiments", "demo", f"{stage}.yaml")
        with open(path, encoding="utf-8") as f:
            assert f.read() == demo.stage_yaml(stage, "ppojax_demo", demo.DemoConfig()), stage
