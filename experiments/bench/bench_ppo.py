"""PPO update benchmark: ppojax against TRL 1.12's `PPOTrainer`, same workload, same machine, same run.

    PYTHONPATH=. python experiments/bench/bench_ppo.py [--workload cpu] [--minibatches 1 4] [--updates 10]

prints, for each minibatch setting, seconds per PPO update (median over `--updates` timed updates after
`--warmup` warm-up updates of each) split into generate / score / train, the FLOP/s each phase achieves as a
fraction of the matmul peak measured in JAX in the same run, and each process's peak memory.

The peers live in their own virtual environments, outside the repository (nothing from them is committed):

    python -m venv /work/venvs/trl
    /work/venvs/trl/bin/pip install torch==2.13.0          # first, so pip never pulls the CUDA build
    /work/venvs/trl/bin/pip install trl==1.12.0 transformers accelerate datasets

    python -m venv /work/venvs/tunix && /work/venvs/tunix/bin/pip install google-tunix   # see BUILD_NOTES

(`--trl-python` points at the TRL interpreter; default /work/venvs/trl/bin/python.)

How it runs
  1. `workload.build` writes the workload into a temporary directory: a byte-level BPE tokenizer (vocab 512,
     pad 0, EOS 1), a random Qwen2ForCausalLM policy and a Qwen2ForSequenceClassification reward model
     (hidden 256, 4 layers, 4 heads, 2 KV heads, intermediate 688, tied, fp32), 64 prompts of 10–16 tokens.
  2. Two worker processes load it: `ppo_ppojax_worker.py` (this interpreter) and `ppo_trl_worker.py` (the TRL
     interpreter). Each holds its own models and optimizer; this script sends them commands over stdin.
  3. Warm-up updates (ppojax compiles here), then `--updates` rounds; each round measures the JAX matmul peak
     (and torch's), then runs one update of each library, alternating which goes first, recording the
     1-minute load average before each. Only one worker computes at a time.
  4. Peak memory: each worker's resident-set high-water mark (VmHWM from /proc/self/status) at the end.
  5. "first update s": the first warm-up update's wall time, compilation included (ppojax compiles its three
     programs there; `--compilation-cache DIR`, given on a second run, shows it with them loaded instead).

FLOPs are analytic model FLOPs (see `workload.phase_flops`): 2 per multiply-add of the matmuls the
algorithm needs; the same count for both libraries, so a fraction of peak compares like with like.

Allocator: when `/usr/lib/x86_64-linux-gnu/libjemalloc.so.2` exists both workers run with it preloaded
(`MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true`, as bench_rollout.py); `--no-jemalloc` keeps
glibc malloc for both.

Not a test: timings depend on the machine and whatever else runs on it; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import workload as wl

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"
PHASES = ("generate", "score", "train")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cpu", choices=sorted(wl.WORKLOADS))
    parser.add_argument("--minibatches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--updates", type=int, default=10, help="timed updates of each library")
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates of each library first")
    parser.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    parser.add_argument("--no-trl", action="store_true", help="ppojax only")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch threads in the TRL worker (0: default)")
    parser.add_argument("--devices", type=int, default=1, help="virtual JAX CPU devices for ppojax")
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="rows per forward/backward pass for both libraries (ppojax micro_batch_size, TRL "
        "per_device_train_batch_size with gradient accumulation; on this workload TRL then steps its optimizer "
        "after every micro-batch, see parity_trl.py); 0: the whole minibatch",
    )
    parser.add_argument(
        "--old-logprobs",
        default="rollout",
        choices=("rollout", "score"),
        help="ppojax's old log-probs: rollout (the sampling log-probs, as TRL does: 3 scoring passes like TRL's) or "
        "score (ppojax's default: a 4th, teacher-forced policy pass)",
    )
    parser.add_argument(
        "--compilation-cache",
        default=None,
        metavar="DIR",
        help="JAX's persistent compilation cache for the ppojax worker (JAX_COMPILATION_CACHE_DIR): run twice to "
        "see the first update with the programs loaded instead of compiled",
    )
    parser.add_argument("--no-jemalloc", action="store_true")
    parser.add_argument("--peak-size", type=int, default=2048, help="square matmul size of the peak (8192 on a GPU)")
    parser.add_argument(
        "--bandwidth-mb", type=int, default=256, help="array size of the bandwidth test (4096 on a GPU)"
    )
    parser.add_argument("--json", default=None, help="write every measurement here")
    return parser.parse_args(argv)


class Worker:
    """A worker process answering one `@@bench` JSON line per command."""

    def __init__(self, name: str, argv: list[str], env: dict, log_path: str):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (lives as long as the worker)
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, env=env
        )

    def receive(self) -> dict:
        for line in self.process.stdout:
            if line.startswith(wl.TAG):
                return json.loads(line[len(wl.TAG) :])
        self.log.flush()
        with open(self.log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"{self.name} worker exited (code {self.process.wait()}); log {self.log_path}:\n{tail}")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.receive()

    def close(self) -> None:
        try:
            self.ask("quit")
        except (RuntimeError, BrokenPipeError):
            pass
        self.process.wait(timeout=60)
        self.log.close()


def worker_env(args) -> dict:
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # on a GPU, leave memory for the torch worker
    if not args.no_jemalloc and os.path.exists(JEMALLOC):
        env["LD_PRELOAD"] = (env.get("LD_PRELOAD", "") + " " + JEMALLOC).strip()
        env["MALLOC_CONF"] = MALLOC_CONF
    return env


def checked(update: dict, name: str, workload: wl.Workload) -> dict:
    """An update's report, refused if the library rolled out another number of prompts than the workload's."""
    rows = update.get("rows", workload.batch_size)
    if rows != workload.batch_size:
        raise RuntimeError(f"{name} generated {rows} rows per update, the workload has {workload.batch_size}")
    return update


def run_setting(args, directory: str, minibatches: int, workload: wl.Workload) -> dict:
    env = worker_env(args)
    ppojax_env = dict(env, JAX_COMPILATION_CACHE_DIR=args.compilation_cache) if args.compilation_cache else env
    total = args.warmup + args.updates
    workers = {
        "ppojax": Worker(
            "ppojax",
            [sys.executable, os.path.join(HERE, "ppo_ppojax_worker.py"), "--dir", directory]
            + ["--minibatches", str(minibatches), "--devices", str(args.devices), "--peak-size", str(args.peak_size)]
            + ["--bandwidth-mb", str(args.bandwidth_mb), "--micro-batch", str(args.micro_batch)]
            + ["--old-logprobs", args.old_logprobs],
            ppojax_env,
            os.path.join(directory, f"ppojax_{minibatches}.log"),
        )
    }
    if not args.no_trl:
        trl_env = dict(env, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        workers["trl"] = Worker(
            "trl",
            [args.trl_python, os.path.join(HERE, "ppo_trl_worker.py"), "--dir", directory]
            + ["--minibatches", str(minibatches), "--updates", str(total), "--peak-size", str(args.peak_size)]
            + ["--torch-threads", str(args.torch_threads), "--micro-batch", str(args.micro_batch)],
            trl_env,
            os.path.join(directory, f"trl_{minibatches}.log"),
        )
    result = {"minibatches": minibatches, "ready": {}, "warmup": {}, "runs": {n: [] for n in workers}, "peaks": []}
    try:
        for name, worker in workers.items():
            result["ready"][name] = worker.receive()
        names = list(workers)
        for name in names:
            result["warmup"][name] = [checked(workers[name].ask("update"), name, workload) for _ in range(args.warmup)]
            print(f"  [{minibatches} minibatch(es)] {name} warm-up: {fmt_update(result['warmup'][name])}", flush=True)
        for round_ in range(args.updates):
            peak = {"jax": workers["ppojax"].ask("peak"), "load": os.getloadavg()[0]}
            if "trl" in workers:
                peak["torch"] = workers["trl"].ask("peak")
            result["peaks"].append(peak)
            for name in names if round_ % 2 == 0 else names[::-1]:
                load = os.getloadavg()[0]
                run = checked(workers[name].ask("update"), name, workload)
                run["load"] = load
                result["runs"][name].append(run)
            print(
                f"  [{minibatches} minibatch(es)] round {round_ + 1}/{args.updates} "
                f"(load {load:.1f}, JAX peak {peak['jax']['square_gflops']:.0f} GFLOP/s): "
                + "; ".join(f"{n} {fmt_phases(result['runs'][n][-1])}" for n in names),
                flush=True,
            )
        result["memory"] = {name: worker.ask("memory") for name, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    return result


def fmt_phases(run: dict) -> str:
    wall, cpu = run["wall"], run["cpu"]
    return (
        " + ".join(f"{wall[p]:.2f}" for p in PHASES)
        + f" = {sum(wall.values()):.2f} s (CPU "
        + " + ".join(f"{cpu[p]:.2f}" for p in PHASES)
        + f" = {sum(cpu.values()):.2f} s)"
    )


def fmt_update(runs: list[dict]) -> str:
    return ", ".join(f"{sum(r['wall'].values()):.1f} s" for r in runs)


def summarise(result: dict, workload: wl.Workload) -> dict:
    flops = wl.phase_flops(workload)
    peaks = [p["jax"]["square_gflops"] for p in result["peaks"]]
    peak = statistics.median(peaks)
    summary = {"peak_gflops_median": peak, "peak_gflops_max": max(peaks), "libraries": {}}
    bandwidth = statistics.median(p["jax"].get("bandwidth_gbs", float("nan")) for p in result["peaks"])
    summary["bandwidth_gbs_median"] = bandwidth
    roofline_seconds = wl.decode_bytes(workload) / (bandwidth * 1e9)
    peak_per_cpu = statistics.median(p["jax"].get("square_gflops_per_cpu_s", 0.0) for p in result["peaks"])
    summary["peak_gflops_per_cpu_s_median"] = peak_per_cpu
    if "train_shape_gflops" in result["peaks"][0]["jax"]:
        summary["train_shape_gflops_median"] = statistics.median(
            p["jax"]["train_shape_gflops"] for p in result["peaks"]
        )
    if "torch" in result["peaks"][0]:
        summary["torch_peak_gflops_median"] = statistics.median(p["torch"]["square_gflops"] for p in result["peaks"])
    for name, runs in result["runs"].items():
        lib = {"phases": {}}
        for phase in PHASES:
            seconds = statistics.median(r["wall"][phase] for r in runs)
            cpu = statistics.median(r["cpu"][phase] for r in runs)
            gflops = flops[phase] / seconds / 1e9
            lib["phases"][phase] = {"seconds": seconds, "cpu_seconds": cpu, "gflops": gflops, "of_peak": gflops / peak}
            if peak_per_cpu:
                lib["phases"][phase]["of_peak_per_cpu_s"] = flops[phase] / cpu / 1e9 / peak_per_cpu
        totals = [sum(r["wall"].values()) for r in runs]
        lib["total_median"], lib["total_best"] = statistics.median(totals), min(totals)
        generate = lib["phases"]["generate"]["seconds"]
        lib["generate_tokens_per_s"] = workload.batch_size * workload.new_tokens / generate
        lib["decode_of_bandwidth_roofline"] = roofline_seconds / generate
        lib["total_cpu_median"] = statistics.median(sum(r["cpu"].values()) for r in runs)
        lib["load"] = (min(r["load"] for r in runs), max(r["load"] for r in runs))
        lib["peak_rss_mb"] = result["memory"][name]["peak_rss_mb"]
        lib["rss_loaded_mb"] = result["ready"][name].get("rss_loaded_mb")
        lib["warmup_seconds"] = [sum(r["wall"].values()) for r in result["warmup"][name]]
        steps = [r.get("optimizer_steps", r.get("updates")) for r in runs]
        lib["optimizer_steps"] = statistics.median(steps) if None not in steps else None
        summary["libraries"][name] = lib
    if "trl" in result["runs"]:
        pairs = [
            sum(t["wall"].values()) / sum(p["wall"].values())
            for p, t in zip(result["runs"]["ppojax"], result["runs"]["trl"])
        ]
        summary["speedup_paired_median"] = statistics.median(pairs)
        summary["speedup_of_medians"] = (
            summary["libraries"]["trl"]["total_median"] / summary["libraries"]["ppojax"]["total_median"]
        )
        summary["cpu_speedup_of_medians"] = (
            summary["libraries"]["trl"]["total_cpu_median"] / summary["libraries"]["ppojax"]["total_cpu_median"]
        )
        summary["train_speedup"] = (
            summary["libraries"]["trl"]["phases"]["train"]["seconds"]
            / summary["libraries"]["ppojax"]["phases"]["train"]["seconds"]
        )
    return summary


def first_update(lib: dict) -> str:
    """The first (warm-up) update's wall seconds, compilation included; '–' without warm-up."""
    return f"{lib['warmup_seconds'][0]:.1f}" if lib["warmup_seconds"] else "–"


