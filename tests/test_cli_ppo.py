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
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from ppojax.cli import main
from ppojax.data import load_prompts, load_tokenizer
from ppojax.models import load_pretrained
from ppojax.reports import read_metrics_csv
from tests.test_data import make_tokenizer
from tests.tiny_models import save_tiny_model

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
    save_tiny_model(root / "qwen2-tiny", tokenizer, model_type="qwen2", max_position_embeddings=64)
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


def yaml_from_example(workdir, name, filename=None, **replace):
    """The example YAML with the given keys replaced, written into workdir (as `filename`)."""
    text = open(os.path.join(CONFIGS, name)).read()
    lines = []
    for line in text.splitlines():
        key = line.split(":", 1)[0].strip()
        lines.append(f"{key}: {replace.pop(key)}" if key in replace else line)
    lines += [f"{key}: {value}" for key, value in replace.items()]
    path = workdir / (filename or name)
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


def cli_command(*args):
    return [sys.executable, "-m", "ppojax.cli", *args]


def run_cli(workdir, *args, timeout=600):
    return subprocess.run(
        cli_command(*args), capture_output=True, text=True, cwd=workdir, env=cli_env(workdir), timeout=timeout
    )


@pytest.fixture(scope="module")
def reward_dir(workdir):
    """The rm example YAML, run in this process (the sft / rm stages have their own subprocess test): saves/reward."""
    path = yaml_from_example(workdir, "rm_lora.yaml", model_name_or_path="qwen2-tiny", dataset="pairs.jsonl")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        assert main(["train", path, "--no-progress", *RM_OVERRIDES]) == 0
    finally:
        os.chdir(cwd)
    return workdir / "saves" / "reward"


def ppo_yaml(workdir, output_dir="saves/ppo", **extra):
    """The ppo example YAML as written, except the base model, the prompts and the output directory."""
    return yaml_from_example(
        workdir,
        "ppo_lora.yaml",
        filename=f"ppo_{output_dir.replace('/', '_')}.yaml",
        model_name_or_path="qwen2-tiny",
        dataset="prompts.json",
        output_dir=output_dir,
        **extra,
    )


@pytest.fixture(scope="module")
def ppo_run(workdir, reward_dir):
    """The ppo example YAML (reward_model: saves/reward as written), run uninterrupted: saves/ppo."""
    result = run_cli(workdir, "train", ppo_yaml(workdir), "--no-progress", *PPO_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir / "saves" / "ppo", result


def csv_rows(out):
    rows = read_metrics_csv(str(out / "ppo_metrics" / "training_metrics.csv"))
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]  # wall-clock


def weights(directory):
    return load_file(str(directory / "model.safetensors"))


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
    # reward-hacking flags from the logged metrics (no gold function here): length drift and entropy collapse
    flags = {flag["name"]: flag for flag in summary["reward_hacking"]}
    assert {"length_drift", "entropy_collapse", "repetition"} <= set(flags) and all(
        isinstance(f["raised"], bool) for f in flags.values()
    )
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


