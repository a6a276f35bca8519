"""TRL 0.9.6 side of `trl0_step.py`: one `PPOTrainer.step()` configured as LLaMA-Factory 0.9.x configures it.

Runs in the TRL 0.9.6 venv (see `trl0_conventions.py` for how it is built):

    /work/venvs/trl09/bin/python experiments/parity/trl0_step_worker.py --dir WORK

WORK (written by `trl0_step.py`): `policy/` and `reference/` (HF causal-LM directories), `data.npz` (queries,
responses, scores, the value head, the minibatch permutations and the numbers of the config). Writes
`WORK/trl/`: `policy_step1/` and `policy_final/` (the causal LM after the first and the last optimizer step),
`trl.npz` (the value head at both points, TRL's rewards / values / advantages / returns / masks, and its stats),
`summary.json`.

Only what LLaMA-Factory changes is changed: the optimizer (AdamW over every parameter, weight decay 0 as its
default), the value head's dropout (0 here: ppojax has none; LLaMA-Factory keeps TRL's 0.1, see BUILD_NOTES) and
the padding side during `step` (right, as LLaMA-Factory sets it). TRL's `np.random.permutation` (its minibatch
shuffle) returns the rows ppojax's `train_on_batch` draws, so both libraries see the same minibatches.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer


def tokenizer(vocab: int, pad: int, eos: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `vocab` ids; only its pad id matters (TRL's collator pads with it)."""
    words = {f"t{i}": i for i in range(vocab)}
    backend = Tokenizer(models.WordLevel(words, unk_token=f"t{pad}"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=f"t{pad}", eos_token=f"t{eos}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    data = np.load(os.path.join(args.dir, "data.npz"))
    numbers = json.loads(str(data["numbers"]))
    out = os.path.join(args.dir, "trl")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)

    config = PPOConfig(
        learning_rate=numbers["learning_rate"],
        batch_size=numbers["batch_size"],
        mini_batch_size=numbers["micro_batch_size"],  # LLaMA-Factory: per_device_train_batch_size
        gradient_accumulation_steps=numbers["accumulation"],
        ppo_epochs=numbers["ppo_epochs"],
        max_grad_norm=numbers["max_grad_norm"],
        seed=0,
        optimize_device_cache=True,
        target=numbers["kl_target"],
        whiten_rewards=False,
        accelerator_kwargs={"step_scheduler_with_optimizer": False},
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        os.path.join(args.dir, "policy"), summary_dropout_prob=0.0, torch_dtype=torch.float32
    )
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(
        os.path.join(args.dir, "reference"), torch_dtype=torch.float32
    )
    with torch.no_grad():
        model.v_head.summary.weight.copy_(torch.from_numpy(data["v_head_weight"]))
        model.v_head.summary.bias.copy_(torch.from_numpy(data["v_head_bias"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=numbers["learning_rate"], weight_decay=0.0)
    tok = tokenizer(numbers["vocab"], numbers["pad"], numbers["eos"])
    tok.padding_side = "right"  # LLaMA-Factory's ppo_train sets it before step()
    trainer = PPOTrainer(config, model, ref_model=ref_model, tokenizer=tok, optimizer=optimizer)

    # The minibatch shuffle: one permutation per epoch, ppojax's rows (the queries are passed in ppojax's order).
    permutations = iter(data["permutations"])
    real_permutation = np.random.permutation
    np.random.permutation = lambda n: np.asarray(next(permutations)) if n == config.batch_size else real_permutation(n)

    captured: dict = {}
    compute_rewards, compute_advantages = trainer.compute_rewards, trainer.compute_advantages

    def record_rewards(scores, logprobs, ref_logprobs, masks):
        rewards, non_score, kls = compute_rewards(scores, logprobs, ref_logprobs, masks)
        captured.update(rewards=rewards, logprobs=logprobs, ref_logprobs=ref_logprobs, masks=masks)
        return rewards, non_score, kls

    def record_advantages(values, rewards, mask):
        values_out, advantages, returns = compute_advantages(values, rewards, mask)
        captured.update(values=values_out, advantages=advantages, returns=returns)
        return values_out, advantages, returns

    trainer.compute_rewards, trainer.compute_advantages = record_rewards, record_advantages
    steps, norms = [], []
    inner_step = optimizer.step

    def counted_step(*a, **k):  # the torch optimizer's own step: called only when accelerate syncs
        grads = [p.grad.detach().double() for p in model.parameters() if p.grad is not None]
        norms.append(float(torch.sqrt(sum((g**2).sum() for g in grads))))  # as the optimizer sees it (clipped?)
        result = inner_step(*a, **k)
        steps.append(1)
        if len(steps) == 1:
            model.pretrained_model.save_pretrained(os.path.join(out, "policy_step1"), safe_serialization=True)
            captured["v_head_weight_step1"] = model.v_head.summary.weight.detach().clone()
            captured["v_head_bias_step1"] = model.v_head.summary.bias.detach().clone()
        return result

    optimizer.step = counted_step
    queries = [torch.from_numpy(q[:n]).long() for q, n in zip(data["queries"], data["query_lengths"])]
    responses = [torch.from_numpy(r[:n]).long() for r, n in zip(data["responses"], data["response_lengths"])]
    scores = [torch.tensor(float(s)) for s in data["scores"]]
    stats = trainer.step(queries, responses, scores)
    np.random.permutation = real_permutation

    model.pretrained_model.save_pretrained(os.path.join(out, "policy_final"), safe_serialization=True)
    arrays = {name: value.detach().float().numpy() for name, value in captured.items()}
    arrays["v_head_weight_final"] = model.v_head.summary.weight.detach().numpy()
    arrays["v_head_bias_final"] = model.v_head.summary.bias.detach().numpy()
    scalars = {k: float(v) for k, v in stats.items() if np.ndim(v) == 0}
    np.savez(os.path.join(out, "trl.npz"), **arrays)
    with open(os.path.join(out, "summary.json"), "w") as f:
        summary = {
            "optimizer_steps": len(steps),
            "grad_norms_seen_by_optimizer": norms,
            "kl_coef_after": trainer.kl_ctl.value,
        }
        json.dump({**summary, "stats": scalars}, f)


if __name__ == "__main__":
    main()
