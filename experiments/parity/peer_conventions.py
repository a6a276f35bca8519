"""Reference outputs of OpenRLHF's and verl's own PPO functions on fixed inputs, for tests/test_peer_conventions.py.

ppojax's `openrlhf` and `verl` presets say they reproduce those systems' reward assembly, advantages, losses and
KL-controller input. tests/test_presets.py checks them against numpy transcriptions written from reading the
code; this script runs the code itself (OpenRLHF 0.11.2, verl 0.9.1, torch CPU) on a few hand-made batches and
writes everything it returns to an .npz that the test suite compares ppojax with (neither package can live in
ppojax's test environment: verl pins transformers < 5.11, OpenRLHF imports deepspeed, flash-attn and vLLM at
package import). Nothing of theirs is copied: the values are what their functions return.

Environment (outside the repo, commands as run on 2026-11-22; `--no-deps` because their full dependency sets
are GPU stacks; the listed packages are what the imported modules need):

    python -m venv /work/venvs/peers && P=/work/venvs/peers/bin
    $P/pip install torch==2.13.0 numpy
    $P/pip install --no-deps verl==0.9.1 openrlhf==0.11.2
    $P/pip install omegaconf packaging "ray==2.55.0" "tensordict>=0.8,<=0.10.0" "transformers>=5.5.3,<5.11,!=5.6.0" \
        codetiming orjson peft pylatexenc torchdata datasets pillow cachetools uvicorn fastapi matplotlib ipython
    PYTHONPATH=. $P/python experiments/parity/peer_conventions.py --out tests/data/peer_conventions.npz

OpenRLHF modules import `deepspeed` and `flash_attn` at the top for code this script never calls; empty stand-in
modules are registered under those names before the import (the functions used here are plain torch).

What is recorded (cases stacked on the first axis; B = 6 rows, T = 7 response slots):
- inputs: response mask (lengths 7, 3, 1, 5, 7, 2), sequence scores (some outside OpenRLHF's ±10 clip),
  rollout / reference / new log-probs, rollout / new values; padding holds finite junk (the peers multiply
  masks in, so NaN there would poison their outputs, not test ppojax's masking);
- OpenRLHF: `compute_approx_kl` for k1 / k2 / k3, then `RemoteExperienceMaker.compute_advantages_and_returns`
  (reward clip, `compute_reward`, `get_advantages_and_returns`, the batch normalisation) on its defaults,
  `PolicyLoss` (with and without dual clip), `ValueLoss(0.5)`, and the KL its controller is given (the
  experience's per-sequence `kl` info averaged over samples, as `ppo_trainer` does);
- verl: the score at the last attention-mask position of the response, `core_algos.kl_penalty` for each
  estimator, `ray_trainer.apply_kl_penalty` (β 0.001, fixed and adaptive controllers), GAE with and without
  the KL reward, `compute_policy_loss_vanilla`, `compute_value_loss`, `agg_loss` in four modes.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import types

import numpy as np

B, T = 6, 7
LENGTHS = np.array([7, 3, 1, 5, 7, 2])
CASES = 4


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for `ROOTS` and their submodules; any attribute is a placeholder class."""

    ROOTS = ("deepspeed", "flash_attn", "vllm")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.ROOTS:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: type(attr, (), {}) if not attr.startswith("__") else None
        return module

    def exec_module(self, module):
        pass


def _register_stand_ins() -> None:
    """OpenRLHF imports deepspeed, flash-attn and vLLM at module level for code paths not used here."""
    sys.meta_path.insert(0, _StandIns())


def make_inputs(case: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + case)
    mask = np.arange(T)[None] < LENGTHS[:, None]
    junk = rng.uniform(-3.0, 3.0, size=(B, T))

    def masked(x):
        return np.where(mask, x, junk).astype(np.float32)

    logprobs = rng.normal(size=(B, T)) * 0.5 - 1.5
    new_logprobs = logprobs + rng.normal(size=(B, T)) * 0.3
    if case == 1:  # beyond the ±20 log-ratio clamp on valid tokens (advantages of both signs among them)
        for row, col, shift in ((0, 1, 25.0), (0, 4, 25.0), (4, 6, 23.0), (4, 0, -22.0)):  # rows 0, 4 only
            new_logprobs[row, col] = logprobs[row, col] + shift
    scores = rng.normal(size=B) * 3.0
    scores[case % B] = 12.0 * (-1.0) ** case  # outside OpenRLHF's ±10 reward clip
    return dict(
        mask=mask.astype(np.float32),
        scores=scores.astype(np.float32),
        logprobs=masked(logprobs),
        ref_logprobs=masked(logprobs + rng.normal(size=(B, T)) * 0.3),
        values=masked(rng.normal(size=(B, T))),
        new_logprobs=masked(new_logprobs),
        new_values=masked(rng.normal(size=(B, T))),
        loss_mat=rng.normal(size=(B, T)).astype(np.float32),
    )


