"""`ppojax train` stage ppo and `ppojax generate`, in real processes, on tiny random Qwen2 directories.

The issue's two example YAMLs (experiments/configs/) run as written apart from the paths and small-size overrides:
rm with LoRA, then ppo with LoRA on saves/reward. The PPO runs share one persistent XLA compilation cache (a
directory of this module's), so the second and third processes load the programs the first one compiled.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from ppojax.cli import main
from ppojax.models import DecoderModel, ModelConfig, init_params, load_pretrained, save_pretrained
from ppojax.reports import read_metrics_csv
from tests.test_data import make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "experiments", "configs")
# Small sizes for the example YAMLs (the YAMLs themselves are run unchanged otherwise).
PPO_OVERRIDES = (
    "lora_rank=4",
    "gradient_accumulation_steps=2",
    "per_device_train_batch_size=2",
    "ppo_buffer_size=2",
    "ppo_epochs=2",
    "max_new_tokens=6",
    "max_prompt_length=16",
    "max_steps=5",
    "save_steps=1",
    "logging_steps=1",
    "samples_every=2",
    "num_samples=2",
    "learning_rate=1.0e-3",
)
RM_OVERRIDES = ("max_steps=2", "per_device_train_batch_size=2", "cutoff_len=32", "lora_rank=4", "save_steps=2")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Qwen2 HF directory (tokenizer without a pad token), preference pairs and prompts."""
    root = tmp_path_factory.mktemp("ppo_cli")
    tokenizer = make_tokenizer()
    config = ModelConfig(
        model_type="qwen2",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        qkv_bias=True,
        tie_word_embeddings=True,
        eos_token_ids=(tokenizer.eos_token_id,),
    )
    model = DecoderModel(config)
    save_pretrained(str(root / "qwen2-tiny"), model, init_params(model, jax.random.PRNGKey(0)), tokenizer)
    pairs = [
        {"prompt": "write a poem", "chosen": "yes the cat sat", "rejected": "no"},
        {"instruction": "hi", "input": "there", "chosen": "good", "rejected": "bad bad"},
        {"prompt": "the cat", "chosen": "sat", "rejected": "no no"},
        {"messages": [{"role": "user", "content": "hi"}], "chosen": "hi there", "rejected": "no"},
    ]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    words = "hi there write a poem good bad yes no and the cat sat".split()
    rng = np.random.default_rng(0)
    prompts = [{"instruction": " ".join(rng.choice(words, size=rng.integers(1, 5)))} for _ in range(12)]
    prompts[3] = {"prompt": "the cat"}
    prompts[5] = {"messages": [{"role": "user", "content": "write a poem"}]}
    (root / "prompts.json").write_text(json.dumps(prompts))
    (root / "cache").mkdir()
    return root


def yaml_from_example(workdir, name, **replace):
    """The example YAML with its placeholder paths replaced, written into workdir."""
    text = open(os.path.join(CONFIGS, name)).read()
    lines = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        lines.append(f"{key}: {replace[key]}" if key in replace else line)
    path = workdir / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def cli_env(workdir):
    return {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(workdir / "cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def run_cli(workdir, *args, timeout=300):
    command = [sys.executable, "-m", "ppojax.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=cli_env(workdir), timeout=timeout)


@pytest.fixture(scope="module")
def reward_dir(workdir):
    """The rm example YAML, run: saves/reward."""
    path = yaml_from_example(
        workdir, "rm_lora.yaml", model_name_or_path="qwen2-tiny", dataset="pairs.jsonl", output_dir="saves/reward"
    )
    result = run_cli(workdir, "train", path, "--no-progress", *RM_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "saves" / "reward"


def ppo_yaml(workdir, output_dir="saves/ppo"):
    return yaml_from_example(
        workdir,
        "ppo_lora.yaml",
        model_name_or_path="qwen2-tiny",
        reward_model="saves/reward",
        dataset="prompts.json",
        output_dir=output_dir,
    )


@pytest.fixture(scope="module")
def ppo_run(workdir, reward_dir):
    """The ppo example YAML, run uninterrupted: saves/ppo."""
    result = run_cli(workdir, "train", ppo_yaml(workdir), "--no-progress", *PPO_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "saves" / "ppo", result


def test_example_yamls_rm_then_ppo_write_every_report_and_model(workdir, reward_dir, ppo_run):
    out, result = ppo_run
    assert "ppojax ppo: completed" in result.stdout
    # The reward model is a full HF directory with the LoRA merged and the score head trained.
    reward_model, _ = load_pretrained(str(reward_dir), head="reward")
    assert reward_model.config.vocab_size == 21  # 20 tokens + the pad token ppojax added
    metrics = out / "ppo_metrics"
    rows = read_metrics_csv(str(metrics / "training_metrics.csv"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in (
        "objective/scores",
        "objective/kl",
        "objective/kl_coef",
        "loss/policy",
        "loss/value",
        "policy/clipfrac",
    ):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert rows[0]["objective/kl_coef"] == pytest.approx(0.2)  # LLaMA-Factory's TRL 0.x default
    assert rows[0]["train/updates"] == 2 * 2  # ppo_epochs × minibatches (rollout 8 = 2 × optimizer batch 4)
    assert rows[0]["policy/first_clipfrac"] == 0.0 and abs(rows[0]["policy/first_ratio_max"] - 1) < 2e-6
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iteration"] == 5 and summary["events"] == []
    assert (metrics / "training_curves.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (metrics / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 4, 4]
    assert all(set(s) == {"step", "prompt", "response", "score"} and s["prompt"] for s in samples)
    # Checkpoints every iteration, three kept; the policy (merged) and the value model as HF directories.
    assert sorted(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()) == [3, 4, 5]
    policy, policy_params = load_pretrained(str(out), head="lm")
    base, base_params = load_pretrained(str(workdir / "qwen2-tiny"), head="lm")
    assert policy.config.vocab_size == 21 and (out / "tokenizer.json").exists()
    assert (out / "config.json").exists() and json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    changed = np.abs(
        np.asarray(policy_params["layers_0"]["mlp"]["down"]["kernel"], np.float32)
        - np.asarray(base_params["layers_0"]["mlp"]["down"]["kernel"], np.float32)
    ).max()
    assert changed > 0  # the trained adapters were merged
    value_model, _ = load_pretrained(str(out / "value_model"), head="value")
    assert value_model.head == "value" and (out / "value_model" / "tokenizer.json").exists()
