"""Reward-model over-optimisation on the demo's synthetic task (after Gao et al. 2022, "Scaling laws for reward
model over-optimization"): gold and proxy reward against √KL(policy ‖ SFT) over PPO training, for several KL
coefficients β, each with several seeds; and the length drift PPO shows against a reward model trained on
length-biased preference labels.

Every (β, seed) replica runs in ONE jitted program: `jax.vmap` of `ppojax.train.ppo_iteration` over the
`PPOState` (each replica its own PRNG key and its own β in the fixed KL controller's state) and over the prompt
batches. The SFT and reward models are trained once per reward-model kind by `ppojax demo`'s stages (reused on
later runs with the same settings).

    PYTHONPATH=. python experiments/overoptimization/sweep.py --out /tmp/overopt            # the study
    PYTHONPATH=. python experiments/overoptimization/sweep.py --out /tmp/overopt --fast     # a smoke run

Writes <out>/overoptimization.json (per β, seed and logged iteration: √KL, gold, proxy, length) and
<out>/overoptimization.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from ppojax import demo, diagnostics
from ppojax.data import load_tokenizer
from ppojax.models import load_pretrained
from ppojax.optim import OptimizerConfig
from ppojax.presets import get_preset
from ppojax.train import PPOConfig, SequenceBatch, fit_reward_normalisation, init_ppo_state, ppo_iteration


def prepare(out: str, cfg: demo.DemoConfig, progress: bool, sft_from: str | None = None) -> None:
    """Data, SFT, pairs and RM for `cfg` in `out` (kept when already there with the same settings). The SFT stage
    of `sft_from` is copied when its settings match (the length-biased RM differs from the unbiased one only in its
    preference labels)."""
    if demo._reusable(os.path.join(out, "rm"), cfg, "rm"):
        return
    if sft_from and demo._reusable(os.path.join(sft_from, "sft"), cfg, "sft"):
        for name in ("data", "init", "sft"):
            shutil.copytree(os.path.join(sft_from, name), os.path.join(out, name), dirs_exist_ok=True)
    demo.run(out, cfg, progress=progress, reuse=True, until_rm=True)


def sweep(out: str, cfg: demo.DemoConfig, betas, seeds: int, iterations: int, log_every: int) -> dict:
    """PPO replicas (β × seed) in one vmapped program; returns per-replica curves."""
    vocab = demo.Vocabulary(load_tokenizer(os.path.join(out, "sft")))
    policy, sft_params = load_pretrained(os.path.join(out, "sft"), head="lm")
    reward, reward_params = load_pretrained(os.path.join(out, "rm"), head="reward")
    prompts = demo.read_prompts(os.path.join(out, "data", "prompts.jsonl"))
    ids, mask = vocab.encode(prompts)

    # score normalisation on SFT samples, as in the demo
    sample = demo.sample_responses(
        vocab, policy, sft_params, prompts[: cfg.eval_batch], jax.random.PRNGKey(99), cfg=cfg
    )
    gain, bias = fit_reward_normalisation(
        reward,
        reward_params,
        SequenceBatch(sample["prompt_ids"], sample["prompt_mask"], sample["response_ids"], sample["response_mask"]),
    )
    config = PPOConfig(
        convention=dataclasses.replace(get_preset(cfg.preset), adaptive_kl=False),
        batch_size=cfg.ppo_batch,
        minibatch_size=cfg.ppo_minibatch,
        ppo_epochs=cfg.ppo_epochs,
        max_new_tokens=cfg.max_new_tokens,
        stop_token_ids=(vocab.eos_id,),
        pad_token_id=vocab.pad_id,
        policy_optimizer=OptimizerConfig(learning_rate=cfg.policy_lr),
        critic_optimizer=OptimizerConfig(learning_rate=cfg.critic_lr),
        reward_gain=gain,
        reward_bias=bias,
    )
    state, models = init_ppo_state(
        config, policy, sft_params, jax.random.PRNGKey(0), reward_model=reward, reward_params=reward_params
    )
    replicas = [(b, s) for b in betas for s in range(seeds)]
    n = len(replicas)
    keys = jax.vmap(lambda s: jax.random.PRNGKey(cfg.seed * 1000 + s))(jnp.arange(n))
    coefs = jnp.asarray([b for b, _ in replicas], jnp.float32)
    states = jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), state)
    states = states.replace(key=keys, kl=states.kl._replace(coef=coefs))
    step = jax.jit(
        jax.vmap(functools.partial(ppo_iteration, config=config, models=models), in_axes=(0, 0, None, None)),
        donate_argnums=0,
    )
    rng = np.random.default_rng(cfg.seed)
    curves = [
        {"beta": b, "seed": s, "iteration": [], "sqrt_kl": [], "gold": [], "proxy": [], "length": []}
        for b, s in replicas
    ]
    start = time.time()
    for it in range(1, iterations + 1):
        rows = np.stack([rng.choice(len(prompts), cfg.ppo_batch, replace=False) for _ in range(n)])
        states, metrics, exp = step(states, (ids[rows], mask[rows]), sft_params, reward_params)
        if it % log_every and it != iterations and it != 1:
            continue
        metrics, exp = jax.device_get((metrics, exp))
        for r in range(n):
            gold = vocab.gold(exp.prompt_ids[r], exp.prompt_mask[r], exp.response_ids[r], exp.response_mask[r])
            c = curves[r]
            c["iteration"].append(it)
            c["sqrt_kl"].append(float(np.sqrt(max(metrics["objective/kl"][r], 0.0))))
            c["gold"].append(float(gold.mean()))
            c["proxy"].append(float(exp.scores[r].mean()))
            c["length"].append(float(exp.response_mask[r].sum(1).mean()))
            c.setdefault("proxy_gold_corr", []).append(float(diagnostics.correlation(exp.scores[r], gold)))
        print(
            f"iteration {it:4d}  ({time.time() - start:6.0f} s)  "
            + "  ".join(
                f"β={b}: gold {np.mean([c['gold'][-1] for c in curves if c['beta'] == b]):+.2f} "
                f"√KL {np.mean([c['sqrt_kl'][-1] for c in curves if c['beta'] == b]):.2f}"
                for b in betas
            ),
            flush=True,
        )
    return {"replicas": curves, "gain": gain, "bias": bias, "seconds": time.time() - start}


def summarise(curves: list, betas) -> dict:
    """Mean and standard deviation over seeds of the last logged point, per β."""
    out = {}
    for b in betas:
        last = [c for c in curves if c["beta"] == b]
        out[str(b)] = {
            key: {"mean": float(np.mean([c[key][-1] for c in last])), "std": float(np.std([c[key][-1] for c in last]))}
            for key in ("sqrt_kl", "gold", "proxy", "length")
        }
    return out


def plot(path: str, results: dict, betas) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 3.8), dpi=90)
    ax_gold, ax_proxy, ax_len = (figure.add_subplot(1, 3, i + 1) for i in range(3))
    for i, b in enumerate(betas):
        runs = [c for c in results["unbiased"]["replicas"] if c["beta"] == b]
        x = np.mean([c["sqrt_kl"] for c in runs], 0)
        for axes, key in ((ax_gold, "gold"), (ax_proxy, "proxy")):
            y = np.array([c[key] for c in runs])
            axes.plot(x, y.mean(0), color=f"C{i}", marker=".", label=f"β={b}")
            axes.fill_between(x, y.mean(0) - y.std(0), y.mean(0) + y.std(0), color=f"C{i}", alpha=0.2)
    ax_gold.set_title("gold reward vs √KL (mean ± std over seeds)", fontsize=10)
    ax_proxy.set_title("proxy (RM) reward vs √KL", fontsize=10)
    for axes in (ax_gold, ax_proxy):
        axes.set_xlabel("√KL(policy ‖ SFT)  (√nats)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    for name, style in (("unbiased", "-"), ("length_biased", "--")):
        if name not in results:
            continue
        b = min(betas)
        runs = [c for c in results[name]["replicas"] if c["beta"] == b]
        it = runs[0]["iteration"]
        y = np.array([c["length"] for c in runs])
        ax_len.plot(it, y.mean(0), style, label=f"{name.replace('_', '-')} RM, β={b}")
        ax_len.fill_between(it, y.mean(0) - y.std(0), y.mean(0) + y.std(0), alpha=0.2)
    ax_len.set_title("response length over PPO", fontsize=10)
    ax_len.set_xlabel("PPO iteration")
    ax_len.set_ylabel("tokens")
    ax_len.grid(alpha=0.3)
    ax_len.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.2])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument(
        "--batch", type=int, default=None, help="prompts per iteration per replica (default: the demo's)"
    )
    parser.add_argument("--length-bias", type=float, default=0.3, help="per token, for the length-biased RM")
    parser.add_argument("--no-length", action="store_true", help="skip the length-biased reward model")
    args = parser.parse_args(argv)
    base = demo.FAST if args.fast else demo.DemoConfig()
    if args.batch:
        base = base.replace(ppo_batch=args.batch)
    results = {}
    for name, cfg in (("unbiased", base), ("length_biased", base.replace(length_bias=args.length_bias))):
        if name == "length_biased" and args.no_length:
            continue
        directory = os.path.join(args.out, name)
        prepare(directory, cfg, progress=False, sft_from=os.path.join(args.out, "unbiased"))
        betas = args.betas if name == "unbiased" else [min(args.betas)]
        results[name] = sweep(directory, cfg, betas, args.seeds, args.iterations, args.log_every)
        results[name]["summary"] = summarise(results[name]["replicas"], betas)
        print(name, json.dumps(results[name]["summary"], indent=1), flush=True)
    results["machine"] = demo.machine_description()
    results["args"] = vars(args)
    with open(os.path.join(args.out, "overoptimization.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(os.path.join(args.out, "overoptimization.png"), results, args.betas)
    print("wrote", os.path.join(args.out, "overoptimization.json"), os.path.join(args.out, "overoptimization.png"))


if __name__ == "__main__":
    main()