def print_table(workload: wl.Workload, summaries: list[tuple[int, dict]], header: dict) -> None:
    flops = wl.phase_flops(workload)
    print()
    print(
        f"# PPO update, workload {workload.name!r}: {wl.param_count(workload) / 1e6:.2f}M params/model, "
        f"{workload.batch_size} prompts × {workload.prompt_max} + {workload.new_tokens} new tokens, "
        f"{workload.ppo_epochs} epochs; ppojax on {header['devices']} JAX device(s), micro-batch "
        f"{header['micro_batch'] or 'the minibatch'} (both libraries), ppojax old log-probs from the "
        f"{header['old_logprobs']}; {header['date']}, {header['machine']}"
    )
    print(
        "# model GFLOP per update: "
        + ", ".join(f"{phase} {flops[phase] / 1e9:.1f}" for phase in PHASES)
        + f"; JAX matmul peak = median over rounds of the best of 5 {header['peak_size']}² fp32 matmuls"
    )
    print()
    print(
        "| minibatches | library | generate s | score s | train s | update s (median / best) | "
        "update CPU s | train GFLOP/s (% of peak) | generate / score % of peak | generate tok/s (% of roofline) | "
        "first update s | peak RSS MB | load |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for minibatches, s in summaries:
        for name, lib in s["libraries"].items():
            ph = lib["phases"]
            print(
                f"| {minibatches} | {name} | {ph['generate']['seconds']:.3f} | {ph['score']['seconds']:.3f} | "
                f"{ph['train']['seconds']:.3f} | {lib['total_median']:.3f} / {lib['total_best']:.3f} | "
                f"{lib['total_cpu_median']:.2f} | "
                f"{ph['train']['gflops']:.0f} ({100 * ph['train']['of_peak']:.0f} %) | "
                f"{100 * ph['generate']['of_peak']:.0f} / {100 * ph['score']['of_peak']:.0f} | "
                f"{lib['generate_tokens_per_s']:.0f} ({100 * lib['decode_of_bandwidth_roofline']:.0f} %) | "
                f"{first_update(lib)} | {lib['peak_rss_mb']:.0f} | {lib['load'][0]:.1f}–{lib['load'][1]:.1f} |"
            )
    print()
    for minibatches, s in summaries:
        line = (
            f"{minibatches} minibatch(es): JAX peak {s['peak_gflops_median']:.0f} GFLOP/s (max {s['peak_gflops_max']:.0f}), "
            f"bandwidth {s['bandwidth_gbs_median']:.0f} GB/s; per CPU-second: JAX peak "
            f"{s['peak_gflops_per_cpu_s_median']:.0f} GFLOP, train phase "
            + ", ".join(
                f"{n} {100 * lib['phases']['train'].get('of_peak_per_cpu_s', 0):.0f} %"
                for n, lib in s["libraries"].items()
            )
            + " of it"
        )
        if "train_shape_gflops_median" in s:
            line += f"; wall GFLOP/s: JAX train-shape matmul {s['train_shape_gflops_median']:.0f}"
        if "torch_peak_gflops_median" in s:
            line += f", torch peak {s['torch_peak_gflops_median']:.0f}"
        ppojax_train = s["libraries"].get("ppojax", {}).get("phases", {}).get("train")
        if ppojax_train:
            executed = 1.0 - wl.pruned_train_flops(workload) / flops["train"]
            line += (
                f"; ppojax executes {100 * executed:.1f} % of the train phase's nominal FLOPs (last layer only at "
                f"the loss's columns): utilisation {100 * executed * ppojax_train['of_peak']:.0f} % of the peak "
                f"wall, {100 * executed * ppojax_train.get('of_peak_per_cpu_s', 0):.0f} % per CPU-second"
            )
        steps = {name: lib.get("optimizer_steps") for name, lib in s["libraries"].items()}
        if len(set(steps.values())) > 1:
            line += (
                "; NOT LIKE FOR LIKE: optimizer steps per update "
                + ", ".join(f"{name} {value:g}" for name, value in steps.items() if value is not None)
                + " (TRL 1.12 steps after every micro-batch on a dataloader's last batch; see parity_trl.py)"
            )
        if "speedup_paired_median" in s:
            line += (
                f"; ppojax / TRL speed-up: update {s['speedup_paired_median']:.2f}× (paired median; "
                f"{s['speedup_of_medians']:.2f}× of medians; CPU time {s['cpu_speedup_of_medians']:.2f}×), "
                f"train phase {s['train_speedup']:.2f}×"
            )
        print(line)


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def main(argv=None) -> dict:
    args = parse_args(argv)
    workload = wl.get(args.workload)
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "command": " ".join(sys.argv),
        "peak_size": args.peak_size,
        "devices": args.devices,
        "micro_batch": args.micro_batch,
        "old_logprobs": args.old_logprobs,
        "compilation_cache": args.compilation_cache,
        "jemalloc": not args.no_jemalloc and os.path.exists(JEMALLOC),
    }
    summaries, results = [], []
    out = {"header": header, "workload": workload.__dict__, "flops": wl.phase_flops(workload), "settings": []}
    with tempfile.TemporaryDirectory(prefix="ppojax_bench_") as directory:
        wl.build(workload, directory)
        for minibatches in args.minibatches:
            result = run_setting(args, directory, minibatches, workload)
            results.append(result)
            summaries.append((minibatches, summarise(result, workload)))
            out["settings"].append({"raw": result, "summary": summaries[-1][1]})
            if args.json:  # after every setting, so a long run keeps what it measured
                with open(args.json + ".tmp", "w") as f:
                    json.dump(out, f, indent=1)
                os.replace(args.json + ".tmp", args.json)
            print_table(workload, summaries[-1:], header)
    if len(summaries) > 1:
        print_table(workload, summaries, header)
    return out


if __name__ == "__main__":
    main()