def test_kill9_then_rerun_resumes_bit_identically(workdir, ppo_run):
    uninterrupted, _ = ppo_run
    out = workdir / "saves" / "ppo_killed"
    command = cli_command("train", ppo_yaml(workdir, "saves/ppo_killed"), "--no-progress", *PPO_OVERRIDES)
    process = subprocess.Popen(
        command, cwd=workdir, env=cli_env(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    checkpoints = out / "checkpoints"
    deadline = time.time() + 400
    # SIGKILL as soon as the run writes anything after its step-0 checkpoint (often mid-save).
    while process.poll() is None and time.time() < deadline:
        names = os.listdir(checkpoints) if checkpoints.is_dir() else []
        if any(not name.startswith("0") for name in names):
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "value_model").exists()  # it really died mid-run
    result = run_cli(workdir, "train", ppo_yaml(workdir, "saves/ppo_killed"), "--no-progress", *PPO_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ppojax ppo: resuming from the checkpoint of iteration " in result.stderr  # at least step 0's
    summary = json.loads((out / "ppo_metrics" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iteration"] == 5
    for sub in ("", "value_model"):
        expected, found = weights(uninterrupted / sub), weights(out / sub)
        assert sorted(expected) == sorted(found)
        for name in expected:
            np.testing.assert_array_equal(found[name], expected[name], err_msg=f"{sub}/{name}")
    assert csv_rows(out) == csv_rows(uninterrupted)
    samples = lambda d: (d / "ppo_metrics" / "samples.jsonl").read_text()  # noqa: E731
    assert samples(out) == samples(uninterrupted)


@pytest.mark.slow  # one more PPO process (~20 s of CPU with the cached programs); the default budget is spent
def test_rollback_continue_restores_the_last_good_checkpoint_and_logs_each_event(workdir, ppo_run):
    """KL above early_stop_kl at iteration 2 (iteration 1's KL is exactly 0: LoRA's b starts at 0): restore
    iteration 1 with β doubled and a new key, go on; the next rejection (max_rollbacks 1) restores the last good
    checkpoint and stops. The k1 KL of a retry may be negative, so where that happens depends on the numbers;
    the sequence of events does not. Same PPOConfig as ppo_run, so every program comes from the cache."""
    out = workdir / "saves" / "ppo_rollback"
    extra = dict(early_stop_kl="1.0e-12", on_kl_exceeded="rollback_continue", max_rollbacks=1)
    extra.update(rollback_lr_scale=1.0, rollback_kl_coef_scale=2.0)
    result = run_cli(
        workdir, "train", ppo_yaml(workdir, "saves/ppo_rollback", **extra), "--no-progress", *PPO_OVERRIDES
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert csv_rows(ppo_run[0])[0]["objective/kl"] == 0.0
    summary = json.loads((out / "ppo_metrics" / "summary.json").read_text())
    events = summary["events"]
    assert [(e["step"], e["event"]) for e in events[:2]] == [(2, "iteration_rejected"), (1, "rolled_back")]
    assert events[0]["kl"] > 1e-12 and events[1]["rollbacks"] == 1
    beta_after_1 = 0.2 * (1 - 0.2 * 8 / 10000)  # adaptive update from KL 0 (error clipped to -0.2), n = 8 rows
    assert events[1]["kl_coef"] == pytest.approx(2 * beta_after_1, rel=1e-6)
    assert "ppojax ppo step 2: iteration_rejected" in result.stderr  # printed as well
    rows = csv_rows(out)
    assert rows[0] == csv_rows(ppo_run[0])[0]  # iteration 1 as in the uninterrupted run
    if summary["status"] == "completed":  # every retried iteration had KL <= 1e-12 (k1 can be negative)
        assert len(events) == 2 and [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    else:
        last = events[-1]
        assert [e["event"] for e in events[2:]] == ["iteration_rejected", "rolled_back_and_stopped"]
        assert events[2]["step"] == last["step"] + 1 and events[2]["kl"] > 1e-12
        assert summary["status"].startswith(f"rolled back to iteration {last['step']} and stopped: KL")
        assert summary["iteration"] == last["step"] and [r["step"] for r in rows] == list(range(1, last["step"] + 1))
        assert all(r["objective/kl"] <= 1e-12 for r in rows)
    assert summary["run_control"]["rollbacks"] == 1
    assert (out / "value_model" / "model.safetensors").exists()


@pytest.mark.slow  # two more PPO processes (cached programs); the default budget is spent
def test_a_run_stopped_on_kl_is_not_resumed_from_its_rejected_update(workdir, ppo_run):
    """on_kl_exceeded=stop: iteration 2's KL is above early_stop_kl, the run saves that rejected update (marked
    not good), exports it and stops. Rerunning the same command refuses to train on from it, in one line naming
    the checkpoint directory, and leaves the outputs as they were."""
    out = workdir / "saves" / "ppo_stop"
    yaml = ppo_yaml(workdir, "saves/ppo_stop", early_stop_kl="1.0e-12", on_kl_exceeded="stop")
    result = run_cli(workdir, "train", yaml, "--no-progress", *PPO_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "ppo_metrics" / "summary.json").read_text())
    assert summary["status"].startswith("stopped at iteration 2: KL") and summary["iteration"] == 2
    exported = weights(out)
    rerun = run_cli(workdir, "train", yaml, "--no-progress", *PPO_OVERRIDES)
    assert rerun.returncode != 0
    last = rerun.stderr.strip().splitlines()[-1]
    assert "checkpoints: the run stopped at iteration 2 on the KL limit (on_kl_exceeded: stop)" in last, last
    assert "overwrite_output_dir: true" in last
    assert json.loads((out / "ppo_metrics" / "summary.json").read_text()) == summary
    found = weights(out)
    assert sorted(found) == sorted(exported)
    for name in exported:
        np.testing.assert_array_equal(found[name], exported[name])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (("reward_model=qwen2-tiny",), "has no reward head (score.weight)"),
        (("preset=verl",), "'ppo_target' 6.0 has no effect with a fixed KL coefficient"),
        (("ref_model_adapters=qwen2-tiny",), "has no adapter_config.json (expected a local PEFT LoRA adapter"),
        (("batch_size=6",), "'batch_size' 6 (prompts per PPO iteration) is not divisible by"),
        (("max_new_tokens=100",), "needs 116 positions but"),
        (("critic_mode=shared", "critic_learning_rate=1e-5"), "'critic_learning_rate' has no effect with critic_mode"),
        (("gradient_accumulation_steps=8",), "12 prompts, fewer than one rollout batch of 32"),
        (("on_kl_exceeded=rollbak",), "did you mean 'rollback'?"),
        (("old_logprobs=behaviour",), "'old_logprobs' is 'behaviour'; allowed: score, rollout"),
        (("dataset=empty_prompt.jsonl",), "empty_prompt.jsonl:2: empty prompt"),
    ],
)
def test_bad_ppo_config_is_one_line_and_exit_2(workdir, reward_dir, monkeypatch, capsys, overrides, message):
    monkeypatch.chdir(workdir)
    (workdir / "empty_prompt.jsonl").write_text('{"prompt": "hi"}\n{"prompt": "  "}\n')
    path = ppo_yaml(workdir, "saves/bad")
    size = [o for o in PPO_OVERRIDES if o.split("=")[0] not in {x.split("=")[0] for x in overrides}]
    assert main(["train", path, "--no-progress", *size, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ppojax: error: ") and err.count("\n") == 1 and message in err, err


def test_generate_greedy_matches_a_cacheless_forward_pass(workdir, ppo_run, monkeypatch, capsys):
    """`ppojax generate` at temperature 0 against step-by-step argmax of full forward passes (no KV cache)."""
    out, _ = ppo_run
    monkeypatch.chdir(workdir)
    args = ["generate", "--model", str(out), "--prompts", "prompts.json", "--template", "qwen"]
    args += ["--max-new-tokens", "5", "--max-prompt-length", "16"]  # 16 + 5 positions of the model's 64
    assert main([*args, "--temperature", "0", "--batch-size", "5", "--output", "greedy.jsonl"]) == 0
    rows = [json.loads(line) for line in (workdir / "greedy.jsonl").read_text().splitlines()]
    tokenizer = load_tokenizer(str(out))
    eos = tokenizer.eos_token_id
    prompts = load_prompts("prompts.json", tokenizer, template="qwen", max_prompt_length=16).prompts
    model, params = load_pretrained(str(out), head="lm")
    width = 16 + 5

    @jax.jit
    def next_logits(ids, mask):  # [1, W] left-padded: positions come from the mask
        return model.apply(params, ids, mask).logits[0, -1]

    def check_greedy(rows, prompts, penalty=1.0, width=width):
        for row, prompt in zip(rows, prompts):
            assert row["prompt"] == tokenizer.decode(list(prompt))
            sequence, generated = list(prompt), []
            while len(generated) < 5 and (not generated or generated[-1] != eos):
                ids = np.full((1, width), tokenizer.pad_token_id, np.int32)
                mask = np.zeros((1, width), np.int32)
                ids[0, width - len(sequence) :], mask[0, width - len(sequence) :] = sequence, 1
                logits = np.asarray(next_logits(ids, mask), np.float64)
                seen = sorted(set(sequence))  # transformers' repetition penalty on every token so far
                logits[seen] = np.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
                token = int(np.argmax(logits))
                sequence.append(token)
                generated.append(token)
            assert row["tokens"] == len(generated) and row["stopped"] == (generated[-1] == eos)
            assert row["response"] == tokenizer.decode(generated, skip_special_tokens=True)

    assert len(rows) == len(prompts) == 12
    check_greedy(rows, prompts)
    # The same prompts as a LLaMA-Factory dataset name (alpaca records in lf/dataset_info.json): the same rows.
    (workdir / "lf").mkdir(exist_ok=True)
    texts = [
        p.get("instruction") or p.get("prompt") or p["messages"][0]["content"] for p in json.load(open("prompts.json"))
    ]
    (workdir / "lf" / "p.json").write_text(json.dumps([{"instruction": t, "input": ""} for t in texts]))
    (workdir / "lf" / "dataset_info.json").write_text(json.dumps({"lf_prompts": {"file_name": "p.json"}}))
    named = [a if a != "prompts.json" else "lf_prompts" for a in args] + ["--dataset-dir", "lf"]
    assert main([*named, "--temperature", "0", "--batch-size", "5", "--output", "named.jsonl"]) == 0
    named_rows = [json.loads(line) for line in (workdir / "named.jsonl").read_text().splitlines()]
    drop = lambda row: {k: v for k, v in row.items() if k != "source"}  # noqa: E731
    assert [drop(r) for r in named_rows] == [drop(r) for r in rows]
    # With a repetition penalty and a system prompt for the records without one. The trained policy's greedy
    # responses repeat one token with a large margin ("': : : : :'"): a penalty of 1.5 leaves them as they are.
    extra = ["--repetition-penalty", "100", "--default-system", "yes", "--output", "penalised.jsonl"]
    assert main([*args[:-2], "--max-prompt-length", "24", "--temperature", "0", "--batch-size", "5", *extra]) == 0
    penalised = [json.loads(line) for line in (workdir / "penalised.jsonl").read_text().splitlines()]
    system_prompts = load_prompts(
        "prompts.json", tokenizer, template="qwen", max_prompt_length=24, default_system="yes"
    ).prompts
    assert all(p[-len(q) :] == q for p, q in zip(system_prompts, prompts))  # the system turn, then the prompt
    assert all(row["prompt"].startswith("<s> system : yes <eos>") for row in penalised)
    check_greedy(penalised, system_prompts, penalty=100.0, width=24 + 5)
    assert [row["response"] for row in penalised] != [row["response"] for row in rows]
    # On a mesh (8 fake devices: batch over data 4, heads / MLP / vocab over tensor 2): the same greedy rows.
    mesh = ["--temperature", "0", "--batch-size", "4", "--mesh", "{data: 4, tensor: 2}"]
    assert main([*args, *mesh, "--output", "greedy_mesh.jsonl"]) == 0
    assert [json.loads(line) for line in (workdir / "greedy_mesh.jsonl").read_text().splitlines()] == rows
    assert main([*args, *mesh[:-1], "{data: 3}"]) == 2
    assert (
        "ppojax: error: --mesh: mesh {data: 3, fsdp: 1, tensor: 1}: axis sizes multiply to 3" in capsys.readouterr().err
    )
    assert main([*args, "--batch-size", "5", *mesh[4:]]) == 2
    err = capsys.readouterr().err
    assert err == "ppojax: error: command line: '--batch-size' is 5; must be a multiple of data x fsdp = 4 on --mesh\n"
    # Sampling to stdout: one JSON line per prompt, reproducible for a seed.
    assert main([*args, "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--seed", "3"]) == 0
    assert capsys.readouterr().out == first and len(first.splitlines()) == 12
    assert main([*args, "--top-p", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "ppojax: error: command line: '--top-p' is 0.0; must be > 0 and <= 1\n"
    assert main([*args, "--repetition-penalty", "0"]) == 2
    assert "'--repetition-penalty' is 0.0; must be > 0 (1 is off)" in capsys.readouterr().err


@pytest.mark.slow  # its own compilations (full fine-tuning, shared trunk, score normalisation): ~60 s of CPU
def test_full_finetuning_shared_critic_and_score_norm(workdir, reward_dir):
    # LLaMA-Factory's layout (a value head on the policy trunk) with its TRL 0.9.6 convention: micro-batches of 2
    # rows, accumulated as the mean of their token-mean losses, and the ratio threshold.
    out = workdir / "saves" / "ppo_full"
    extra = dict(
        finetuning_type="full", critic_mode="shared", ppo_score_norm="true", bf16="false", preset="llamafactory"
    )
    path = ppo_yaml(workdir, "saves/ppo_full", **extra)
    path_text = open(path).read()
    path_text = "\n".join(line for line in path_text.splitlines() if not line.startswith(("lora_rank", "lora_target")))
    open(path, "w").write(path_text + "\n")
    sizes = [o for o in PPO_OVERRIDES if not o.startswith(("lora_rank", "max_steps"))]
    result = run_cli(workdir, "train", path, "--no-progress", *sizes, "max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "ppo_metrics" / "summary.json").read_text())
    control = summary["run_control"]
    assert summary["status"] == "completed" and control["reward_gain"] > 0 and control["reward_gain"] != 1.0
    rows = csv_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["objective/kl"] == 0.0
    assert [r["policy/ratio_skipped"] for r in rows] == [0.0, 0.0]  # ratios near 1: nothing skipped
    assert rows[0]["objective/kl_coef"] == pytest.approx(0.2)  # llamafactory: adaptive from TRL 0.x's 0.2
    policy, params = load_pretrained(str(out), head="lm")
    _, base = load_pretrained(str(workdir / "qwen2-tiny"), head="lm")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not np.array_equal(np.asarray(params["embed"]["embedding"])[:20], np.asarray(base["embed"]["embedding"]))
    value_model, value_params = load_pretrained(str(out / "value_model"), head="value")
    # Shared trunk: the value model is the trained policy trunk with the trained value head, which has TRL's bias
    # under the llamafactory preset (so it is written in LLaMA-Factory's layout, value_head.safetensors).
    np.testing.assert_array_equal(value_params["embed"]["embedding"], params["embed"]["embedding"])
    assert np.abs(np.asarray(value_params["value_head"]["kernel"])).max() > 0  # from 0, trained
    assert value_model.config.head_bias and float(value_params["value_head"]["bias"][0]) != 0.0
    assert (out / "value_model" / "value_head.safetensors").exists()


@pytest.mark.slow  # its own compilations (a second reward model shape: the head's bias): ~40 s of CPU
def test_ppo_on_a_llamafactory_lora_reward_model(workdir):
    # The seed documents' flow with step 1 done in LLaMA-Factory: `reward_model` is its LoRA rm output_dir
    # (adapter + value_head.safetensors, tokenizer padded with EOS) and `reward_model_type: lora` as they write it.
    # The policy starts from LLaMA-Factory's LoRA sft adapter and trains it further (adapter_name_or_path).
    from tests.test_llamafactory_rm import BIAS, build_llamafactory_lora_rm, build_peft_adapter

    lf_dir = workdir / "saves" / "lf_reward"
    build_llamafactory_lora_rm(workdir / "qwen2-tiny", lf_dir)
    sft = build_peft_adapter(workdir / "qwen2-tiny", workdir / "saves" / "lf_sft", "all-linear", seed=5)
    path = ppo_yaml(
        workdir,
        "saves/ppo_lf",
        reward_model="saves/lf_reward",
        reward_model_type="lora",
        adapter_name_or_path="saves/lf_sft",
    )
    sizes = [o for o in PPO_OVERRIDES if not o.startswith("max_steps")]
    result = run_cli(workdir, "train", path, "--no-progress", *sizes, "max_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    out = workdir / "saves" / "ppo_lf"
    assert json.loads((out / "ppo_metrics" / "summary.json").read_text())["status"] == "completed"
    rows = csv_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["objective/scores"]) for r in rows)
    # The critic started from LLaMA-Factory's head and is exported in its layout (transformers' score has no bias).
    assert {"config.json", "model.safetensors", "value_head.safetensors"} <= set(os.listdir(out / "value_model"))
    value_model, value_params = load_pretrained(str(out / "value_model"), head="value")
    bias = float(value_params["value_head"]["bias"][0])
    assert value_model.config.head_bias and abs(bias - BIAS) < 0.05  # LLaMA-Factory's head (bf16), a few steps on
    # The exported policy is the sft adapter trained a little further: near PEFT's merged model, not the base.
    _, params = load_pretrained(str(out), head="lm")
    _, base = load_pretrained(str(workdir / "qwen2-tiny"), head="lm")
    merged = sft.merge_and_unload().state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy().T
    q, q_base = (np.asarray(p["layers_0"]["attn"]["q"]["kernel"], np.float32) for p in (params, base))
    assert np.linalg.norm(q - merged) < 0.1 * np.linalg.norm(merged - q_base)  # bf16 export, a few lr-1e-3 steps
