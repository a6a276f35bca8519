"""Try one tunix PPO iteration on the benchmark workload (issue 9). Run with the tunix environment's python:

    python -m venv /work/venvs/tunix && /work/venvs/tunix/bin/pip install google-tunix
    /work/venvs/tunix/bin/python experiments/bench/tunix_attempt.py --dir WORKLOAD_DIR [--iterations 3]

(WORKLOAD_DIR from `python experiments/bench/workload.py --build DIR`.) tunix pins `safetensors<0.8`, which
conflicts with this project's transformers, hence its own environment.

Builds tunix's own `Qwen2` (nnx) for the actor / reference from the policy safetensors, a critic and a reward
model as the same backbone (loaded from the reward model's safetensors) plus a [hidden, 1] score head read
from `score.weight`, an `RLCluster` with the "vanilla" JAX rollout engine on one CPU mesh, and `PPOLearner`
with the workload's settings, then times `learner.train` over `--iterations` batches of the 64 prompts.
Prints `@@bench {...}` with the timings, or the exception that stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload as wl


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--minibatches", type=int, default=1)
    return parser.parse_args()


def main() -> dict:
    args = parse_args()
    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("google-tunix", "jax", "flax", "optax", "transformers", "safetensors")}
    report = {"versions": versions, "stage": "import"}
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        import safetensors.numpy
        import transformers
        from flax import nnx
        from tunix.models.qwen2 import model as qwen2_model
        from tunix.models.qwen2 import params as qwen2_params
        from tunix.rl import rl_cluster as rl_cluster_lib
        from tunix.rl.ppo import ppo_learner
        from tunix.rl.rollout import base_rollout

        w, prompts = wl.load(args.dir)
        report["stage"] = "models"
        config = qwen2_model.ModelConfig(
            num_layers=w.num_layers,
            vocab_size=w.vocab_size,
            embed_dim=w.hidden_size,
            hidden_dim=w.intermediate_size,
            num_heads=w.num_heads,
            head_dim=w.head_dim,
            num_kv_heads=w.num_kv_heads,
            rope_theta=10000,
            norm_eps=1e-6,
            use_tied_embedding=True,
        )
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"))  # Auto axes
        policy_dir, reward_dir = os.path.join(args.dir, "policy"), os.path.join(args.dir, "reward")
        actor = qwen2_params.create_model_from_safe_tensors(policy_dir, config, mesh)
        reference = qwen2_params.create_model_from_safe_tensors(policy_dir, config, mesh)

        class ScoreModel(nnx.Module):
            """Qwen2 trunk + [hidden, 1] head: per-token scores [B, T, 1] (what tunix's compute_score reads)."""

            def __init__(self, trunk, kernel):
                self.trunk = trunk
                self.score = nnx.Param(kernel)

            def __call__(self, input_tokens, positions, cache, attention_mask=None, **kwargs):
                self.trunk(input_tokens, positions, cache, attention_mask, output_hidden_states=True)
                hidden = nnx.pop(self.trunk, nnx.Intermediate)["all_hidden_states"].value[-1]
                return hidden @ self.score.value, None

        score_kernel = safetensors.numpy.load_file(os.path.join(reward_dir, "model.safetensors"))["score.weight"].T
        # The reward checkpoint's keys start with "model." like the causal LM's, minus lm_head (tied anyway).
        critic = ScoreModel(
            qwen2_params.create_model_from_safe_tensors(reward_dir, config, mesh), jnp.asarray(score_kernel)
        )
        reward = ScoreModel(
            qwen2_params.create_model_from_safe_tensors(reward_dir, config, mesh), jnp.asarray(score_kernel)
        )

        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(
            os.path.join(args.dir, "tokenizer"), padding_side="left"
        )
        texts = [tokenizer.decode(p) for p in prompts]
        report["prompt_tokens_after_reencoding"] = sorted({len(tokenizer(t)["input_ids"]) for t in texts})
        report["stage"] = "cluster"
        optimizer = optax.adamw(w.learning_rate, weight_decay=0.0)
        training = rl_cluster_lib.RLTrainingConfig(
            actor_optimizer=optimizer,
            critic_optimizer=optax.adamw(w.learning_rate, weight_decay=0.0),
            eval_every_n_steps=10**9,
            max_steps=args.iterations * w.ppo_epochs * args.minibatches,
            mini_batch_size=w.batch_size // args.minibatches,
            train_micro_batch_size=w.batch_size // args.minibatches,
        )
        rollout = base_rollout.RolloutConfig(
            max_tokens_to_generate=w.new_tokens,
            temperature=w.temperature,
            top_p=1.0,
            top_k=None,
            max_prompt_length=2 * w.prompt_max,  # re-encoded text prompts can be longer than the ids
            kv_cache_size=4 * w.sequence_length,
            eos_tokens=[],
        )
        roles = rl_cluster_lib.Role
        cluster = rl_cluster_lib.RLCluster(
            actor=actor,
            critic=critic,
            reference=reference,
            reward=reward,
            tokenizer=tokenizer,
            cluster_config=rl_cluster_lib.ClusterConfig(
                role_to_mesh={r: mesh for r in roles},
                rollout_engine="vanilla",
                training_config=training,
                rollout_config=rollout,
            ),
        )
        report["stage"] = "learner"
        ppo = ppo_learner.PPOConfig(
            num_iterations=w.ppo_epochs,
            gamma=w.gamma,
            gae_lambda=w.lam,
            beta=w.kl_coef,
            kl_method="kl",
            epsilon=w.clip,
            clip_range_value=w.value_clip,
        )
        learner = ppo_learner.PPOLearner(rl_cluster=cluster, ppo_config=ppo)
        report["stage"] = "train"
        dataset = [{"prompts": np.array(texts)} for _ in range(args.iterations)]
        start = time.perf_counter()
        learner.train(dataset)
        report["seconds"] = time.perf_counter() - start
        report["stage"] = "done"
        report["peak_rss_mb"] = wl.peak_rss_mb()
    except BaseException as error:  # record precisely why it stopped
        report["error"] = f"{type(error).__name__}: {error}"[:2000]
        report["traceback"] = traceback.format_exc()[-4000:]
    print(wl.TAG + json.dumps(report), flush=True)
    return report


if __name__ == "__main__":
    main()
