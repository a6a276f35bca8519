"""`ppojax train` stage ppo on a mesh: on 8 fake CPU devices against one device, and as two processes on loopback
(jax.distributed, gloo CPU collectives) against one process."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from ppojax.models import load_pretrained
from ppojax.reports import read_metrics_csv
from tests.test_cli_ppo import ROOT
from tests.test_cli_ppo import PPO_OVERRIDES, ppo_run, ppo_yaml, reward_dir, run_cli, workdir  # noqa: F401


@pytest.mark.slow  # two end-to-end PPO runs of the example YAML (one shared with test_cli_ppo when run together)
def test_ppo_stage_on_a_mesh_matches_one_device(workdir, ppo_run):  # noqa: F811
    single_dir, _ = ppo_run
    # Rollout batch 2 x 2 x 2 = 8 prompts over data 2 x fsdp 4 (the 8 devices); micro-batches of 2 rows.
    result = run_cli(
        workdir, "train", ppo_yaml(workdir, "saves/ppo_mesh"), "--no-progress", *PPO_OVERRIDES, "mesh={fsdp: 4}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "memory estimate per device (mesh data=2, fsdp=4, tensor=1" in result.stderr
    sharded = read_metrics_csv(str(workdir / "saves" / "ppo_mesh" / "ppo_metrics" / "training_metrics.csv"))
    single = read_metrics_csv(str(single_dir / "ppo_metrics" / "training_metrics.csv"))
    # The example YAML trains in bf16 (8-bit mantissa: ~4e-3 relative per rounding), and the sharded program
    # sums in another order, so values agree to bf16 precision, not float32's: measured here scores within
    # 1.2e-3 relative, KL within 6e-4 absolute. The sampled responses are the same (equal lengths); a wrong
    # shard would change scores by O(0.1) and the lengths.
    assert len(sharded) == len(single) == 5
    for a, b in zip(sharded, single):
        assert a["response/length_mean"] == b["response/length_mean"]
        np.testing.assert_allclose(a["objective/scores"], b["objective/scores"], rtol=1e-2)
        # The loss is a sum of terms of both signs: 8e-3 relative measured at iteration 2.
        np.testing.assert_allclose(a["loss/total"], b["loss/total"], rtol=3e-2)
        for name in ("objective/kl", "policy/approxkl"):
            np.testing.assert_allclose(a[name], b[name], atol=2e-3, err_msg=name)


# ----------------------------------------------------------------------------------------------------------
# Two processes on loopback, each running the command

# Runs `python -m ppojax.cli ARGS` after installing an audit hook that records every file this process creates,
# writes, renames or removes under WATCH (the run's output_dir) outside its checkpoints/ (orbax: every process
# writes its own shards there). Python-level opens only: safetensors and tensorstore write from native code,
# so the hook sees config.json of an export but not model.safetensors: enough to tell who exported.
_AUDITED_CLI = r"""
import os, sys, json, atexit, runpy
record, watch = sys.argv[1], os.path.abspath(sys.argv[2])
allowed = (watch, os.path.join(watch, "checkpoints"))
seen = []

def _path(value):
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.path.abspath(os.fsdecode(value))
    return None

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = ("w" in mode or "a" in mode or "x" in mode or "+" in mode) if isinstance(mode, str) else bool(
            (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        )
        paths = [_path(path)] if writes else []
    elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"):
        paths = [_path(a) for a in args[:2] if not isinstance(a, int)]
    else:
        return
    for p in paths:
        if p and (p == watch or p.startswith(watch + os.sep)) and p not in allowed and not p.startswith(allowed[1] + os.sep):
            seen.append([event, p])

atexit.register(lambda: open(record, "w").write(json.dumps(seen)))
sys.addaudithook(hook)
sys.argv = ["ppojax", *sys.argv[3:]]
runpy.run_module("ppojax.cli", run_name="__main__")
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return {**env, **extra}


def _csv(directory):
    rows = read_metrics_csv(str(directory / "ppo_metrics" / "training_metrics.csv"))
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "perf/"))} for row in rows]  # wall clock


