"""Sampler cost per decode step: top-k / top-p thresholds by bisection against sorting, on this backend.

`ppojax.sampling` finds the top-k and top-p cut-offs by bisection on CPU and by sorting (`jnp.sort`,
`lax.top_k`) elsewhere (`sampling._search_thresholds`). This times `sample_tokens` on random logits [B, V] in a
loop of decode-like steps with each choice forced, so the choice can be checked on an accelerator:

    python experiments/bench/bench_sampling.py [--batch 256 --vocab 151936 --steps 64 --repeats 5]

Prints the median time per step of each (filters off, top-p, top-k, both) and the ratio. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp

from ppojax import sampling

SETTINGS = {"full": (0, 1.0), "top-p 0.9": (0, 0.9), "top-k 50": (50, 1.0), "top-k 50 + top-p 0.7": (50, 0.7)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=1536)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=1.0)
    return parser.parse_args()


def step_loop(top_k: int, top_p: float, steps: int, temperature: float):
    """A jitted loop of `steps` sampler calls on slightly shifted logits (the step's work cannot be hoisted)."""

    def run(logits, key):
        def body(step, carry):
            total, key = carry
            key, sub = jax.random.split(key)
            tokens, logprobs = sampling.sample_tokens(
                sub, logits + step.astype(jnp.float32) * 1e-3, temperature, top_k=top_k, top_p=top_p
            )
            return total + jnp.sum(logprobs) + jnp.sum(tokens).astype(jnp.float32), key

        return jax.lax.fori_loop(0, steps, body, (jnp.float32(0.0), key))[0]

    return jax.jit(run)


def main(args: argparse.Namespace) -> None:
    logits = jax.random.normal(jax.random.key(0), (args.batch, args.vocab), jnp.float32) * 2.0
    key = jax.random.key(1)
    print(f"backend {jax.default_backend()}, devices {jax.devices()}; logits [{args.batch}, {args.vocab}]")
    for name, (top_k, top_p) in SETTINGS.items():
        medians = {}
        for search in (True, False):
            with mock.patch.object(sampling, "_search_thresholds", return_value=search):
                fn = step_loop(top_k, top_p, args.steps, args.temperature)
                jax.block_until_ready(fn(logits, key))  # compile with the choice in force
            jax.block_until_ready(fn(logits, key))  # one untimed run (the first run of a process is slower)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(logits, key))
                times.append((time.perf_counter() - start) / args.steps)
            medians[search] = statistics.median(times)
        print(
            f"{name:>22}: bisection {medians[True] * 1e3:8.3f} ms/step, sort {medians[False] * 1e3:8.3f} ms/step "
            f"(sort / bisection {medians[False] / medians[True]:.2f}x)"
        )


if __name__ == "__main__":
    main(parse_args())
