"""TRL 1.12 side of `bench_ppo.py`: runs `trl.experimental.ppo.PPOTrainer.train()` unmodified, one update
per `update` command on stdin (see `workload.TAG`). Run it with the TRL virtual environment's python:

    /work/venvs/trl/bin/python experiments/bench/ppo_trl_worker.py --dir WORKLOAD_DIR --minibatches 1 --updates 12

The trainer's own loop does the work; the worker only observes it:
  - a `TrainerCallback` blocks in `on_train_begin` and `on_step_end` until the coordinator sends the next
    command, and reports the finished update's timings there (so the two libraries' updates interleave);
  - the module-level `batch_generation` and `forward` of `trl.experimental.ppo.ppo_trainer` are wrapped to
    time-stamp the phase boundaries: generate = update start → end of `batch_generation` (includes the
    dataloader's next batch and the previous update's trailing `gc.collect()`); score = → the first training
    `forward` of the policy-and-value wrapper (reference, critic and reward passes, rewards, GAE, whitening);
    train = → `on_step_end` (epochs × minibatches of forward, backward, AdamW step, then the metrics).

TRL quirks handled (issue 9): `bf16=False` (TRL's default is True), pad (0) ≠ EOS (1), numpy's global
generator seeded (the minibatch shuffle uses `np.random.permutation`), the value model loaded from the
reward model's directory, no stop token (generation always runs `response_length` tokens), no sample
generations, no checkpoints. Also `commands`: `peak` (torch matmul GFLOP/s), `memory`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import torch
import transformers
import workload as wl
from datasets import Dataset
from trl.experimental.ppo import PPOConfig, PPOTrainer
from trl.experimental.ppo import ppo_trainer as trl_ppo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="rows per forward/backward (gradient accumulation); 0: the minibatch"
    )
    parser.add_argument("--updates", type=int, required=True, help="updates the coordinator will ask for")
    parser.add_argument("--output-dir", default=None, help="TRL output_dir (default: WORKLOAD_DIR/trl_out)")
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    return parser.parse_args()


class Clock:
    """Phase boundaries of the current update (perf_counter seconds) and CPU time."""

    def __init__(self, trainer_model_ref):
        self.trainer_model_ref = trainer_model_ref
        self.reset()

    def reset(self):
        self.start, self.start_cpu = wl.process_times()
        self.generated = self.train_start = self.rows = None
        self.optimizer_steps = 0
        self.cpu_generated = self.cpu_train_start = None


CLOCK: Clock = None  # set in main


def trl_batch_settings(batch: int, minibatches: int, micro_batch: int = 0) -> dict:
    """TRL 1.12's batch arguments for `batch` prompts per update, `minibatches` optimizer steps per epoch and
    `micro_batch` rows per forward/backward (0: the whole minibatch).

    TRL 1.12 takes the rollout batch as `per_device_train_batch_size × gradient_accumulation_steps` (no
    `num_mini_batches` factor), splits it into `num_mini_batches` minibatches, walks each in slices of
    `per_device_train_batch_size` rows, and lets accelerate step the optimizer every `gradient_accumulation_steps`
    slices. So M minibatches of batch / M rows each with one optimizer step are `per_device = batch`,
    accumulation 1, `num_mini_batches = M` (the slice then takes the whole minibatch); micro-batches of m rows are
    `per_device = m`, accumulation `batch / m`, and only with one minibatch (with several, accelerate would step
    once per `batch / m` slices, i.e. once per epoch). Until 2026-11-21 the bench passed `per_device = batch / M`,
    accumulation 1: with M = 4 TRL then trained (and generated) 16 prompts per update, not 64."""
    minibatch = batch // minibatches
    if micro_batch in (0, minibatch):
        return {"per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "num_mini_batches": minibatches}
    if minibatches != 1 or batch % micro_batch:
        raise SystemExit(
            f"TRL 1.12 cannot run micro-batches of {micro_batch} rows with {minibatches} minibatches of {minibatch}: "
            "its optimizer steps every batch / micro_batch slices; use --micro-batch with --minibatches 1"
        )
    return {
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": batch // micro_batch,
        "num_mini_batches": 1,
    }


def wrap_phases() -> None:
    original_generation, original_forward = trl_ppo.batch_generation, trl_ppo.forward

    def batch_generation(model, queries, *args, **kwargs):
        out = original_generation(model, queries, *args, **kwargs)
        CLOCK.rows = int(queries.shape[0])
        CLOCK.generated, CLOCK.cpu_generated = wl.process_times()
        return out

    def forward(model, *args, **kwargs):
        if CLOCK.train_start is None and model is CLOCK.trainer_model_ref():
            CLOCK.train_start, CLOCK.cpu_train_start = wl.process_times()
        return original_forward(model, *args, **kwargs)

    trl_ppo.batch_generation, trl_ppo.forward = batch_generation, forward


def on_optimizer_steps(trainer, callback) -> None:
    """Call `callback()` before each optimizer step the trainer really takes. TRL calls `optimizer.step()` after
    every micro-batch; accelerate steps only when the gradients sync, which is every `gradient_accumulation_steps`
    calls, or every call while the dataloader sits at its last batch (TRL 1.12 trains there: with this workload's
    one batch of prompts, every micro-batch is an optimizer step)."""
    optimizer = trainer.optimizer
    original = optimizer.step

    def step(*args, **kwargs):
        if trainer.accelerator.sync_gradients:
            callback()
        return original(*args, **kwargs)

    optimizer.step = step


def matmul_peak(size: int, dtype) -> dict:
    a, b = torch.ones(size, size, dtype=dtype), torch.ones(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        start = wl.process_times()[0]
        a @ b
        best = min(best, wl.process_times()[0] - start)
    return {"square_gflops": 2.0 * size**3 / best / 1e9}


def serve_until_update(args, dtype) -> None:
    """Answer commands until `update` (then return, and the trainer runs one update)."""
    while True:
        command = wl.read_command()
        if command == "update":
            CLOCK.reset()
            return
        if command == "peak":
            wl.emit(matmul_peak(args.peak_size, dtype))
        elif command == "memory":
            wl.emit({"peak_rss_mb": wl.peak_rss_mb(), "rss_mb": wl.current_rss_mb()})
        else:
            wl.emit({"bye": True})
            os._exit(0)


class Interleave(transformers.TrainerCallback):
    def __init__(self, args, dtype):
        self.args, self.dtype = args, dtype

    def on_train_begin(self, args, state, control, **kwargs):
        wl.emit({"ready": True, "rss_loaded_mb": wl.current_rss_mb(), "torch_threads": torch.get_num_threads()})
        serve_until_update(self.args, self.dtype)

    def on_step_end(self, args, state, control, **kwargs):
        end, end_cpu = wl.process_times()
        c = CLOCK
        wl.emit(
            {
                "wall": {
                    "generate": c.generated - c.start,
                    "score": c.train_start - c.generated,
                    "train": end - c.train_start,
                },
                "cpu": {
                    "generate": c.cpu_generated - c.start_cpu,
                    "score": c.cpu_train_start - c.cpu_generated,
                    "train": end_cpu - c.cpu_train_start,
                },
                "kl": state.log_history[-1].get("objective/kl") if state.log_history else None,
                "rows": c.rows,
                "optimizer_steps": c.optimizer_steps,
            }
        )
        serve_until_update(self.args, self.dtype)


def ppo_config(w: wl.Workload, output_dir: str, minibatches: int, micro_batch: int, updates: int, **overrides):
    """TRL 1.12's `PPOConfig` for the workload `w` (the quirks above); `overrides` replace any field."""
    fields = dict(
        output_dir=output_dir,
        **trl_batch_settings(w.batch_size, minibatches, micro_batch),
        local_rollout_forward_batch_size=w.batch_size,
        total_episodes=w.batch_size * updates,
        num_ppo_epochs=w.ppo_epochs,
        response_length=w.new_tokens,
        temperature=w.temperature,
        stop_token=None,
        missing_eos_penalty=None,
        kl_coef=w.kl_coef,
        kl_estimator="k1",
        gamma=w.gamma,
        lam=w.lam,
        cliprange=w.clip,
        cliprange_value=w.value_clip,
        vf_coef=w.vf_coef,
        whiten_rewards=False,
        learning_rate=w.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        bf16=w.dtype == "bfloat16",
        fp16=False,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=w.seed,
        dataloader_num_workers=0,
    )
    return PPOConfig(**{**fields, **overrides})


