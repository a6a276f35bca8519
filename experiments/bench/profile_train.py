"""Where the ppojax train phase spends its time: a `jax.profiler` trace of `train_on_batch` on the benchmark
workload, summarised per XLA op kind, plus the optimized HLO of the train program (XLA dump).

    PYTHONPATH=. python experiments/bench/profile_train.py [--minibatches 1] [--devices 1] [--out /tmp/ppojax_profile]

Writes OUT/trace (TensorBoard / Perfetto: `*.trace.json.gz`), OUT/xla (optimized HLO text) and prints:
  - CPU time per train call and its model GFLOP per CPU-second against a matmul's (both per CPU-second, so a
    busy machine distorts them less than wall time);
  - the trace's op time by kind: matmuls (XLA `dot` / oneDNN / YNNPACK calls) against everything else
    (fusions of elementwise ops, reductions, copies and transposes, gathers and scatters), the ten largest ops;
  - counts of dots, copies and transposes in the optimized train module.
Not a test.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="a workload directory (default: build the cpu workload)")
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--calls", type=int, default=2, help="timed train calls after the compiling one")
    parser.add_argument("--out", default="/tmp/ppojax_profile")
    return parser.parse_args()


ARGS = parse_args()
os.makedirs(ARGS.out, exist_ok=True)
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={ARGS.out}/xla --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"
).strip()
if ARGS.devices > 1:  # as ppo_ppojax_worker.set_devices, before jax is imported
    os.environ["XLA_FLAGS"] += (
        f" --xla_force_host_platform_device_count={ARGS.devices} --xla_cpu_multi_thread_eigen=false"
    )

import jax
import ppo_ppojax_worker as side
import workload as wl

MATMUL = re.compile(r"dot|matmul|gemm|onednn|ynn|xnn|conv", re.IGNORECASE)


def op_kind(name: str) -> str:
    if MATMUL.search(name):
        return "matmul"
    for kind in ("copy", "transpose", "gather", "scatter", "reduce", "fusion", "while", "dynamic"):
        if kind in name.lower():
            return kind
    return "other"


def summarise_trace(trace_dir: str) -> None:
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        print("no trace file found under", trace_dir)
        return
    with gzip.open(max(files)) as f:
        events = json.load(f).get("traceEvents", [])
    by_kind, by_name = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or "dur" not in event:
            continue
        name = event.get("name", "")
        # Keep XLA op / thunk events; skip Python and host-runtime wrappers.
        if name.startswith(("$", "PjRt", "Thunk", "ThunkExecutor", "jit_", "TfrtCpu")) or " " in name:
            continue
        by_kind[op_kind(name)] += event["dur"]
        by_name[name] += event["dur"]
    total = sum(by_kind.values())
    if not total:
        print("trace has no op events")
        return
    print("op time by kind (µs summed over threads, share):")
    for kind, us in by_kind.most_common():
        print(f"  {kind:10s} {us / 1e3:10.1f} ms  {100 * us / total:5.1f} %")
    print("largest ops:")
    for name, us in by_name.most_common(10):
        print(f"  {name[:60]:60s} {us / 1e3:10.1f} ms")


def summarise_hlo(xla_dir: str) -> None:
    modules = [p for p in glob.glob(os.path.join(xla_dir, "*train_on_batch*after_optimizations.txt"))]
    if not modules:
        print("no optimized train module in", xla_dir)
        return
    with open(max(modules, key=os.path.getsize)) as f:
        text = f.read()
    counts = {op: len(re.findall(rf"= \S+ {op}\(", text)) for op in ("dot", "copy", "transpose", "fusion", "gather")}
    counts["custom-call"] = text.count("custom-call(")
    print("optimized train module op counts:", counts)


def main() -> None:
    directory = ARGS.dir
    if directory is None:
        directory = tempfile.mkdtemp(prefix="ppojax_profile_wl_")
        wl.build(wl.get("cpu"), directory)
    run = side.setup(directory, ARGS.minibatches)
    key = jax.random.key(1)
    sampled = run.generate(run.state.policy, run.prompt_ids, run.prompt_mask, key)
    experience = jax.block_until_ready(
        run.score(run.state, run.prompt_ids, run.prompt_mask, sampled, run.ref_params, run.reward_params)
    )
    state = run.state
    state, _ = jax.block_until_ready(run.train(state, experience, run.ref_params))  # compile
    flops = wl.phase_flops(run.workload)["train"]
    cpu = []
    for _ in range(ARGS.calls):
        wall0, cpu0 = wl.process_times()
        state, _ = jax.block_until_ready(run.train(state, experience, run.ref_params))
        wall1, cpu1 = wl.process_times()
        cpu.append((wall1 - wall0, cpu1 - cpu0))
    peak = side.matmul_peak(run.workload, 2048)
    best_cpu = min(c for _, c in cpu)
    print(f"train call: wall {[round(w, 2) for w, _ in cpu]} s, CPU {[round(c, 2) for _, c in cpu]} s")
    print(
        f"train GFLOP per CPU-second {flops / best_cpu / 1e9:.0f} (best call); JAX 2048² matmul "
        f"{peak['square_gflops_per_cpu_s']:.0f}, train-shape matmul {peak.get('train_shape_gflops_per_cpu_s', 0):.0f} "
        f"GFLOP per CPU-second → {100 * flops / best_cpu / 1e9 / peak['square_gflops_per_cpu_s']:.0f} % of the square peak"
    )
    trace_dir = os.path.join(ARGS.out, "trace")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        state, _ = jax.block_until_ready(run.train(state, experience, run.ref_params))
    summarise_trace(trace_dir)
    summarise_hlo(os.path.join(ARGS.out, "xla"))


if __name__ == "__main__":
    main()
