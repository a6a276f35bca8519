"""Reference outputs of TRL 0.9.6's PPOTrainer methods (what LLaMA-Factory's PPO runs) for the `llamafactory` preset.

LLaMA-Factory 0.9.x pins `trl>=0.8.6,<=0.9.6` and drives TRL's old `PPOTrainer.step` with its own settings:
`PPOConfig(mini_batch_size=per_device_train_batch_size, gradient_accumulation_steps=..., target=ppo_target,
use_score_scaling=use_score_norm=ppo_score_norm, whiten_rewards=ppo_whiten_rewards)` and TRL 0.x's defaults for
everything else (adaptive KL from 0.2, k1, γ 1, λ 0.95, clip 0.2, value clip 0.2, vf_coef 0.1, ratio_threshold
10). This script calls TRL 0.9.6's own methods — `compute_rewards`, `compute_advantages` (with and without
reward whitening), `loss` on the whole batch and on micro-batches of 2 rows as `step` accumulates them,
`record_step_stats`' `objective/kl` and `AdaptiveKLController.update` — on the batches of
`peer_conventions.make_inputs` and writes what they return to an .npz for tests/test_peer_conventions.py.
The methods only read `self.config`, `self.kl_ctl` and `self._kl_penalty`, so `self` is a namespace holding a
default `PPOConfig`.

Environment (outside the repo; trl 0.9.6 needs transformers < 4.47 and numpy < 2, so a venv of its own):

    python -m venv /work/venvs/trl09 && P=/work/venvs/trl09/bin
    $P/pip install torch==2.13.0
    $P/pip install trl==0.9.6 "transformers<4.47" accelerate "datasets<3" "pyarrow<18" rich
    PYTHONPATH=. $P/python experiments/parity/trl0_conventions.py --out tests/data/trl0_conventions.npz

`step` itself needs a model with a value head (and LLaMA-Factory's value head has dropout 0.1 active while
training, which ppojax does not reproduce); only its arithmetic is compared here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_conventions import B, CASES, T, make_inputs  # noqa: E402

MICRO = 2  # rows per micro-batch (LLaMA-Factory's per_device_train_batch_size) in the accumulated loss
VOCAB = 11


def trl0_outputs(d: dict[str, np.ndarray], case: int) -> dict[str, np.ndarray]:
    import torch
    from trl import PPOConfig, PPOTrainer
    from trl.core import stack_dicts
    from trl.trainer.utils import AdaptiveKLController

    t = {k: torch.tensor(v) for k, v in d.items()}
    mask = t["mask"]
    logits = torch.tensor(np.random.default_rng(2000 + case).normal(size=(B, T, VOCAB)), dtype=torch.float32)

    def fake_trainer(**config):
        trainer = types.SimpleNamespace(config=PPOConfig(**config), kl_ctl=types.SimpleNamespace(value=0.2))
        trainer._kl_penalty = types.MethodType(PPOTrainer._kl_penalty, trainer)
        return trainer

    trainer = fake_trainer()
    out = {}
    rewards, non_score, kls = PPOTrainer.compute_rewards(trainer, t["scores"], t["logprobs"], t["ref_logprobs"], mask)
    out["rewards"] = rewards
    _, out["advantages"], out["returns"] = PPOTrainer.compute_advantages(trainer, t["values"], rewards, mask)
    whitening = fake_trainer(whiten_rewards=True)
    _, out["advantages_whitened_rewards"], out["returns_whitened_rewards"] = PPOTrainer.compute_advantages(
        whitening, t["values"], rewards, mask
    )

    def loss(rows):
        pg, vf, stats = PPOTrainer.loss(
            trainer,
            t["logprobs"][rows],
            t["values"][rows],
            logits[rows],
            t["new_values"][rows],
            t["new_logprobs"][rows],
            mask[rows],
            out["advantages"][rows],
            out["returns"][rows],
        )
        return pg, vf, stats

    pg, vf, stats = loss(slice(None))
    out["pg_loss"], out["vf_loss_weighted"] = pg, vf  # loss() returns vf_coef · vf_loss
    out["clipfrac"], out["vf_clipfrac"] = stats["policy/clipfrac"], stats["val/clipfrac"]
    micro = [loss(slice(start, start + MICRO)) for start in range(0, B, MICRO)]
    # step(): each micro-batch backpropagates pg + vf_coef·vf; accelerate divides by the accumulation steps.
    out["micro_total_loss"] = torch.stack([p + v for p, v, _ in micro]).mean()
    out["micro_pg_losses"] = torch.stack([p for p, _, _ in micro])

    record = PPOTrainer.record_step_stats(
        trainer,
        kl_coef=0.2,
        scores=t["scores"],
        logprobs=t["logprobs"],
        ref_logprobs=t["ref_logprobs"],
        non_score_reward=non_score,
        train_stats=stack_dicts([stats]),
        masks=mask,
        queries=[torch.zeros(3)] * B,
        responses=[torch.zeros(2)] * B,
        kls=kls,
    )
    out["controller_kl"] = record["objective/kl"]
    controller = AdaptiveKLController(0.2, 6.0, 10000)
    controller.update(float(record["objective/kl"]), B)
    out["adaptive_coef_after"] = torch.tensor(controller.value)
    out["logits"] = logits
    return {k: torch.as_tensor(v).detach().numpy().astype(np.float32) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    records: dict[str, list] = {}
    for case in range(CASES):
        d = make_inputs(case)
        for prefix, values in {"in": d, "trl0": trl0_outputs(d, case)}.items():
            for k, v in values.items():
                records.setdefault(f"{prefix}/{k}", []).append(v)
    arrays = {k: np.stack(v) for k, v in records.items()}
    arrays["versions"] = np.array([f"{name} {importlib.metadata.version(name)}" for name in ("trl", "torch")])
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, {CASES} cases; {list(arrays['versions'])}")


if __name__ == "__main__":
    main()