def make_trainer(directory: str, w: wl.Workload, prompts, config, callbacks, ref_dir: str | None = None) -> PPOTrainer:
    """A `PPOTrainer` on the workload in `directory`: policy and reference from policy/ (the reference from
    `ref_dir` if given), value and reward models from reward/ (TRL's convention), the tokenizer with left
    padding; numpy's and torch's generators seeded."""
    dtype = getattr(torch, w.dtype)
    np.random.seed(w.seed)
    torch.manual_seed(w.seed)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
        os.path.join(directory, "tokenizer"), padding_side="left"
    )
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (wl.PAD_ID, wl.EOS_ID), "pad / eos ids"
    policy_dir, reward_dir = os.path.join(directory, "policy"), os.path.join(directory, "reward")
    load = {"dtype": dtype}
    policy = transformers.AutoModelForCausalLM.from_pretrained(policy_dir, **load)
    ref_policy = transformers.AutoModelForCausalLM.from_pretrained(ref_dir or policy_dir, **load)
    value_model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, **load)
    reward_model = transformers.AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1, **load)
    dataset = Dataset.from_dict({"input_ids": prompts})
    return PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_policy,
        reward_model=reward_model,
        train_dataset=dataset,
        value_model=value_model,
        eval_dataset=dataset,
        callbacks=callbacks,
    )


def main() -> None:
    global CLOCK
    args = parse_args()
    w, prompts = wl.load(args.dir)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    dtype = getattr(torch, w.dtype)
    output_dir = args.output_dir or os.path.join(args.dir, "trl_out")
    config = ppo_config(w, output_dir, args.minibatches, args.micro_batch, args.updates)
    trainer = make_trainer(args.dir, w, prompts, config, [Interleave(args, dtype)])
    CLOCK = Clock(lambda: trainer.model)
    wrap_phases()

    def count_step():
        CLOCK.optimizer_steps += 1

    on_optimizer_steps(trainer, count_step)
    trainer.train()
    serve_until_update(args, dtype)  # peak / memory / quit after the last update
    wl.emit({"error": "more updates asked for than --updates"})


if __name__ == "__main__":
    main()
