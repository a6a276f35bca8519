"""Rollout throughput: ppojax `rollout` (jitted, KV cache) vs transformers `generate` (PyTorch CPU, KV cache).

Both sample from the same tiny random Qwen2-shaped checkpoint (saved once with transformers, loaded by
ppojax), the same left-padded prompts, at the same temperature, exactly `--new-tokens` tokens per row (no
stop token in ppojax; `min_new_tokens` = `max_new_tokens` in transformers), full distribution (top-k off,
top-p 1: the issue's workload) unless `--top-k` / `--top-p` ask for the filters users run (LLaMA-Factory's
defaults are top-k 50, top-p 0.7, T 0.95), applied the same way by both libraries. After two warm-up runs of
each, the timed runs alternate (ppojax, transformers, transformers, ppojax, ...) so both see the same
neighbours; each run records wall time, process CPU time and the 1-minute load average. Reports median and
best tokens/s of each, both ratios, and CPU ms per 1000 tokens (a figure that contention distorts less than
wall time).

    python experiments/bench/bench_rollout.py [--batch 64 --prompt-len 16 --new-tokens 32 --repeats 7]

Allocator: when `/usr/lib/x86_64-linux-gnu/libjemalloc.so.2` exists (Debian/Ubuntu: `apt-get install
libjemalloc2`) the script re-executes itself with it preloaded and
`MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true` (glibc malloc returns and re-faults the pages
of XLA's per-run buffers); both libraries run in that one process, so both get it. `--no-jemalloc` keeps the
system allocator. ppojax itself does not depend on jemalloc.

`--devices 2` splits the prompt batch over two virtual single-threaded JAX CPU devices (rows sharded, params
replicated; the same jitted `rollout`, partitioned by XLA) via
`XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false"`, and checks the
tokens equal the single-device run's.

Not a test: timings depend on the machine and on whatever else is running.
"""

from __future__ import annotations

