"""`ppojax train`: one-line errors with exit status 2 (subprocess), and the sft / rm stages end to end on a tiny
model saved with our own exporter (no torch, no network)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ppojax.cli import main
from ppojax.models import load_pretrained
from ppojax.reports import read_metrics_csv
from tests.test_data import make_tokenizer
from tests.tiny_models import save_tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The training keys of the tiny sft / rm runs (3 steps, a checkpoint at step 2), shared with the mesh tests.
TINY_RUN_KEYS = dict(
    template="qwen",
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    max_steps=3,
    logging_steps=1,
    save_steps=2,
    cutoff_len=32,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama HF directory whose tokenizer has no pad token (ppojax must add one and grow the embedding)."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = make_tokenizer()
    save_tiny_model(root / "model", tokenizer)
    rows = [
        {"prompt": "write a poem", "chosen": "yes the cat sat", "rejected": "no"},
        {"instruction": "hi", "input": "there", "chosen": "good", "rejected": "bad bad"},
        {"prompt": "the cat", "chosen": "sat", "rejected": "no no"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "hi there", "rejected": "no"},
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft = [{"instruction": r.get("prompt", "hi"), "output": r["chosen"]} for r in rows]
    (root / "sft.json").write_text(json.dumps(sft))
    (root / "bad.jsonl").write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi"\n')
    return root


def write_config(root, name, **keys):
    path = root / name
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return str(path)


def run_cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "ppojax.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120
    )


def test_bad_config_exits_2_with_one_line_in_a_real_process(tiny):
    bad_key = write_config(
        tiny,
        "bad_key.yaml",
        model_name_or_path="model",
        stage="rm",
        dataset="pairs.jsonl",
        output_dir="out",
        ppo_epoch=2,
    )
    result = run_cli("train", bad_key, cwd=tiny)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "did you mean 'ppo_epochs'" in result.stderr


def test_bad_data_and_override_exit_2(tiny, monkeypatch, capsys):
    monkeypatch.chdir(tiny)
    path = write_config(
        tiny,
        "rm_bad_data.yaml",
        model_name_or_path="model",
        stage="rm",
        dataset="bad.jsonl",
        output_dir="out_bad",
        template="none",
    )
    assert main(["train", path, "learning_rate=1e-4", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"ppojax: error: {tiny / 'bad.jsonl'}:2: malformed JSON (Expecting ',' delimiter, column 16)\n"
    # LLaMA-Factory's infrastructure keys are accepted and named once, before the run.
    assert main(["train", path, "preprocessing_num_workers=16", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(
        "ppojax: note: ignoring LLaMA-Factory keys with no meaning here: preprocessing_num_workers"
    )
    assert err[1].startswith("ppojax: error: ") and len(err) == 2
    assert main(["train", path, "learning_rate=fast"]) == 2
    assert "'learning_rate' is 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "stage,dataset,finetuning",
    [
        ("rm", "pairs.jsonl", "lora"),
        pytest.param("sft", "sft.json", "full", marks=pytest.mark.slow),  # ~20 s on the shared 2-core machine
    ],
)
def test_stage_end_to_end_and_resume(tiny, monkeypatch, capsys, stage, dataset, finetuning):
    monkeypatch.chdir(tiny)
    out = f"saves/{stage}"
    path = write_config(
        tiny,
        f"{stage}.yaml",
        model_name_or_path="model",
        stage=stage,
        finetuning_type=finetuning,
        dataset=dataset,
        output_dir=out,
        **TINY_RUN_KEYS,
    )
    assert main(["train", path, "--no-progress"]) == 0, capsys.readouterr().err
    metrics = tiny / out / f"{stage}_metrics"
    rows = read_metrics_csv(str(metrics / "training_metrics.csv"))
    assert [r["step"] for r in rows] == [1, 2, 3] and "loss" in rows[0]
    if stage == "rm":
        assert "accuracy" in rows[0]
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["pad_token_id"] == 20
    assert (metrics / "training_curves.png").exists()
    model, params = load_pretrained(str(tiny / out), head="lm" if stage == "sft" else "reward")
    assert model.config.vocab_size == 21 and params["embed"]["embedding"].shape[0] == 21  # grew for the pad token
    assert sorted(os.listdir(tiny / out / "checkpoints")) == ["2", "3"]
    if stage == "rm":  # the same pairs as a LLaMA-Factory dataset name (alpaca ranking): the same run
        data = tiny / "data"
        data.mkdir(exist_ok=True)
        lf_rows = [
            {"instruction": i, "input": q, "chosen": c, "rejected": r}
            for i, q, c, r in [
                ("write a poem", "", "yes the cat sat", "no"),
                ("hi", "there", "good", "bad bad"),
                ("the cat", "", "sat", "no no"),
                ("hi", "", "hi there", "no"),
            ]
        ]
        (data / "pairs.json").write_text(json.dumps(lf_rows))
        (data / "dataset_info.json").write_text(json.dumps({"lf_pairs": {"file_name": "pairs.json", "ranking": True}}))
        named = ["dataset=lf_pairs", "output_dir=saves/rm_names"]  # dataset_dir: LLaMA-Factory's default, data/
        assert main(["train", path, "--no-progress", *named]) == 0, capsys.readouterr().err
        named_rows = read_metrics_csv(str(tiny / "saves" / "rm_names" / "rm_metrics" / "training_metrics.csv"))
        assert [r["loss"] for r in named_rows] == [r["loss"] for r in rows]
    # A rerun resumes from the latest checkpoint (LLaMA-Factory's rule) if the settings are the same.
    assert main(["train", path, "--no-progress", "resume=false"]) == 2
    assert "already has checkpoints and resume is false" in capsys.readouterr().err
    assert main(["train", path, "--no-progress", "max_steps=4"]) == 2  # different settings
    assert "different training settings" in capsys.readouterr().err
    # The same settings (resume itself is not a training setting) continue from step 3: done.
    assert main(["train", path, "--no-progress"]) == 0
    assert main(["train", path, "--no-progress", "resume=true"]) == 0
    assert [r["step"] for r in read_metrics_csv(str(metrics / "training_metrics.csv"))] == [1, 2, 3]

    # The same run on a mesh of the 8 fake CPU devices, data 2 x fsdp 2 x tensor 2: the 4 rows split over
    # data x fsdp, the MLP and attention heads over tensor, the hidden size over fsdp.
    mesh_out = f"saves/{stage}_mesh"
    assert main(["train", path, "--no-progress", f"output_dir={mesh_out}", "mesh={data: 2, fsdp: 2, tensor: 2}"]) == 0
    assert "memory estimate per device (mesh data=2, fsdp=2, tensor=2" in capsys.readouterr().err
    one = read_metrics_csv(str(metrics / "training_metrics.csv"))
    sharded = read_metrics_csv(str(tiny / mesh_out / f"{stage}_metrics" / "training_metrics.csv"))
    assert [r["step"] for r in sharded] == [1, 2, 3]
    # float32; the sharded program sums in another order (split contractions, all-reduced gradients): measured
    # here losses within 1.2e-7 relative, weights within 6e-7 of each tensor's largest entry; a lost or doubled
    # row of the 4 would move the mean loss by orders of magnitude more.
    for a, b in zip(sharded, one):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert a.get("accuracy") == b.get("accuracy")
    head = "lm" if stage == "sft" else "reward"
    expected, found = (
        load_pretrained(str(tiny / out), head=head)[1],
        load_pretrained(str(tiny / mesh_out), head=head)[1],
    )
    for (path_, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(found)):
        want, got = np.asarray(want), np.asarray(got)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=str(path_))


def test_weight_decay_and_adam_keys_reach_the_supervised_optimizer(tiny, monkeypatch, capsys):
    """stage rm, full fine-tuning, one optimizer step with ε so large that Adam's own step is ~1e-8: what is left
    is the decoupled decay, p ← p · (1 − lr · weight_decay), on kernels, embeddings and the score head, and
    nothing on the norms (transformers' rule). Checks that weight_decay and adam_epsilon both reach the step."""
    monkeypatch.chdir(tiny)
    keys = dict(TINY_RUN_KEYS, max_steps=1, save_steps=1, adam_epsilon=1e6, adam_beta1=0.5, adam_beta2=0.5)
    exported = {}
    for decay in (0.0, 0.5):
        out = f"saves/rm_decay_{decay}"
        path = write_config(
            tiny,
            "rm_decay.yaml",
            model_name_or_path="model",
            stage="rm",
            finetuning_type="full",
            dataset="pairs.jsonl",
            output_dir=out,
            weight_decay=decay,
            **keys,
        )
        assert main(["train", path, "--no-progress"]) == 0, capsys.readouterr().err
        exported[decay] = load_pretrained(str(tiny / out), head="reward")[1]
    decayed = 0
    for (path_, plain), shrunk in zip(
        jax.tree_util.tree_leaves_with_path(exported[0.0]), jax.tree.leaves(exported[0.5])
    ):
        name = "/".join(k.key for k in path_)
        plain, shrunk = np.asarray(plain, np.float64), np.asarray(shrunk, np.float64)
        factor = 1.0 if "norm/" in name or name.endswith("bias") else 1.0 - 1e-2 * 0.5
        decayed += factor < 1.0
        np.testing.assert_allclose(shrunk, plain * factor, rtol=0, atol=1e-6 * np.abs(plain).max(), err_msg=name)
    assert decayed >= 3  # embedding, layer kernels, score head


def test_enable_thinking_reaches_every_prompt_reader(tiny, monkeypatch, capsys):
    """The config key (sft, rm, ppo), `ppojax generate` and `ppojax eval-rm` (--enable-thinking, --default-system)
    hand the prompt-rendering options to the data readers (what the readers do with them: tests/test_data.py).
    Each reader is replaced by one that records its keywords and stops the command."""
    from ppojax import data as data_lib
    from ppojax.config import ConfigError

    monkeypatch.chdir(tiny)
    seen = []

    def recording(name):
        def reader(*args, **kwargs):
            seen.append((name, kwargs.get("enable_thinking"), kwargs.get("default_system")))
            raise ConfigError("stopped after the reader")

        return reader

    for name in ("load_prompts", "load_sft", "load_preferences"):
        monkeypatch.setattr(data_lib, name, recording(name))
    common = dict(model_name_or_path="model", output_dir="saves/thinking", template="qwen", enable_thinking=False)
    (tiny / "prompts.json").write_text(json.dumps([{"instruction": "hi"}]))
    for stage, dataset in (("sft", "sft.json"), ("rm", "pairs.jsonl"), ("ppo", "prompts.json")):
        keys = dict(common, stage=stage, dataset=dataset, **({"reward_model": "model"} if stage == "ppo" else {}))
        assert main(["train", write_config(tiny, "thinking.yaml", **keys), "--no-progress"]) == 2
    generate = ["generate", "--model", "model", "--prompts", "prompts.json", "--template", "qwen"]
    assert main([*generate, "--enable-thinking", "false", "--default-system", "yes"]) == 2
    assert main(generate) == 2
    evaluate = ["eval-rm", "--model", "model", "--data", "pairs.jsonl", "--template", "qwen"]
    assert main([*evaluate, "--enable-thinking", "true", "--default-system", "yes"]) == 2  # as in training
    assert "stopped after the reader" in capsys.readouterr().err
    assert seen == [
        ("load_sft", False, None),
        ("load_preferences", False, None),
        ("load_prompts", False, None),
        ("load_prompts", False, "yes"),
        ("load_prompts", None, None),
        ("load_preferences", True, "yes"),
    ]
