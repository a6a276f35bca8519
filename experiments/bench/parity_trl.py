"""Does ppojax's `trl` preset run TRL 1.12's PPO? One update of both on identical data, compared number by number.

    PYTHONPATH=. python experiments/bench/parity_trl.py [--workload cpu] [--trl-python /work/venvs/trl/bin/python]

The benchmark (`bench_ppo.py`) compares the two libraries' speed on the same workload; this script checks that
the work is the same algorithm. Both get the same prompts and the same responses (sampled once by ppojax's
rollout, then edited so that half of the rows stop: an EOS at a random position, pad after it, since rows that
stop are where the published PPO implementations differ: TRL's value mask is one slot longer than the policy
mask and its score sits in the slot after the EOS), and a reference policy that differs from the policy (its
tensors moved by 5 % of their std in noise, `--ref-noise`; with the policy as its own reference the KL terms would
all be 0 at the first update). TRL runs `PPOTrainer.train()` unmodified for one update
(`parity_trl_worker.py`, in its own venv); ppojax runs `score` and `train_on_batch` with the `trl` preset and the
workload's numbers (what `bench_ppo.py` runs). Compared:
  - the whitened advantages (TRL's first `masked_whiten`) on the policy mask;
  - the first optimizer step's gradients of every policy and value-model tensor (relative L2 error);
  - the weights after the update (4 epochs of `--minibatches` steps; TRL's minibatch shuffle returns ppojax's
    rows): the change of every tensor (relative L2 error);
  - the logged metrics, and the per-step gradient norms.
Negative controls: the same gradient comparison for conventions that differ in one detail (the `ppojax` preset's
masks and score slot; population-variance whitening; vf_coef 0.11; kl_coef 0.06), to show that the comparison
can tell them apart. `tests/test_trl_parity.py` runs it on the `tiny` workload (TRL from the test extra); the
figures on the benchmark workload are in BUILD_NOTES.md.

Why the responses are not TRL's own samples: the two libraries draw from different random streams; any fixed
token sequence is valid PPO data (the old log-probs are teacher-forced on both sides, so the first ratio is 1).
Sampled pad ids and EOS ids are replaced by id 2 first: TRL reads the first pad as the response's end and masks
pads out of attention, so a sampled pad id would change the data for TRL alone (with random weights ≈ 4 of the
2048 sampled tokens are pad ids in the benchmark's rollouts: a real, small difference of work there).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import jax
import jax.numpy as jnp
import numpy as np
import ppo_ppojax_worker as side
import workload as wl

import ppojax
from ppojax.train import critic_from_reward, minibatch_gradients, shuffle_minibatches, training_batch

# TRL metric name -> ppojax metric name (means over the optimizer steps on both sides).
METRICS = {
    "objective/kl": "objective/kl",
    "objective/scores": "objective/scores",
    "objective/rlhf_reward": "objective/rlhf_reward",
    "loss/policy_avg": "loss/policy",
    "loss/value_avg": "loss/value",
    "policy/clipfrac_avg": "policy/clipfrac",
    "val/clipfrac_avg": "value/clipfrac",
    "policy/approxkl_avg": "policy/approxkl",
    "val/ratio": "policy/ratio_mean",
}
# TRL averages these over every response slot, padding included (where its ratio is exp(0) = 1 and its
# log-ratio 0); ppojax over the policy mask. Equal only when no row stops.
PADDING_DILUTED = ("policy/approxkl_avg", "val/ratio")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cpu", choices=sorted(wl.WORKLOADS))
    parser.add_argument("--dir", default=None, help="an existing workload directory (default: build one)")
    parser.add_argument("--out", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--trl-python", default="/work/venvs/trl/bin/python")
    parser.add_argument("--stop-fraction", type=float, default=0.5, help="rows given an EOS at a random position")
    parser.add_argument("--learning-rate", type=float, default=None, help="both libraries (default: the workload's)")
    parser.add_argument(
        "--micro-batch", type=int, default=0, help="rows per forward/backward, both libraries (0: the whole batch)"
    )
    parser.add_argument(
        "--ref-noise",
        type=float,
        default=0.05,
        help="the reference policy = the policy with each tensor moved by this fraction of its std in Gaussian "
        "noise (both libraries), so the KL penalty is not 0; 0: the policy itself",
    )
    parser.add_argument(
        "--minibatches",
        type=int,
        default=1,
        help="optimizer steps per epoch, both libraries; TRL's minibatch shuffle is replaced by ppojax's permutations",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    return parser.parse_args(argv)


def make_responses(response_ids: np.ndarray, stop_fraction: float, seed: int) -> dict:
    """Sampled ids with pad / EOS ids replaced by 2, then an EOS at a random position in `stop_fraction` of
    the rows (pad after it). -> response ids, mask, lengths, stopped (numpy)."""
    rng = np.random.default_rng(seed)
    ids = np.where(np.isin(response_ids, (wl.PAD_ID, wl.EOS_ID)), 2, response_ids).astype(np.int32)
    rows, width = ids.shape
    lengths = np.full(rows, width, np.int32)
    stopped = rng.random(rows) < stop_fraction
    for row in np.flatnonzero(stopped):
        at = int(rng.integers(0, width - 1))  # the EOS never in the last slot: the +1 slot stays inside the width
        ids[row, at] = wl.EOS_ID
        ids[row, at + 1 :] = wl.PAD_ID
        lengths[row] = at + 1
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    return {"response_ids": ids, "response_mask": mask, "lengths": lengths, "stopped": stopped}


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))


def tree_errors(ours: dict, theirs: dict) -> dict:
    """Relative L2 error over all leaves together and the largest per-leaf one (leaf path -> error)."""
    a = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in jax.tree_util.tree_leaves_with_path(ours)}
    b = {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in jax.tree_util.tree_leaves_with_path(theirs)}
    if a.keys() != b.keys():
        raise RuntimeError(f"parameter trees differ: {sorted(a.keys() ^ b.keys())[:4]}")
    per_leaf = {k: relative_error(a[k], b[k]) for k in a}
    diff = np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a))
    norm = np.sqrt(sum(np.sum(b[k] ** 2) for k in a))
    worst = max(per_leaf, key=per_leaf.get)
    return {"all": float(diff / norm), "worst_leaf": worst, "worst": per_leaf[worst]}


def run_trl(args, directory: str, out: str) -> dict:
    command = [args.trl_python, os.path.join(HERE, "parity_trl_worker.py"), "--dir", directory, "--out", out]
    if args.learning_rate is not None:
        command += ["--learning-rate", str(args.learning_rate)]
    if args.micro_batch:
        command += ["--micro-batch", str(args.micro_batch)]
    command += ["--minibatches", str(args.minibatches)]
    if args.ref_noise:
        command += ["--ref-dir", os.path.join(out, "reference")]
    with open(os.path.join(out, "trl_worker.log"), "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"TRL worker failed (exit {done.returncode}); see {out}/trl_worker.log")
    with open(os.path.join(out, "trl", "metrics.json")) as f:
        result = json.load(f)
    captured = np.load(os.path.join(out, "trl", "captured.npz"))
    result.update(
        queries=captured["queries"],
        advantages=captured["advantages"],
        permutations_used=int(captured["permutations_used"]),
    )
    return result


def trl_tree(path: str, head: str) -> dict:
    """A TRL-side directory (weights or gradients under HF names) as a ppojax param tree (critic layout for the
    value model)."""
    model, params = ppojax.load_pretrained(path, head=head)
    return critic_from_reward(model, params)[1] if head == "reward" else params


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="ppojax_parity_")
    directory = args.dir or os.path.join(out, "workload")
    if args.dir is None:
        wl.build(wl.get(args.workload), directory)
    w, prompts = wl.load(directory)
    config = side.make_config(w, args.minibatches, args.micro_batch, "score")
    if args.learning_rate is not None:
        config = dataclasses.replace(
            config, policy_optimizer=dataclasses.replace(config.policy_optimizer, learning_rate=args.learning_rate)
        )
    config = dataclasses.replace(config, stop_token_ids=(wl.EOS_ID,))
    policy, params = ppojax.load_pretrained(os.path.join(directory, "policy"), head="lm")
    reward, reward_params = ppojax.load_pretrained(os.path.join(directory, "reward"), head="reward")
    state, models = ppojax.init_ppo_state(
        config, policy, params, jax.random.key(w.seed), reward_model=reward, reward_params=reward_params
    )
    prompt_ids, prompt_mask = (jnp.asarray(x) for x in ppojax.pad_prompts(prompts, wl.PAD_ID, bucket=w.prompt_max))
    ref_params = params
    if args.ref_noise:  # a reference that differs from the policy: the KL terms are then exercised too
        keys = iter(jax.random.split(jax.random.key(args.seed + 1), len(jax.tree.leaves(params))))
        ref_params = jax.tree.map(
            lambda x: x + args.ref_noise * jnp.std(x) * jax.random.normal(next(keys), x.shape, x.dtype), params
        )
        ppojax.save_pretrained(os.path.join(out, "reference"), policy, ref_params)

    # The data: one ppojax rollout, edited (see the module doc).
    sampled = ppojax.rollout_jit(
        policy,
        params,
        prompt_ids,
        prompt_mask,
        jax.random.key(args.seed),
        max_new_tokens=w.new_tokens,
        temperature=w.temperature,
        stop_token_ids=(),
        pad_token_id=wl.PAD_ID,
    )
    data = make_responses(np.asarray(sampled.response_ids), args.stop_fraction, args.seed)
    # The rows of each epoch's minibatches, as `train_on_batch` draws them from the state's key (the worker makes
    # TRL's `np.random.permutation` return these, mapped to its own row order).
    permutations = np.asarray(shuffle_minibatches(state.key, config)[1]).reshape(config.ppo_epochs, -1)
    np.savez(os.path.join(out, "responses.npz"), prompt_ids=np.asarray(prompt_ids), permutations=permutations, **data)
    rollout = ppojax.Rollout(
        response_ids=jnp.asarray(data["response_ids"]),
        response_mask=jnp.asarray(data["response_mask"]),
        logprobs=jnp.zeros(data["response_ids"].shape, jnp.float32),
        lengths=jnp.asarray(data["lengths"]),
        stopped=jnp.asarray(data["stopped"]),
    )
    trl = run_trl(args, directory, out)

    # ppojax on the same data: experience, advantages, first-step gradients, the update.
    experience = jax.jit(functools.partial(side.score_phase, config=config, models=models))(
        state, prompt_ids, prompt_mask, rollout, ref_params, reward_params
    )

    def gradients(convention):
        conv_config = dataclasses.replace(config, convention=convention)
        # Fixed β: the state's coefficient is the configured one, so each control's own kl_coef applies.
        adv, batch = training_batch(convention, experience, convention.kl_coef)
        first_rows = permutations[0][: config.minibatch_size]  # the first optimizer step's minibatch
        minibatch = jax.tree.map(lambda x: jnp.take(x, first_rows, axis=0), batch)
        step = jax.jit(functools.partial(minibatch_gradients, config=conv_config, models=models))
        _, grads = step(state, minibatch, ref_params)
        return adv, grads

    adv, (policy_grads, critic_grads) = gradients(config.convention)
    np.savez(
        os.path.join(out, "ppojax_experience.npz"),
        **{k: np.asarray(v) for k, v in dataclasses.asdict(experience).items()},
        advantages=np.asarray(adv.advantages),
        returns=np.asarray(adv.returns),
    )
    train = jax.jit(functools.partial(ppojax.train_on_batch, config=config, models=models))
    after, metrics = train(state, experience, ref_params)

    # Line TRL's rows up with ours (its dataloader shuffled the prompts).
    row_of = {tuple(int(t) for t in p if t != wl.PAD_ID): i for i, p in enumerate(np.asarray(prompt_ids))}
    order = np.array([row_of[tuple(int(t) for t in q if t != wl.PAD_ID)] for q in trl["queries"]])
    policy_mask = np.asarray(adv.policy_mask)[order] > 0
    ours_adv = np.asarray(adv.advantages)[order]
    results = {
        "workload": w.name,
        "micro_batch": args.micro_batch,
        "rows_stopped": int(data["stopped"].sum()),
        "ref_noise": args.ref_noise,
        "minibatches": args.minibatches,
        "trl_shuffles_replaced": trl["permutations_used"],
        "advantages_max_abs_diff": float(np.max(np.abs(ours_adv - trl["advantages"])[policy_mask])),
        "advantages_abs_max": float(np.max(np.abs(trl["advantages"][policy_mask]))),
        # objective/kl sums per row the differences of log-probs of magnitude ~log V: float32 resolves it only to
        # about eps32 × Σ_t (|log p| + |log p_ref|), whatever its own (small) size.
        "kl_resolution": float(
            np.finfo(np.float32).eps
            * np.mean(
                np.sum((np.abs(experience.logprobs) + np.abs(experience.ref_logprobs)) * experience.response_mask, 1)
            )
        ),
    }
    trl_grads = (trl_tree(f"{out}/trl/grad_policy", "lm"), trl_tree(f"{out}/trl/grad_value", "reward"))
    results["grad_policy"] = tree_errors(policy_grads, trl_grads[0])
    results["grad_critic"] = tree_errors(critic_grads, trl_grads[1])
    delta = lambda new, old: jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64), new, old)
    trl_policy, trl_critic = trl_tree(f"{out}/trl/policy", "lm"), trl_tree(f"{out}/trl/value", "reward")
    results["update_policy"] = tree_errors(delta(after.policy, state.policy), delta(trl_policy, state.policy))
    results["update_critic"] = tree_errors(delta(after.critic, state.critic), delta(trl_critic, state.critic))
    results["metrics"] = {
        name: {"trl": trl["metrics"].get(name), "ppojax": float(metrics[ours])} for name, ours in METRICS.items()
    }
    results["grad_norms"] = {
        "trl_policy_mean": float(np.mean([s["policy_norm"] for s in trl["steps"]])),
        "ppojax_policy_mean": float(metrics["grad/policy_norm"]),
        "trl_value_mean": float(np.mean([s["value_norm"] for s in trl["steps"]])),
        "ppojax_critic_mean": float(metrics["grad/critic_norm"]),
        "trl_steps": len(trl["steps"]),
        "ppojax_steps": float(metrics["train/updates"]),
    }
    controls = {
        "ppojax preset (value mask, score slot)": ppojax.get_preset("ppojax").replace(
            kl_coef=w.kl_coef, gamma=w.gamma, lam=w.lam, clip_eps=w.clip, value_clip_eps=w.value_clip, vf_coef=w.vf_coef
        ),
        "population-variance whitening": config.convention.replace(whiten_unbiased=False),
        "vf_coef 0.11": config.convention.replace(vf_coef=0.11),
        "kl_coef 0.06": config.convention.replace(kl_coef=0.06),
    }
    results["controls"] = {}
    for name, convention in controls.items():
        _, (p_grads, c_grads) = gradients(convention)
        results["controls"][name] = {
            "grad_policy": tree_errors(p_grads, trl_grads[0])["all"],
            "grad_critic": tree_errors(c_grads, trl_grads[1])["all"],
        }
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


def report(r: dict) -> None:
    print(
        f"# ppojax `trl` preset vs TRL 1.12 PPOTrainer, one update on identical data ({r['workload']} workload, "
        f"{r['rows_stopped']} rows stop at an EOS, reference = policy + {r['ref_noise']} std of noise, "
        f"{r['minibatches']} minibatch(es) per epoch)"
    )
    print(
        f"whitened advantages: max |diff| {r['advantages_max_abs_diff']:.2e} (max |advantage| "
        f"{r['advantages_abs_max']:.2f})"
    )
    print("\n| compared | relative L2 error, all tensors | worst tensor |")
    print("| --- | --- | --- |")
    for key, label in (
        ("grad_policy", "first-step gradient, policy"),
        ("grad_critic", "first-step gradient, critic"),
        ("update_policy", "weight change after the update, policy"),
        ("update_critic", "weight change after the update, critic"),
    ):
        e = r[key]
        print(f"| {label} | {e['all']:.2e} | {e['worst']:.2e} ({e['worst_leaf']}) |")
    print("\n| negative control (ppojax with one detail changed) | gradient error, policy | gradient error, critic |")
    print("| --- | --- | --- |")
    for name, e in r["controls"].items():
        print(f"| {name} | {e['grad_policy']:.2e} | {e['grad_critic']:.2e} |")
    print("\n| metric (TRL name) | TRL | ppojax |")
    print("| --- | --- | --- |")
    for name, v in r["metrics"].items():
        note = " (TRL averages over padding too)" if name in PADDING_DILUTED else ""
        print(f"| {name}{note} | {v['trl']:.6g} | {v['ppojax']:.6g} |")
    g = r["grad_norms"]
    print(
        f"\ngradient norm, mean over {g['trl_steps']} / {g['ppojax_steps']:.0f} steps: policy TRL "
        f"{g['trl_policy_mean']:.6g}, ppojax {g['ppojax_policy_mean']:.6g}; critic TRL {g['trl_value_mean']:.6g}, "
        f"ppojax {g['ppojax_critic_mean']:.6g}"
    )
    if g["trl_steps"] != g["ppojax_steps"]:
        print(
            f"TRL took {g['trl_steps']} optimizer steps, ppojax {g['ppojax_steps']:.0f}: with gradient accumulation "
            "TRL 1.12 steps after every micro-batch of the last batch of a pass over its dataloader (accelerate "
            "syncs the gradients at the end of a dataloader), and this workload's prompts are one batch, so the "
            "figures above do not compare like with like (BUILD_NOTES.md, Benchmarks)."
        )


if __name__ == "__main__":
    main()