import argparse
import os
import sys

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-k", type=int, default=0, help="0: off (the issue's workload)")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off (the issue's workload)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off (the issue's workload)")
    parser.add_argument("--vocab", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each library")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=1, help="virtual JAX CPU devices to split the batch over")
    parser.add_argument("--no-jemalloc", action="store_true", help="keep the system allocator")
    return parser.parse_args()


def setup_environment(args: argparse.Namespace) -> None:
    """Set XLA_FLAGS (before jax is imported) and re-exec under jemalloc when it is available."""
    if args.devices > 1:
        flags = f"--xla_force_host_platform_device_count={args.devices} --xla_cpu_multi_thread_eigen=false"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    preloaded = JEMALLOC in os.environ.get("LD_PRELOAD", "")
    if not args.no_jemalloc and not preloaded and os.path.exists(JEMALLOC):
        env = dict(
            os.environ, LD_PRELOAD=(os.environ.get("LD_PRELOAD", "") + " " + JEMALLOC).strip(), MALLOC_CONF=MALLOC_CONF
        )
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


if __name__ == "__main__":
    ARGS = parse_args()
    setup_environment(ARGS)

import functools  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from ppojax.models import load_pretrained  # noqa: E402
from ppojax.generation import pad_prompts, rollout_jit  # noqa: E402

PAD_ID = 0


def build_checkpoint(directory: str, vocab_size: int, seed: int) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def make_prompts(batch: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_len // 2, max_len + 1, batch)
    return [rng.integers(1, vocab_size, n).tolist() for n in lengths]


def time_interleaved(runs: dict, repeats: int) -> dict:
    """{name: [(wall s, CPU s, load average), ...]}: two warm-up runs each (compilation), then `repeats`
    timed runs of each, alternating the order every round (A B, B A, ...)."""
    for run in runs.values():
        run()
        run()
    results = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            load = os.getloadavg()[0]
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            runs[name]()
            results[name].append((time.perf_counter() - start_wall, time.process_time() - start_cpu, load))
    return results


def main(args: argparse.Namespace) -> None:
    prompts = make_prompts(args.batch, args.prompt_len, args.vocab, args.seed)
    ids, mask = pad_prompts(prompts, PAD_ID, bucket=args.prompt_len)
    n_tokens = args.batch * args.new_tokens

    with tempfile.TemporaryDirectory() as directory:
        hf_model = build_checkpoint(directory, args.vocab, args.seed)
        model, params = load_pretrained(directory)

    key = jax.random.key(args.seed)
    sample = functools.partial(
        rollout_jit,
        model,
        max_new_tokens=args.new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_token_ids=(),
        pad_token_id=PAD_ID,
        repetition_penalty=args.repetition_penalty,
    )
    single_device = sample(params, ids, mask, key)
    ids_on, mask_on, params_on = ids, mask, params
    if len(jax.devices()) > 1:
        mesh = Mesh(np.array(jax.devices()), ("data",))
        rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
        ids_on, mask_on = jax.device_put(ids, rows), jax.device_put(mask, rows)
        params_on = jax.device_put(params, replicated)
        sharded = sample(params_on, ids_on, mask_on, key)
        same = np.array_equal(sharded.response_ids, single_device.response_ids)
        gap = float(np.max(np.abs(np.asarray(sharded.logprobs) - np.asarray(single_device.logprobs))))
        print(
            f"batch split over {len(jax.devices())} devices: same tokens as one device: {same}, "
            f"max log-prob difference {gap:.1e}"
        )

    def run_ppojax():
        out = jax.block_until_ready(sample(params_on, ids_on, mask_on, key))
        assert int(out.lengths.min()) == args.new_tokens

    torch_ids, torch_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run_transformers():
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=torch_ids,
                attention_mask=torch_mask,
                do_sample=True,
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                repetition_penalty=args.repetition_penalty,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                use_cache=True,
                pad_token_id=PAD_ID,
            )
        assert out.shape[1] == ids.shape[1] + args.new_tokens

    ours, theirs = "ppojax rollout", "transformers generate"
    results = time_interleaved({ours: run_ppojax, theirs: run_transformers}, args.repeats)
    median, best = {}, {}
    for name, runs in results.items():
        wall, cpu, loads = zip(*runs)
        median[name], best[name] = n_tokens / statistics.median(wall), n_tokens / min(wall)
        print(
            f"{name:>22}: median {statistics.median(wall) * 1e3:7.1f} ms -> {median[name]:6.0f} tokens/s; "
            f"best {min(wall) * 1e3:7.1f} ms -> {best[name]:6.0f} tokens/s; CPU per 1000 tokens: median "
            f"{statistics.median(cpu) / n_tokens * 1e6:5.0f} ms, min {min(cpu) / n_tokens * 1e6:5.0f} ms"
        )
        print(
            f"{'':>22}  runs (wall ms / CPU ms / load): "
            + ", ".join(f"{w * 1e3:.0f}/{c * 1e3:.0f}/{l:.1f}" for w, c, l in runs)
        )
    allocator = "jemalloc" if JEMALLOC in os.environ.get("LD_PRELOAD", "") else "system malloc"
    print(
        f"batch {args.batch}, prompt width {ids.shape[1]}, {args.new_tokens} new tokens, T={args.temperature}, "
        f"top_k={args.top_k}, top_p={args.top_p}, repetition_penalty={args.repetition_penalty}, "
        f"vocab {args.vocab}; torch threads {torch.get_num_threads()}, jax devices {len(jax.devices())}, "
        f"{allocator}; load average (1 min) over the timed runs: "
        f"{min(l for r in results.values() for *_, l in r):.2f}-{max(l for r in results.values() for *_, l in r):.2f}"
    )
    print(
        f"ratio ppojax / transformers: median {median[ours] / median[theirs]:.2f}x, best {best[ours] / best[theirs]:.2f}x"
    )


if __name__ == "__main__":
    main(ARGS)
