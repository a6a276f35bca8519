"""ppojax: pure-JAX, functional PPO for RLHF of language models."""

from ppojax.advantages import compute_gae
from ppojax.kl import (
    KL_ESTIMATORS,
    KL_RULES,
    KLController,
    KLControllerState,
    adaptive_kl_controller,
    fixed_kl_controller,
    kl_for_controller,
    kl_from_logits,
    kl_penalty,
    make_kl_controller,
    sequence_kl,
    step_kl_controller,
)
from ppojax.health import HealthLimits, HealthReport, Violation, check_health
from ppojax.losses import LOSS_AGGREGATIONS, aggregate_loss, clipped_loss, entropy_from_logits, value_loss
from ppojax.presets import PRESETS, Advantages, Convention, assemble_advantages, get_preset, masks_for, ppo_losses
from ppojax.rewards import (
    LENGTH_REWARDS,
    SCORE_PLACEMENTS,
    adjust_scores,
    extend_mask,
    last_valid_index,
    length_aware_scores,
    score_index,
    shape_rewards,
)
from ppojax.stats import SumCount, masked_count, masked_max, masked_mean, masked_sum, masked_var, whiten

__version__ = "0.1.0.dev0"

from ppojax import models
from ppojax.models import (
    CheckpointError,
    DecoderModel,
    KVCache,
    ModelConfig,
    init_lora,
    init_params,
    load_pretrained,
    merge_lora,
    save_pretrained,
    sequence_scores,
)
from ppojax.generation import (
    Rollout,
    Scores,
    bucket_length,
    pad_prompts,
    response_logprobs,
    response_values,
    rollout,
    rollout_jit,
    score,
    sequence_reward,
)
from ppojax.sampling import filter_logits, sample_tokens, token_logprobs, top_k_mask, top_p_mask

# Training (issue 5).
from ppojax.optim import OptimizerConfig, make_optimizer, make_schedule, scale_by_tf_adam
from ppojax.train import (
    Experience,
    LoraReference,
    Minibatch,
    PPOConfig,
    PPOModels,
    PPOState,
    PreferenceBatch,
    SequenceBatch,
    TrainState,
    collect,
    critic_from_policy,
    critic_from_reward,
    fit_reward_normalisation,
    init_ppo_state,
    init_train_state,
    kl_controller,
    make_ppo_iteration,
    make_ppo_phases,
    minibatch_gradients,
    policy_outputs,
    ppo_iteration,
    preference_scores,
    reward_model_loss,
    reward_model_step,
    sft_loss,
    sft_step,
    shuffle_minibatches,
    train_on_batch,
    training_batch,
    update_step,
)
