"""ppojax side of `bench_ppo.py`: one process, driven line by line over stdin (see `workload.TAG`).

    python experiments/bench/ppo_ppojax_worker.py --dir WORKLOAD_DIR --minibatches 1 [--devices 1]

Commands: `update` (one PPO update, timed per phase), `peak` (the matmul peak of this process's JAX
devices), `memory`, `quit`. A PPO update is the library's public pieces, each jitted, with a
`block_until_ready` after each so the phases can be timed apart:

    generate  `rollout_jit` (prefill + `lax.while_loop` decode; 32 tokens, no stop token)
    score     `score` (old log-probs, reference log-probs, critic values, reward-model scores), jitted;
              with `--old-logprobs rollout` the old log-probs are the sampling ones (TRL's choice)
    train     `train_on_batch` (TRL convention: shaped rewards, GAE, whitening, 4 epochs × minibatches of
              `update_step`, one AdamW over policy + critic = TRL's "joint" wrapper)

`collect` in `ppojax.train` is generate + score in one program; the split costs one extra dispatch.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload as wl


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="workload directory written by workload.build")
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="rows per forward/backward (gradient accumulation); 0: the minibatch"
    )
    parser.add_argument(
        "--old-logprobs",
        default="score",
        choices=("score", "rollout"),
        help="PPOConfig.old_logprobs (see ppojax.train)",
    )
    parser.add_argument("--devices", type=int, default=1, help="virtual CPU devices; the rows are split over them")
    parser.add_argument("--peak-size", type=int, default=2048, help="square matmul size for the peak")
    parser.add_argument("--bandwidth-mb", type=int, default=256, help="array size for the memory bandwidth")
    return parser.parse_args()


def set_devices(devices: int) -> None:
    """Split the CPU into `devices` single-threaded XLA devices (call before jax is imported)."""
    if devices > 1:
        flags = f"--xla_force_host_platform_device_count={devices} --xla_cpu_multi_thread_eigen=false"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    set_devices(ARGS.devices)

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import ppojax
from ppojax import parallel
from ppojax.memory import release_compiler_memory
from ppojax.train import Experience

release_compiler_memory()  # as the `ppojax` command does (no effect under the jemalloc the bench preloads)


def make_config(
    w: wl.Workload, minibatches: int, micro_batch: int = 0, old_logprobs: str = "score"
) -> ppojax.PPOConfig:
    """TRL 1.12's PPO with this workload's settings (no gradient clipping: TRL's PPO loop does none).
    old_logprobs "rollout" is TRL's own choice (the sampling log-probs; no teacher-forced policy pass)."""
    convention = ppojax.get_preset("trl").replace(
        kl_coef=w.kl_coef, gamma=w.gamma, lam=w.lam, clip_eps=w.clip, value_clip_eps=w.value_clip, vf_coef=w.vf_coef
    )
    return ppojax.PPOConfig(
        convention=convention,
        batch_size=w.batch_size,
        minibatch_size=w.batch_size // minibatches,
        micro_batch_size=micro_batch or None,
        ppo_epochs=w.ppo_epochs,
        max_new_tokens=w.new_tokens,
        temperature=w.temperature,
        stop_token_ids=(),
        pad_token_id=wl.PAD_ID,
        critic_mode="joint",
        old_logprobs=old_logprobs,
        policy_optimizer=ppojax.OptimizerConfig(learning_rate=w.learning_rate, max_grad_norm=None),
    )


def score_phase(state, prompt_ids, prompt_mask, sampled, ref_params, reward_params, *, config, models):
    """Experience of one rollout: `ppojax.score` plus the rollout's own fields (what `collect` builds)."""
    scores = ppojax.score(
        models.policy,
        state.policy,
        prompt_ids,
        prompt_mask,
        sampled.response_ids,
        sampled.response_mask,
        temperature=config.temperature,
        critic_model=models.critic,
        critic_params=state.critic,
        reward_model=models.reward,
        reward_params=reward_params,
        ref_params=ref_params,
        old_logprobs=sampled.logprobs if config.old_logprobs == "rollout" else None,
        value_mask=ppojax.masks_for(config.convention, sampled.response_mask)[1],
    )
    return Experience(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=sampled.response_ids,
        response_mask=sampled.response_mask,
        behaviour_logprobs=sampled.logprobs,
        logprobs=scores.logprobs,
        ref_logprobs=scores.ref_logprobs,
        values=scores.values,
        scores=scores.scores,
        stopped=sampled.stopped,
        lengths=sampled.lengths,
    )


def matmul_peak(w: wl.Workload, size: int, dtype=jnp.float32, repeats: int = 5) -> dict:
    """GFLOP/s of a [size, size] @ [size, size] matmul with the rows of A split over every device (so all
    cores work whether XLA runs one multi-threaded device or several single-threaded ones), and of the
    train step's largest matmul shape ([B·S, hidden] @ [hidden, intermediate]). Best of `repeats` each."""
    mesh = Mesh(np.array(jax.devices()), ("d",))
    rows, replicated = NamedSharding(mesh, P("d")), NamedSharding(mesh, P())
    matmul = jax.jit(jnp.matmul)
    out = {}
    shapes = {"square": (size, size, size)}
    if w.batch_size * w.sequence_length % len(jax.devices()) == 0:
        shapes["train_shape"] = (w.batch_size * w.sequence_length, w.hidden_size, w.intermediate_size)
    for name, (m, k, n) in shapes.items():
        a = jax.device_put(jnp.ones((m, k), dtype), rows)
        b = jax.device_put(jnp.ones((k, n), dtype), replicated)
        matmul(a, b).block_until_ready()
        best, cpu = float("inf"), []
        for _ in range(repeats):
            wall0, cpu0 = wl.process_times()
            matmul(a, b).block_until_ready()
            wall1, cpu1 = wl.process_times()
            best, cpu = min(best, wall1 - wall0), [*cpu, cpu1 - cpu0]
        out[name + "_gflops"] = 2.0 * m * k * n / best / 1e9
        # Per CPU-second (all threads): what a core delivers while it runs, which neighbours distort less.
        out[name + "_gflops_per_cpu_s"] = 2.0 * m * k * n / sorted(cpu)[len(cpu) // 2] / 1e9
    return out


def memory_bandwidth(megabytes: int, repeats: int = 5) -> dict:
    """GB/s of `x * 2` over a float32 array of `megabytes` (read + write counted), split over the devices."""
    mesh = Mesh(np.array(jax.devices()), ("d",))
    n = megabytes * 2**20 // 4 // len(jax.devices()) * len(jax.devices())
    x = jax.device_put(jnp.ones((n,), jnp.float32), NamedSharding(mesh, P("d")))
    double = jax.jit(lambda x: x * 2.0)
    double(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = wl.process_times()[0]
        double(x).block_until_ready()
        best = min(best, wl.process_times()[0] - start)
    return {"bandwidth_gbs": 2.0 * n * 4 / best / 1e9}


class Setup(NamedTuple):
    workload: wl.Workload
    state: ppojax.PPOState
    ref_params: dict
    reward_params: dict
    prompt_ids: jax.Array
    prompt_mask: jax.Array
    generate: Callable  # (policy params, prompt ids, prompt mask, key) -> Rollout
    score: Callable  # (state, prompt ids, prompt mask, rollout, ref params, reward params) -> Experience
    train: Callable  # (state, experience, ref params) -> (state, metrics)


def setup(directory: str, minibatches: int, micro_batch: int = 0, old_logprobs: str = "score") -> Setup:
    """Load the workload from `directory` and build the three jitted phases (rows split over the devices).

    On several devices the train phase is `parallel.sharded_ppo_phases`' `train_on_batch` on a data mesh: a plain
    `jax.jit` of `train_on_batch` given batch-sharded experience and replicated params did not keep the rows split
    (the minibatch gather let XLA replicate the computation: 2× the CPU time, measured 2026-11-21); the sharded
    entry point pins the activations to the batch split."""
    w, prompts = wl.load(directory)
    config = make_config(w, minibatches, micro_batch, old_logprobs)
    dtype = jnp.dtype(w.dtype)
    policy, params = ppojax.load_pretrained(os.path.join(directory, "policy"), head="lm", dtype=dtype)
    reward, reward_params = ppojax.load_pretrained(os.path.join(directory, "reward"), head="reward", dtype=dtype)
    key = jax.random.key(w.seed)
    state, models = ppojax.init_ppo_state(config, policy, params, key, reward_model=reward, reward_params=reward_params)
    ref_params = params
    prompt_ids, prompt_mask = ppojax.pad_prompts(prompts, wl.PAD_ID, bucket=w.prompt_max)
    if prompt_ids.shape != (w.batch_size, w.prompt_max):
        raise RuntimeError(f"prompts padded to {prompt_ids.shape}, expected {(w.batch_size, w.prompt_max)}")
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    layout = parallel.setup({"data": len(jax.devices())})[0] if len(jax.devices()) > 1 else None
    if layout is not None:
        prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), layout.batch)
        ref_params, reward_params = jax.device_put((ref_params, reward_params), layout.replicated)
        state = parallel.place(state, layout.ppo_state(state, config))
    generate = functools.partial(
        ppojax.rollout_jit,
        policy,
        max_new_tokens=w.new_tokens,
        temperature=w.temperature,
        stop_token_ids=(),
        pad_token_id=wl.PAD_ID,
    )
    score = jax.jit(functools.partial(score_phase, config=config, models=models))
    if layout is None:  # compiled ahead on the first update, as `make_ppo_iteration` does (see main)
        train = ppojax.train.CompiledAhead(
            jax.jit(functools.partial(ppojax.train_on_batch, config=config, models=models))
        )
    else:
        sharded_train = parallel.sharded_ppo_phases(config, models, layout, donate=False)[1]

        def train(state, experience, ref_params):
            return sharded_train(state, parallel.place(experience, layout.batch), ref_params)

    return Setup(w, state, ref_params, reward_params, prompt_ids, prompt_mask, generate, score, train)


def main() -> None:
    rss_start = wl.current_rss_mb()
    run = setup(ARGS.dir, ARGS.minibatches, ARGS.micro_batch, ARGS.old_logprobs)
    state, ref_params, reward_params = run.state, run.ref_params, run.reward_params
    prompt_ids, prompt_mask = run.prompt_ids, run.prompt_mask
    generate, score, train = run.generate, run.score, run.train
    wl.emit(
        {"ready": True, "rss_start_mb": rss_start, "rss_loaded_mb": wl.current_rss_mb(), "devices": len(jax.devices())}
    )

    while True:
        command = wl.read_command()
        if command == "update":
            key, sample_key = jax.random.split(state.key)
            state = state.replace(key=key)
            wall0, cpu0 = wl.process_times()
            if isinstance(train, ppojax.train.CompiledAhead) and not train.started:
                # The train program compiles in the background while generate and score compile and run.
                sampled_shape = jax.eval_shape(generate, state.policy, prompt_ids, prompt_mask, sample_key)
                experience_shape = jax.eval_shape(
                    score, state, prompt_ids, prompt_mask, sampled_shape, ref_params, reward_params
                )
                train.start(state, experience_shape, ref_params)
            sampled = jax.block_until_ready(generate(state.policy, prompt_ids, prompt_mask, sample_key))
            wall1, cpu1 = wl.process_times()
            experience = jax.block_until_ready(
                score(state, prompt_ids, prompt_mask, sampled, ref_params, reward_params)
            )
            wall2, cpu2 = wl.process_times()
            state, metrics = jax.block_until_ready(train(state, experience, ref_params))
            wall3, cpu3 = wl.process_times()
            times = {"generate": wall1 - wall0, "score": wall2 - wall1, "train": wall3 - wall2}
            cpu = {"generate": cpu1 - cpu0, "score": cpu2 - cpu1, "train": cpu3 - cpu2}
            wl.emit(
                {
                    "wall": times,
                    "cpu": cpu,
                    "response_tokens": int(np.asarray(experience.response_mask).sum()),
                    "first_ratio_max": float(metrics["policy/first_ratio_max"]),
                    "kl": float(metrics["objective/kl"]),
                    "updates": float(metrics["train/updates"]),
                }
            )
        elif command == "peak":
            peak = matmul_peak(run.workload, ARGS.peak_size, jnp.dtype(run.workload.dtype))
            wl.emit({**peak, **memory_bandwidth(ARGS.bandwidth_mb)})
        elif command == "memory":
            wl.emit({"peak_rss_mb": wl.peak_rss_mb(), "rss_mb": wl.current_rss_mb()})
        else:
            wl.emit({"bye": True})
            return


if __name__ == "__main__":
    main()