@pytest.mark.slow  # three PPO processes compiling their own programs: ~3-4 min of CPU
def test_two_processes_run_the_ppo_command_like_one_process(workdir, reward_dir):  # noqa: F811
    """`JAX_COORDINATOR_ADDRESS` / `JAX_NUM_PROCESSES` / `JAX_PROCESS_ID`, 2 fake CPU devices each, gloo
    collectives: the mesh data 2 x fsdp 2 spans both processes. Against one process with 4 devices and the same
    mesh shape. float32 (bf16=false) so the comparison is at float32 precision."""
    sizes = [o for o in PPO_OVERRIDES if not o.startswith("max_steps")]
    common = ("--no-progress", *sizes, "max_steps=3", "bf16=false", "mesh={data: 2, fsdp: 2}")
    two, one = workdir / "saves" / "ppo_2proc", workdir / "saves" / "ppo_1proc"
    config_two, config_one = ppo_yaml(workdir, "saves/ppo_2proc"), ppo_yaml(workdir, "saves/ppo_1proc")
    port = str(_free_port())
    processes = []
    for i in range(2):
        env = _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
        record = str(workdir / f"writes_{i}.json")
        command = [sys.executable, "-c", _AUDITED_CLI, record, str(two), "train", config_two, *common]
        processes.append(
            subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    reference = subprocess.run(
        [sys.executable, "-m", "ppojax.cli", "train", config_one, *common],
        cwd=workdir,
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    outputs = [p.communicate(timeout=1200)[0] for p in processes]
    for i, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {i}:\n{output[-4000:]}"
    assert reference.returncode == 0, reference.stderr[-4000:]

    # Only process 0 wrote reports and models (the hook saw its CSV, summary, plot and export config.json).
    writes = [json.loads((workdir / f"writes_{i}.json").read_text()) for i in range(2)]
    assert writes[1] == [], writes[1][:10]
    written = {os.path.relpath(path, two) for _, path in writes[0]}
    for name in (
        "ppo_metrics/training_metrics.csv",
        "ppo_metrics/summary.json",
        "ppo_metrics/samples.jsonl",
        "ppo_metrics/training_curves.png",
        "config.json",
        "value_model/config.json",
    ):
        assert any(
            w == name or w.startswith(os.path.join(os.path.dirname(name), "." + os.path.basename(name)))
            for w in written
        ), (name, sorted(written))
    assert "memory estimate per device (mesh data=2, fsdp=2, tensor=1" in outputs[0]
    assert "memory estimate" not in outputs[1]

    # The same metrics as one process on the same mesh shape, to float32 rounding (gloo all-reduces across the
    # processes instead of one process's): measured here within 2.5e-7 relative where a metric is not ~0, and
    # 1e-6 absolute at most (KL 3e-8, near-zero means and gaps 2e-8); the sampled responses are the same.
    rows_two, rows_one = _csv(two), _csv(one)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2, 3]
    for a, b in zip(rows_two, rows_one):
        assert sorted(a) == sorted(b)
        assert a["response/length_mean"] == b["response/length_mean"]
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    samples = lambda d: (d / "ppo_metrics" / "samples.jsonl").read_text()  # noqa: E731
    assert [json.loads(s)["response"] for s in samples(two).splitlines()] == [
        json.loads(s)["response"] for s in samples(one).splitlines()
    ]
    summary = json.loads((two / "ppo_metrics" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["iteration"] == 3
    assert sorted(int(s) for s in os.listdir(two / "checkpoints") if s.isdigit()) == [1, 2, 3]

    # The exported policy and value model: gathered from both processes, equal to the one-process export
    # (measured: 7e-8 and 9e-7 of each tensor's largest entry), and the policy loads in transformers.
    for sub in ("", "value_model"):
        expected, found = (
            load_file(str(one / sub / "model.safetensors")),
            load_file(str(two / sub / "model.safetensors")),
        )
        assert sorted(found) == sorted(expected)
        for name in expected:
            scale = np.abs(expected[name]).max()
            np.testing.assert_allclose(found[name], expected[name], rtol=0, atol=1e-5 * scale, err_msg=f"{sub}/{name}")
    import torch
    import transformers

    policy = transformers.AutoModelForCausalLM.from_pretrained(str(two))
    ids = torch.tensor([[3, 4, 5]])
    ours_model, ours_params = load_pretrained(str(two), head="lm")
    ours = np.asarray(ours_model.apply(ours_params, ids.numpy(), np.ones((1, 3), np.int32)).logits)
    np.testing.assert_allclose(policy(ids).logits.detach().numpy(), ours, atol=1e-5)
