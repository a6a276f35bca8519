"""One small PPO setup shared by the multi-host test's processes and the single-process reference.

Everything here is deterministic (fixed keys and seeds), so every process builds the same global state.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ppojax import train as T
from ppojax.generation import pad_prompts
from ppojax.models import DecoderModel, ModelConfig
from ppojax.optim import OptimizerConfig
from ppojax.presets import get_preset

VOCAB, PAD, TARGET, N, BATCH = 64, 63, 7, 6, 16
CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
FAST = {"xla_backend_optimization_level": 0}


def target_rate(prompt_ids, response_ids, response_mask):
    """Programmatic reward: the fraction of response slots holding TARGET."""
    del prompt_ids
    return jnp.sum((response_ids == TARGET) & (response_mask > 0), axis=1).astype(jnp.float32) / N


def ppo_setup():
    """(config, models, state, prompts (ids, mask) numpy [BATCH, P], ref_params, reward_params)."""
    policy = DecoderModel(CONFIG)
    reward = DecoderModel(CONFIG, head="reward")
    params = policy.init_params(jax.random.key(0))
    reward_params = reward.init_params(jax.random.key(1))
    config = T.PPOConfig(
        convention=get_preset("ppojax"),
        batch_size=BATCH,
        minibatch_size=8,
        micro_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=N,
        pad_token_id=PAD,
        critic_mode="separate",
        policy_optimizer=OptimizerConfig(learning_rate=3e-3),
        critic_optimizer=OptimizerConfig(learning_rate=3e-3),
    )
    state, models = T.init_ppo_state(
        config,
        policy,
        params,
        jax.random.key(2),
        reward_model=reward,
        reward_params=reward_params,
        reward_fn=target_rate,
    )
    rng = np.random.default_rng(0)
    prompts = pad_prompts([list(rng.integers(0, 60, size=rng.integers(2, 5))) for _ in range(BATCH)], PAD, bucket=4)
    return config, models, state, prompts, params, reward_params
