"""Rollout throughput: ppojax `rollout` (jitted, KV cache) vs transformers `generate` (PyTorch CPU, KV cache).

Both sample from the same tiny random Qwen2-shaped checkpoint (saved once with transformers, loaded by
ppojax), the same left-padded prompts, at the same temperature, exactly `--new-tokens` tokens per row (no
stop token in ppojax; `min_new_tokens` = `max_new_tokens` in transformers), full distribution (top-k off,
top-p 1). Reports the median and the best tokens/s over `--repeats` timed runs after warm-up, and the ratios;
the machine's load average is printed because other work on the box skews both (torch's more).

    python experiments/bench/bench_rollout.py [--batch 64 --prompt-len 16 --new-tokens 32 --repeats 5]

With several JAX CPU devices the prompt batch is split across them (rows sharded, params replicated; the
same jitted `rollout`, partitioned by XLA). Two single-threaded virtual devices use both cores of a 2-core box:

    XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_cpu_multi_thread_eigen=false" \
        python experiments/bench/bench_rollout.py

Not a test: timings depend on the machine and on whatever else is running.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ppojax.models import load_pretrained
from ppojax.rollout import pad_prompts, rollout_jit

PAD_ID = 0


def build_checkpoint(directory: str, vocab_size: int, seed: int) -> transformers.PreTrainedModel:
    config = transformers.Qwen2Config(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def make_prompts(batch: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max_len // 2, max_len + 1, batch)
    return [rng.integers(1, vocab_size, n).tolist() for n in lengths]


def time_runs(run, repeats: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each timed run, after two warm-up runs (compilation)."""
    run()
    run()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--vocab", type=int, default=1536)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    prompts = make_prompts(args.batch, args.prompt_len, args.vocab, args.seed)
    ids, mask = pad_prompts(prompts, PAD_ID, bucket=args.prompt_len)
    n_tokens = args.batch * args.new_tokens

    with tempfile.TemporaryDirectory() as directory:
        hf_model = build_checkpoint(directory, args.vocab, args.seed)
        model, params = load_pretrained(directory)

    key = jax.random.key(args.seed)
    sample = functools.partial(rollout_jit, model, max_new_tokens=args.new_tokens, temperature=args.temperature,
                               stop_token_ids=(), pad_token_id=PAD_ID)
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
        print(f"batch split over {len(jax.devices())} devices: same tokens as one device: {same}, "
              f"max log-prob difference {gap:.1e}")
    load_before = os.getloadavg()

    def run_ppojax():
        out = jax.block_until_ready(sample(params_on, ids_on, mask_on, key))
        assert int(out.lengths.min()) == args.new_tokens

    torch_ids, torch_mask = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(mask.astype(np.int64))

    def run_transformers():
        with torch.no_grad():
            out = hf_model.generate(
                input_ids=torch_ids, attention_mask=torch_mask, do_sample=True, temperature=args.temperature,
                top_k=0, top_p=1.0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                use_cache=True, pad_token_id=PAD_ID,
            )
        assert out.shape[1] == ids.shape[1] + args.new_tokens

    median, best = {}, {}
    for name, run in (("ppojax rollout", run_ppojax), ("transformers generate", run_transformers)):
        wall, cpu = time_runs(run, args.repeats)
        median[name], best[name] = n_tokens / statistics.median(wall), n_tokens / min(wall)
        print(f"{name:>22}: median {statistics.median(wall) * 1e3:7.1f} ms -> {median[name]:6.0f} tokens/s; "
              f"best {min(wall) * 1e3:7.1f} ms -> {best[name]:6.0f} tokens/s; "
              f"median CPU {statistics.median(cpu) * 1e3:6.0f} ms (runs: {', '.join(f'{t * 1e3:.0f}' for t in wall)} ms)")
    print(f"batch {args.batch}, prompt width {ids.shape[1]}, {args.new_tokens} new tokens, T={args.temperature}, "
          f"vocab {args.vocab}; torch threads {torch.get_num_threads()}, jax devices {jax.devices()}, "
          f"load average before/after: {load_before} / {os.getloadavg()}")
    ours, theirs = "ppojax rollout", "transformers generate"
    print(f"ratio ppojax / transformers: median {median[ours] / median[theirs]:.2f}x, best {best[ours] / best[theirs]:.2f}x")


if __name__ == "__main__":
    main()
