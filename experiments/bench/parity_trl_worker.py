"""TRL 1.12 side of `parity_trl.py`: one unmodified `PPOTrainer` update on responses given by the coordinator.
Run it with the TRL virtual environment's python (the coordinator does):

    /work/venvs/trl/bin/python experiments/bench/parity_trl_worker.py --dir WORKLOAD_DIR --out OUT

Reads OUT/responses.npz (`prompt_ids` [B, P] left-padded, `response_ids` [B, N], pad after the stop token) and
replaces the module-level `batch_generation` of `trl.experimental.ppo.ppo_trainer` so that each query gets its
response (looked up by the prompt's ids: TRL's dataloader shuffles the prompts) and, as `generate` would return
them, the policy's logits at the sampling temperature (`logits / (T + 1e-7)`, TRL's generation temperature) from
TRL's own `forward`. Everything after that is TRL's code: truncation at the stop token, reference / value /
reward passes, rewards, GAE, whitening, 4 epochs of minibatch steps. Observed, not changed:
  - the whitened advantages (the first `masked_whiten` call; `whiten_rewards` is off) and the queries' order;
  - every optimizer step's gradient norms (policy, value model), and the first step's full gradients;
  - the weights after the update and the logged metrics.
Writes OUT/trl/{policy,value,grad_policy,grad_value}/ (Hugging Face directories: config.json + safetensors, so
ppojax's own loader maps the names), OUT/trl/captured.npz and OUT/trl/metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
import ppo_trl_worker as base
import torch
import workload as wl
from safetensors.torch import save_file
from trl.experimental.ppo import ppo_trainer as trl_ppo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, help="the workload directory")
    parser.add_argument("--out", required=True, help="holds responses.npz; results go to OUT/trl")
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the workload's")
    parser.add_argument("--micro-batch", type=int, default=0, help="rows per forward/backward (0: the minibatch)")
    parser.add_argument("--ref-dir", default=None, help="the reference policy (default: the workload's policy)")
    return parser.parse_args()


def prompt_key(ids) -> tuple[int, ...]:
    return tuple(int(t) for t in ids if int(t) != wl.PAD_ID)


def inject_responses(table: dict, captured: dict) -> None:
    """`batch_generation` returning the given responses and the policy's tempered logits on them."""

    def batch_generation(model, queries, local_rollout_forward_batch_size, pad_token_id, generation_config):
        responses = torch.as_tensor(np.stack([table[prompt_key(q.tolist())] for q in queries]))
        query_responses = torch.cat([queries, responses.to(queries.dtype)], 1)
        context = queries.shape[1]
        with torch.no_grad():
            logits = trl_ppo.forward(model, query_responses, pad_token_id).logits[:, context - 1 : -1]
        captured["queries"] = queries.numpy().copy()
        return query_responses, logits / generation_config.temperature

    trl_ppo.batch_generation = batch_generation


def replace_shuffle(data, captured: dict) -> None:
    """TRL's per-epoch `np.random.permutation` returns the coordinator's (ppojax's) permutations, mapped from
    its rows to TRL's (its dataloader shuffled the prompts; `captured["queries"]` has TRL's order)."""
    permutations = iter(data["permutations"])

    def permutation(n):
        ours = next(permutations)
        trl_row = {prompt_key(q): i for i, q in enumerate(captured["queries"])}
        mapped = np.array([trl_row[prompt_key(data["prompt_ids"][r])] for r in ours])
        if len(mapped) != n:
            raise SystemExit(f"permutation of {n} rows asked for; the coordinator's has {len(mapped)}")
        captured["permutations_used"] = captured.get("permutations_used", 0) + 1
        return mapped

    np.random.permutation = permutation


def capture_advantages(captured: dict) -> None:
    original = trl_ppo.masked_whiten

    def masked_whiten(values, mask, shift_mean=True):
        out = original(values, mask, shift_mean)
        captured.setdefault("advantages", out.detach().numpy().copy())
        return out

    trl_ppo.masked_whiten = masked_whiten


def split_named(named: dict, prefix: str) -> dict:
    return {name[len(prefix) :]: tensor for name, tensor in named.items() if name.startswith(prefix)}


def save_hf_tensors(directory: str, config_from: str, tensors: dict) -> None:
    """A directory ppojax's `load_pretrained` reads: the model's config.json and the tensors under HF names."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(config_from, "config.json"), os.path.join(directory, "config.json"))
    save_file({name: t.detach().contiguous().clone() for name, t in tensors.items()}, f"{directory}/model.safetensors")


def watch_optimizer(trainer, directory: str, out: str, steps: list) -> None:
    """Record each optimizer step's gradient norms (the steps accelerate really takes: see
    `ppo_trl_worker.on_optimizer_steps`); save the first step's gradients."""

    def record():
        grads = {name: p.grad for name, p in trainer.model.named_parameters() if p.grad is not None}
        policy, value = split_named(grads, "policy."), split_named(grads, "value_model.")
        steps.append(
            {
                "policy_norm": float(torch.sqrt(sum(torch.sum(g.double() ** 2) for g in policy.values()))),
                "value_norm": float(torch.sqrt(sum(torch.sum(g.double() ** 2) for g in value.values()))),
            }
        )
        if len(steps) == 1:
            save_hf_tensors(f"{out}/grad_policy", f"{directory}/policy", policy)
            save_hf_tensors(f"{out}/grad_value", f"{directory}/reward", value)

    base.on_optimizer_steps(trainer, record)


def main() -> None:
    args = parse_args()
    w, prompts = wl.load(args.dir)
    data = np.load(os.path.join(args.out, "responses.npz"))
    table = {prompt_key(p): r for p, r in zip(data["prompt_ids"], data["response_ids"])}
    if len(table) != len(prompts):
        raise SystemExit(f"{args.out}/responses.npz: {len(prompts)} prompts but {len(table)} distinct ones")
    out = os.path.join(args.out, "trl")
    os.makedirs(out, exist_ok=True)
    overrides = {"stop_token": "eos", "total_episodes": w.batch_size}
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    config = base.ppo_config(w, os.path.join(out, "trainer"), args.minibatches, args.micro_batch, 1, **overrides)
    trainer = base.make_trainer(args.dir, w, prompts, config, [], ref_dir=args.ref_dir)
    captured, steps = {}, []
    inject_responses(table, captured)
    replace_shuffle(data, captured)
    capture_advantages(captured)
    watch_optimizer(trainer, args.dir, out, steps)
    trainer.train()
    model = trainer.model
    save_hf_tensors(f"{out}/policy", f"{args.dir}/policy", dict(model.policy.named_parameters()))
    save_hf_tensors(f"{out}/value", f"{args.dir}/reward", dict(model.value_model.named_parameters()))
    np.savez(f"{out}/captured.npz", **captured)
    metrics = {k: v for k, v in trainer.state.log_history[-1].items() if isinstance(v, (int, float))}
    with open(f"{out}/metrics.json", "w") as f:
        json.dump({"metrics": metrics, "steps": steps}, f, indent=1)


if __name__ == "__main__":
    main()