def openrlhf_outputs(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch
    from openrlhf.models.loss import PolicyLoss, ValueLoss
    from openrlhf.models.utils import compute_approx_kl, masked_mean
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker

    t = {k: torch.tensor(v) for k, v in d.items()}
    mask = t["mask"]
    out = {}
    for estimator in ("k1", "k2", "k3"):
        out[f"kl_{estimator}"] = compute_approx_kl(t["logprobs"], t["ref_logprobs"], kl_estimator=estimator)

    # The trainer's own advantage pass, on its CLI defaults (train_ppo_ray.py): init_coef 0.01, k1, reward clip
    # (-10, 10), gamma 1, lambd 1, one sample per prompt, normalisation on.
    kl = out["kl_k1"]
    experience = types.SimpleNamespace(
        rewards=t["scores"].clone(),
        index=list(range(B)),
        kl=kl,
        action_mask=mask,
        values=t["values"],
        info={},
        response_length=mask.sum(-1),
    )
    args = types.SimpleNamespace(
        rollout=types.SimpleNamespace(n_samples_per_prompt=1),
        reward=types.SimpleNamespace(clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None),
        algo=types.SimpleNamespace(
            advantage=types.SimpleNamespace(estimator="gae", gamma=1.0, lambd=1.0, no_std_norm=False)
        ),
    )
    maker = types.SimpleNamespace(
        strategy=types.SimpleNamespace(args=args),
        kl_ctl=types.SimpleNamespace(value=0.01),
        advantage_estimator="gae",
    )
    maker.get_advantages_and_returns = types.MethodType(RemoteExperienceMaker.get_advantages_and_returns, maker)
    (experience,) = RemoteExperienceMaker.compute_advantages_and_returns(maker, [experience])
    out["advantages"], out["returns"] = experience.advantages, experience.returns
    # The shaped rewards themselves (compute_reward as the pass above calls it) for a direct comparison.
    from openrlhf.models.utils import compute_reward

    out["rewards"] = compute_reward(t["scores"], 0.01, kl, action_mask=mask, reward_clip_range=(-10, 10))

    loss, clip_ratio, ppo_kl, _, _ = PolicyLoss(0.2, 0.2)(t["new_logprobs"], t["logprobs"], out["advantages"], mask)
    out["pg_loss"], out["clipfrac"], out["ppo_kl"] = loss, clip_ratio, ppo_kl
    out["pg_loss_dual_clip"] = PolicyLoss(0.2, 0.2, dual_clip=3.0)(
        t["new_logprobs"], t["logprobs"], out["advantages"], mask
    )[0]
    out["vf_loss"] = ValueLoss(0.5)(t["new_values"], t["values"], out["returns"], mask)
    # What ppo_trainer feeds kl_ctl.update: the experience's info["kl"] (per-sequence masked mean) weighted
    # by samples in ppo_actor's status reduction.
    out["controller_kl"] = masked_mean(kl, mask, dim=-1).mean()
    return {k: v.detach().numpy().astype(np.float32) for k, v in out.items()}


def verl_outputs(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import torch
    from verl import DataProto
    from verl.trainer.ppo import core_algos
    from verl.trainer.ppo.ray_trainer import apply_kl_penalty
    from verl.workers.config import ActorConfig

    t = {k: torch.tensor(v) for k, v in d.items()}
    mask = t["mask"]
    out = {}
    # The reward model's score goes at the last attention-mask position of the response (agent_loop: rm_scores
    # at attention_mask[:, prompt_length:].sum(1) - 1), zeros elsewhere.
    scores = torch.zeros((B, T))
    scores[torch.arange(B), mask.sum(1).long() - 1] = t["scores"]
    out["token_level_scores"] = scores
    for estimator in ("kl", "abs", "mse", "low_var_kl"):
        out[f"kl_{estimator}"] = core_algos.kl_penalty(t["logprobs"], t["ref_logprobs"], kl_penalty=estimator)

    def with_kl(controller):
        data = DataProto.from_dict(
            tensors=dict(
                response_mask=mask,
                token_level_scores=scores,
                old_log_probs=t["logprobs"],
                ref_log_prob=t["ref_logprobs"],
            )
        )
        data, metrics = apply_kl_penalty(data, controller, kl_penalty="kl")
        return data.batch["token_level_rewards"], metrics

    out["rewards_kl"], metrics = with_kl(core_algos.FixedKLController(0.001))
    out["controller_kl"] = torch.tensor(metrics["actor/reward_kl_penalty"])
    adaptive = core_algos.AdaptiveKLController(init_kl_coef=0.001, target_kl=6.0, horizon=10000)
    with_kl(adaptive)
    out["adaptive_coef_after"] = torch.tensor(adaptive.value)

    out["advantages"], out["returns"] = core_algos.compute_gae_advantage_return(scores, t["values"], mask, 1.0, 1.0)
    out["advantages_kl"], out["returns_kl"] = core_algos.compute_gae_advantage_return(
        out["rewards_kl"], t["values"], mask, 1.0, 1.0
    )
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=B, clip_ratio=0.2, clip_ratio_c=3.0)
    out["pg_loss"], pg_metrics = core_algos.compute_policy_loss_vanilla(
        t["logprobs"], t["new_logprobs"], out["advantages"], mask, loss_agg_mode="token-mean", config=config
    )
    out["clipfrac"] = torch.tensor(pg_metrics["actor/pg_clipfrac"])
    out["dual_clipfrac"] = torch.tensor(pg_metrics["actor/pg_clipfrac_lower"])
    out["vf_loss"], out["vf_clipfrac"] = core_algos.compute_value_loss(
        t["new_values"], out["returns"], t["values"], mask, cliprange_value=0.5, loss_agg_mode="token-mean"
    )
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out[f"agg_{mode}"] = core_algos.agg_loss(t["loss_mat"], mask, loss_agg_mode=mode)
    return {k: torch.as_tensor(v).detach().numpy().astype(np.float32) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    _register_stand_ins()
    records: dict[str, list] = {}
    for case in range(CASES):
        d = make_inputs(case)
        parts = {"in": d, "openrlhf": openrlhf_outputs(d), "verl": verl_outputs(d)}
        for prefix, values in parts.items():
            for k, v in values.items():
                records.setdefault(f"{prefix}/{k}", []).append(v)
    arrays = {k: np.stack(v) for k, v in records.items()}
    arrays["versions"] = np.array(
        [f"{name} {importlib.metadata.version(name)}" for name in ("openrlhf", "verl", "torch")]
    )
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, {CASES} cases; {list(arrays['versions'])}")


if __name__ == "__main__":
    main()
