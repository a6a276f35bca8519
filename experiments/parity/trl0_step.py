"""Does ppojax's `llamafactory` preset run LLaMA-Factory's PPO? One `PPOTrainer.step()` of TRL 0.9.6 against
`ppojax.train_on_batch` on identical data, compared number by number.

    PYTHONPATH=. python experiments/parity/trl0_step.py --out tests/data/trl0_step.npz \
        [--trl-python /work/venvs/trl09/bin/python]

`trl0_conventions.py` checks TRL 0.9.6's functions one by one; this checks the glue: how `step` lines log-probs,
values, masks and the score up with the tokens, how it accumulates micro-batches into optimizer steps, what
temperature its log-probs are at. The workload is built here: a tiny Qwen2 policy (random weights), a reference
= the policy with 5 % noise, 8 prompts of 2–5 tokens, responses of up to 6 tokens of which three stop at an EOS
(pad after it), random scores, a random value head with a bias on the policy trunk (LLaMA-Factory's shared
critic: TRL's `AutoModelForCausalLMWithValueHead`). LLaMA-Factory's numbers: `per_device_train_batch_size` 2
(TRL's `mini_batch_size`), `gradient_accumulation_steps` 2, 2 PPO epochs, so 2 optimizer steps of 4 rows per
epoch; AdamW with weight decay 0 (its default); adaptive KL from 0.2 towards 6;
sampling temperature 0.95 (LLaMA-Factory's default; the responses are given, so it only matters for which
temperature the log-probs are taken at). TRL runs `step` unmodified in its own venv (`trl0_step_worker.py`);
its minibatch shuffle returns the rows ppojax's `train_on_batch` draws.

The .npz holds the workload (weights included: the model is 13 k parameters) and TRL's outputs; the ppojax side is
recomputed from it by `ppojax_side` (tests/test_trl0_step.py), so the test needs neither TRL 0.9.6 nor torch.
Negative controls (one detail of the preset changed) show the comparison can tell them apart.

Found with it: TRL 0.9.6 keeps the parameters to clip as `filter(lambda p: p.requires_grad, model.parameters())`,
a one-shot iterator, so `max_grad_norm` clips the first optimizer step of a run and none after it (with
`--max-grad-norm 1.0` the optimizer sees gradient norms 1.0, 1.43, 1.30, 1.13 on this workload). ppojax clips
every step, so the stored comparison runs both without clipping; BUILD_NOTES has the figures with it.
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

import jax
import jax.numpy as jnp
import numpy as np

import ppojax
from ppojax import train as T
from ppojax.generation import response_logprobs
from ppojax.models import DecoderModel, ModelConfig
from ppojax.optim import OptimizerConfig

HERE = os.path.dirname(os.path.abspath(__file__))
PAD, EOS = 0, 1
ROWS, WIDTH = 8, 6
NUMBERS = dict(
    vocab=32,
    pad=PAD,
    eos=EOS,
    batch_size=ROWS,
    micro_batch_size=2,
    accumulation=2,
    ppo_epochs=2,
    learning_rate=3e-3,
    max_grad_norm=None,  # see the module doc: TRL 0.9.6 clips only the first optimizer step of a run
    kl_target=6.0,
    temperature=0.95,
)
CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=NUMBERS["vocab"],
    hidden_size=16,
    intermediate_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=64,
    qkv_bias=True,
    tie_word_embeddings=True,
    eos_token_ids=(EOS,),
    pad_token_id=PAD,
    head_bias=True,  # the shared value head has TRL's bias
)
POLICY = DecoderModel(CONFIG)


def build_workload(seed: int = 0, max_grad_norm=None) -> dict:
    """Weights, value head, prompts, responses and scores (numpy)."""
    key_policy, key_ref, key_head = jax.random.split(jax.random.key(seed), 3)
    params = jax.tree.map(lambda x: x * 5.0 if x.ndim == 2 else x, POLICY.init_params(key_policy))  # not ~uniform
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key_ref, len(leaves))
    ref = [x + 0.05 * jnp.std(x) * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    rng = np.random.default_rng(seed)
    query_lengths = rng.integers(2, 6, ROWS)
    queries = np.full((ROWS, 5), PAD, np.int32)
    responses = np.full((ROWS, WIDTH), PAD, np.int32)
    response_lengths = np.full(ROWS, WIDTH, np.int32)
    for row in range(ROWS):
        queries[row, : query_lengths[row]] = rng.integers(2, NUMBERS["vocab"], query_lengths[row])
        responses[row] = rng.integers(2, NUMBERS["vocab"], WIDTH)
    for row, stop_at in ((0, 2), (3, 0), (5, 4)):  # three rows stop at an EOS (row 3 at once)
        responses[row, stop_at] = EOS
        responses[row, stop_at + 1 :] = PAD
        response_lengths[row] = stop_at + 1
    flat = {f"policy/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    ref_tree = jax.tree.unflatten(treedef, ref)
    flat.update(
        {f"ref/{jax.tree_util.keystr(p)}": np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(ref_tree)}
    )
    return {
        **flat,
        "queries": queries,
        "query_lengths": query_lengths.astype(np.int32),
        "responses": responses,
        "response_lengths": response_lengths,
        "scores": rng.normal(0.0, 1.0, ROWS).astype(np.float32),
        "v_head_weight": (0.3 * jax.random.normal(key_head, (1, CONFIG.hidden_size))).__array__().astype(np.float32),
        "v_head_bias": np.array([0.25], np.float32),
        "numbers": np.array(json.dumps({**NUMBERS, "max_grad_norm": max_grad_norm})),
    }


def _tree(data, prefix: str) -> dict:
    template = POLICY.param_shapes()
    paths = [f"{prefix}/{jax.tree_util.keystr(p)}" for p, _ in jax.tree_util.tree_leaves_with_path(template)]
    return jax.tree.unflatten(jax.tree.structure(template), [jnp.asarray(data[p]) for p in paths])


def ppo_config(data, convention=None, **changes) -> T.PPOConfig:
    n = json.loads(str(data["numbers"]))
    minibatch = n["micro_batch_size"] * n["accumulation"]
    optimizer = OptimizerConfig(learning_rate=n["learning_rate"], max_grad_norm=n["max_grad_norm"])
    return T.PPOConfig(
        convention=convention or ppojax.get_preset("llamafactory").replace(kl_target=n["kl_target"]),
        batch_size=n["batch_size"],
        minibatch_size=minibatch,
        micro_batch_size=n["micro_batch_size"],
        ppo_epochs=n["ppo_epochs"],
        max_new_tokens=WIDTH,
        temperature=n["temperature"],
        stop_token_ids=(n["eos"],),
        pad_token_id=n["pad"],
        critic_mode="shared",
        policy_optimizer=optimizer,
        **changes,
    )


def ppojax_side(data, config: T.PPOConfig | None = None, *, jit: bool = True, upto: str = "final") -> dict:
    """ppojax on the stored workload: the experience (`policy_outputs`, `response_logprobs` at the convention's
    log-prob temperature), `training_batch`, then (upto "step1" or "final") one `update_step` on the first
    minibatch, then (upto "final") `train_on_batch`."""
    config = config or ppo_config(data)
    wrap = jax.jit if jit else (lambda f: f)
    params, ref_params = _tree(data, "policy"), _tree(data, "ref")
    state, models = T.init_ppo_state(
        config, POLICY, params, jax.random.key(0), reward_fn=lambda *a: jnp.zeros(a[0].shape[0]), critic_init="policy"
    )
    head = {"kernel": jnp.asarray(data["v_head_weight"]).T, "bias": jnp.asarray(data["v_head_bias"])}
    state = state.replace(critic=head)
    prompts = [list(q[:n]) for q, n in zip(data["queries"], data["query_lengths"])]
    prompt_ids, prompt_mask = (jnp.asarray(x) for x in ppojax.pad_prompts(prompts, PAD, bucket=1))
    response_ids = jnp.asarray(data["responses"])
    response_mask = (jnp.arange(WIDTH)[None, :] < jnp.asarray(data["response_lengths"])[:, None]).astype(jnp.int32)
    batch = (prompt_ids, prompt_mask, response_ids, response_mask)
    value_mask = ppojax.masks_for(config.convention, response_mask)[1]
    temperature = config.logprob_temperature
    outputs = wrap(functools.partial(T.policy_outputs, POLICY, temperature=temperature, value_mask=value_mask))
    logprobs, _, values = outputs(params, None, *batch, value_head=head)
    ref_logprobs = wrap(functools.partial(response_logprobs, POLICY))(ref_params, *batch, temperature)
    experience = T.Experience(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        behaviour_logprobs=logprobs,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        values=values,
        scores=jnp.asarray(data["scores"]),
        stopped=jnp.asarray(data["response_lengths"] < WIDTH),
        lengths=jnp.asarray(data["response_lengths"]),
    )
    adv, minibatches = T.training_batch(config.convention, experience, state.kl.coef)
    permutations = np.asarray(T.shuffle_minibatches(state.key, config)[1]).reshape(config.ppo_epochs, -1)
    out = {
        "permutations": permutations,
        "logprobs": np.asarray(logprobs),
        "ref_logprobs": np.asarray(ref_logprobs),
        "values": np.asarray(values),
        "rewards": np.asarray(adv.rewards),
        "advantages": np.asarray(adv.advantages),
        "returns": np.asarray(adv.returns),
        "policy_mask": np.asarray(adv.policy_mask),
        "start": state,
    }
    if upto in ("step1", "final"):
        first = jax.tree.map(lambda x: jnp.take(x, permutations[0][: config.minibatch_size], axis=0), minibatches)
        out["step1"] = wrap(functools.partial(T.update_step, config=config, models=models))(state, first, ref_params)[0]
    if upto == "final":
        train = wrap(functools.partial(T.train_on_batch, config=config, models=models))
        out["final"], metrics = train(state, experience, ref_params)
        out["metrics"] = {k: float(v) for k, v in metrics.items()}
    return out


def trl_by_response(data, array: np.ndarray) -> np.ndarray:
    """TRL's `[B, L - 1]` arrays (log-prob coordinates over the right-padded query + response) -> `[B, N]` per
    response token: response token t of a row whose query has q tokens sits at q - 1 + t."""
    out = np.zeros((ROWS, WIDTH), np.float32)
    for row, (q, n) in enumerate(zip(data["query_lengths"], data["response_lengths"])):
        out[row, :n] = array[row, q - 1 : q - 1 + n]
    return out


def compare(data, side: dict) -> dict:
    """Relative L2 errors of ppojax against TRL (stored in `data` under trl/...)."""

    def rel(ours, theirs):
        ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
        return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))

    mask = np.asarray(side["policy_mask"]) > 0
    out = {}
    for name in ("logprobs", "ref_logprobs", "values", "rewards", "advantages", "returns"):
        theirs = trl_by_response(data, data[f"trl/{name}"])
        out[name] = rel(np.where(mask, side[name], 0.0), np.where(mask, theirs, 0.0))
    start = side["start"]
    for point in [p for p in ("step1", "final") if p in side]:
        state = side[point]
        ours = np.concatenate(
            [
                np.ravel(np.asarray(x) - np.asarray(y))
                for x, y in zip(jax.tree.leaves(state.policy), jax.tree.leaves(start.policy))
            ]
        )
        theirs = np.concatenate(
            [
                np.ravel(data[f"trl/{point}/{jax.tree_util.keystr(p)}"] - np.asarray(y))
                for p, y in jax.tree_util.tree_leaves_with_path(start.policy)
            ]
        )
        out[f"{point}_policy_change"] = rel(ours, theirs)
        head_ours = np.concatenate(
            [
                np.ravel(np.asarray(state.critic["kernel"]).T - data["v_head_weight"]),
                np.asarray(state.critic["bias"]) - data["v_head_bias"],
            ]
        )
        head_theirs = np.concatenate(
            [
                np.ravel(data[f"trl/v_head_weight_{point}"] - data["v_head_weight"]),
                data[f"trl/v_head_bias_{point}"] - data["v_head_bias"],
            ]
        )
        out[f"{point}_value_head_change"] = rel(head_ours, head_theirs)
    return out


def run_trl(trl_python: str, data: dict, work: str) -> dict:
    """Writes the workload for the worker, runs TRL 0.9.6's step, returns its outputs as trl/... arrays."""
    for name, prefix in (("policy", "policy"), ("reference", "ref")):
        ppojax.save_pretrained(
            os.path.join(work, name), DecoderModel(dataclasses.replace(CONFIG, head_bias=False)), _tree(data, prefix)
        )
    np.savez(os.path.join(work, "data.npz"), **{k: v for k, v in data.items() if not k.startswith(("policy/", "ref/"))})
    log = os.path.join(work, "worker.log")
    with open(log, "w") as f:
        done = subprocess.run(
            [trl_python, os.path.join(HERE, "trl0_step_worker.py"), "--dir", work], stdout=f, stderr=subprocess.STDOUT
        )
    if done.returncode:
        raise SystemExit(f"TRL 0.9.6 worker failed (exit {done.returncode}); see {log}")
    trl = dict(np.load(os.path.join(work, "trl", "trl.npz")))
    out = {f"trl/{k}": v for k, v in trl.items()}
    for point in ("step1", "final"):
        _, params = ppojax.load_pretrained(os.path.join(work, "trl", f"policy_{point}"), head="lm")
        for p, x in jax.tree_util.tree_leaves_with_path(params):
            out[f"trl/{point}/{jax.tree_util.keystr(p)}"] = np.asarray(x)
    with open(os.path.join(work, "trl", "summary.json")) as f:
        summary = json.load(f)
    out["trl/summary"] = np.array(json.dumps(summary))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the .npz to write (workload + TRL's outputs)")
    parser.add_argument("--trl-python", default="/work/venvs/trl09/bin/python")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument(
        "--max-grad-norm", type=float, default=None, help="both libraries (default: none; LLaMA-Factory's is 1.0)"
    )
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="ppojax_trl0_step_")
    data = build_workload(max_grad_norm=args.max_grad_norm)
    config = ppo_config(data)
    side = ppojax_side(data, config)
    data["permutations"] = side["permutations"]
    data.update(run_trl(args.trl_python, data, work))
    np.savez_compressed(args.out, **data)
    result = compare(data, side)
    summary = json.loads(str(data["trl/summary"]))
    norms = summary["grad_norms_seen_by_optimizer"]
    print(
        json.dumps(
            {"errors": result, "trl_optimizer_steps": summary["optimizer_steps"], "trl_grad_norms": norms}, indent=1
        )
    )
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
