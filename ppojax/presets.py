"""Named PPO-RLHF conventions: each published system's choices as one frozen, documented record.

| choice                 | ppojax      | trl (N+)        | openrlhf        | verl            | llamafactory     | openai          |
|------------------------|-------------|-----------------|-----------------|-----------------|------------------|-----------------|
| loss / value mask      | response    | response / +1   | response        | response        | response         | full width      |
| score placed at        | last token  | slot after last | last token      | last token      | last token       | last column     |
| score clip             | –           | –               | ±10             | –               | –                | –               |
| KL in reward           | yes         | yes             | yes             | no (β 0.001 on) | yes              | yes             |
| KL estimator / clamp   | k1 / –      | k1 / –          | k1 / ±10        | k1 / –          | k1 / –           | k1 / –          |
| β (init)               | 0.05 fixed  | 0.05 fixed      | 0.01 fixed      | 0.001 fixed     | 0.2 adaptive     | 0.15 adaptive   |
| controller sees        | seq sum     | seq sum         | seq token-mean  | seq token-mean  | seq sum          | seq sum         |
| γ, λ                   | 1, 0.95     | 1, 0.95         | 1, 1            | 1, 1            | 1, 0.95          | 1, 0.95         |
| advantage whitening    | Bessel, +ε  | Bessel, +ε      | pop., max(·,ε)  | Bessel, +ε      | Bessel, +ε       | pop., +ε        |
| reward whitening       | no          | option (no)     | no              | no              | option (no)      | no              |
| no stop token          | –           | (option)        | –               | –               | –                | score := −1     |
| ε (policy) / ε_v       | 0.2 / 0.2   | 0.2 / 0.2       | 0.2 / 0.5       | 0.2 / 0.5       | 0.2 / 0.2        | 0.2 / 0.2       |
| dual clip              | –           | –               | –               | c = 3           | –                | –               |
| log-ratio clamp        | 20          | –               | ±20             | ±20             | –                | –               |
| vf_coef                | 0.1         | 0.1             | (own optimizer) | (own optimizer) | 0.1              | 0.1             |
| loss aggregation       | token-mean  | token-mean      | token-mean      | token-mean      | micro-token-mean | token-mean      |
| ratio threshold        | –           | –               | –               | –               | 10 (skip micro)  | –               |
| log-probs, KL at       | sampling T  | sampling T      | sampling T      | sampling T      | T = 1            | sampling T      |

Sources: TRL 1.12 `trl.experimental.ppo` (the last TRL PPOTrainer, which is the N+ paper's code); TRL 0.9.6's
`PPOTrainer` with the `PPOConfig` LLaMA-Factory 0.9.x builds (llamafactory);
OpenRLHF 0.11 `compute_reward`, `get_advantages_and_returns`, `PolicyLoss`, `ValueLoss` and its
replay-buffer normalisation; verl 0.9 `core_algos` (`compute_gae_advantage_return`,
`compute_policy_loss_vanilla`, `compute_value_loss`, `agg_loss`) with `ppo_trainer.yaml` defaults;
OpenAI lm-human-preferences `train_policy.py`. BUILD_NOTES.md has the details.

Checked end to end: `trl` against TRL 1.12's `PPOTrainer` itself (tests/test_trl_parity.py), `llamafactory` against
TRL 0.9.6's `PPOTrainer.step()` configured as LLaMA-Factory configures it (tests/test_trl0_step.py); `openrlhf`,
`verl` and `llamafactory` against the outputs of those systems' own functions (tests/test_peer_conventions.py).
Known differences for `llamafactory`: TRL 0.9.6 clips gradients (`max_grad_norm`) on the first optimizer step of a
run only (it keeps the parameters in a one-shot `filter` iterator), ppojax on every step; LLaMA-Factory's value
head has TRL's dropout 0.1, active while it trains
(ppojax has no dropout) and starts from `nn.Linear`'s random init (ppojax's shared head starts at 0; it has
TRL's bias when the config's `value_head_bias` is on, the default with this preset); with
`whiten_rewards` TRL 0.9.6 leaves the whitened padding slots in its GAE, which leaks into shorter rows'
advantages (ppojax zeroes them, as TRL 1.x does). Values are kept on
the convention's value mask (`masks_for`), so TRL's extra slot holds the critic's value of the state after the
stop token. Known difference for `openai` with stop tokens: ppojax's rollout pads after the stop token, so the
full-width slots after it carry no policy gradient and the critic sees pad positions there, while
lm-human-preferences keeps sampling past its truncation token, trains on those sampled tokens and truncates only
what the reward model reads.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ppojax.advantages import compute_gae
from ppojax.kl import CONTROLLER_KL_MODES, KL_ESTIMATORS, KL_RULES, kl_for_controller, kl_penalty
from ppojax.losses import LOSS_AGGREGATIONS, Stats, clipped_loss, value_loss
from ppojax.rewards import LENGTH_REWARDS, SCORE_PLACEMENTS, extend_mask, shape_rewards
from ppojax.stats import SumCount, as_bool_mask, masked_count, whiten

MASK_MODES = ("response", "response_plus_one", "full_width")


@dataclasses.dataclass(frozen=True)
class Convention:
    """One system's PPO-RLHF choices. Hashable: usable as a static jit argument."""

    name: str
    # Where the loss and value masks come from (see `masks_for`).
    mask_mode: str = "response"
    # Reward assembly.
    score_placement: str = "last"
    score_clip: Optional[float] = None
    kl_in_reward: bool = True
    kl_estimator: str = "k1"
    kl_clamp: Optional[float] = None
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    kl_rule: str = "proportional"  # how an adaptive β moves: "proportional" (Ziegler) or "step" (see ppojax.kl)
    controller_kl: str = "seq_sum"
    missing_eos_penalty: Optional[float] = None
    missing_eos_score: Optional[float] = None
    length_reward: str = "none"  # "none", "penalty" (score − length_penalty · length) or "sqrt" (score / √length)
    length_penalty: float = 0.0
    whiten_rewards: bool = False
    # Advantages.
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    whiten_unbiased: bool = True
    whiten_eps_mode: str = "add"
    whiten_scope: str = "batch"  # "batch" (the rollout batch) or "minibatch"; used by the training loop.
    # Losses.
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    dual_clip: Optional[float] = None
    log_ratio_clamp: Optional[float] = None
    value_clip_eps: Optional[float] = 0.2
    vf_coef: float = 0.1
    loss_aggregation: str = "token-mean"
    # TRL 0.x: a call of `ppo_losses` (one micro-batch of the training step) whose mean ratio over the policy
    # mask exceeds this contributes 0 to both losses (it still counts in the aggregation's denominator).
    ratio_threshold: Optional[float] = None
    # The temperature of the policy's (old and new) and the reference's log-probs and of the entropy: None = the
    # sampling temperature (the rollout's distribution); TRL 0.x scores the untempered logits (1.0) whatever
    # temperature LLaMA-Factory samples at (its default 0.95, with top-p 0.7 and top-k 50).
    logprob_temperature: Optional[float] = None

    def __post_init__(self):
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"Convention {self.name!r}: mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.score_placement not in SCORE_PLACEMENTS:
            raise ValueError(
                f"Convention {self.name!r}: score_placement must be one of {SCORE_PLACEMENTS}, got {self.score_placement!r}"
            )
        if self.controller_kl not in CONTROLLER_KL_MODES:
            raise ValueError(
                f"Convention {self.name!r}: controller_kl must be one of {CONTROLLER_KL_MODES}, got {self.controller_kl!r}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"Convention {self.name!r}: kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}"
            )
        if self.kl_rule not in KL_RULES:
            raise ValueError(f"Convention {self.name!r}: kl_rule must be one of {KL_RULES}, got {self.kl_rule!r}")
        if self.length_reward not in LENGTH_REWARDS:
            raise ValueError(
                f"Convention {self.name!r}: length_reward must be one of {LENGTH_REWARDS}, got {self.length_reward!r}"
            )
        if (self.length_reward == "penalty") != (self.length_penalty != 0):
            raise ValueError(
                f"Convention {self.name!r}: length_penalty {self.length_penalty} goes with length_reward 'penalty' "
                f"(got {self.length_reward!r}); set both or neither"
            )
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(
                f"Convention {self.name!r}: loss_aggregation must be one of {LOSS_AGGREGATIONS}, "
                f"got {self.loss_aggregation!r}"
            )
        if self.logprob_temperature is not None and not self.logprob_temperature > 0.0:
            raise ValueError(
                f"Convention {self.name!r}: logprob_temperature must be > 0 (or None), got {self.logprob_temperature}"
            )
        if self.ratio_threshold is not None and not self.ratio_threshold > 1.0:
            raise ValueError(f"Convention {self.name!r}: ratio_threshold must be > 1, got {self.ratio_threshold}")
        if self.whiten_scope not in ("batch", "minibatch"):
            raise ValueError(
                f"Convention {self.name!r}: whiten_scope must be 'batch' or 'minibatch', got {self.whiten_scope!r}"
            )

    def replace(self, **changes) -> "Convention":
        return dataclasses.replace(self, **changes)


PRESETS = {
    "ppojax": Convention(name="ppojax", log_ratio_clamp=20.0),
    "trl": Convention(
        name="trl",
        mask_mode="response_plus_one",
        score_placement="after_last",
        kl_coef=0.05,
    ),
    "openrlhf": Convention(
        name="openrlhf",
        score_clip=10.0,
        kl_clamp=10.0,
        kl_coef=0.01,
        controller_kl="seq_mean",
        lam=1.0,
        whiten_unbiased=False,
        whiten_eps_mode="max",
        log_ratio_clamp=20.0,
        value_clip_eps=0.5,
    ),
    "verl": Convention(
        name="verl",
        kl_in_reward=False,
        kl_coef=0.001,
        controller_kl="seq_mean",
        lam=1.0,
        dual_clip=3.0,
        log_ratio_clamp=20.0,
        value_clip_eps=0.5,
    ),
    "llamafactory": Convention(
        name="llamafactory",
        kl_coef=0.2,
        adaptive_kl=True,
        kl_target=6.0,
        kl_horizon=10000.0,
        loss_aggregation="micro-token-mean",
        ratio_threshold=10.0,
        logprob_temperature=1.0,
    ),
    "openai": Convention(
        name="openai",
        mask_mode="full_width",
        score_placement="final",
        kl_coef=0.15,
        adaptive_kl=True,
        kl_target=6.0,
        kl_horizon=10000.0,
        missing_eos_score=-1.0,
        whiten_unbiased=False,
    ),
}


def get_preset(name: str) -> Convention:
    """The named convention: one of 'ppojax', 'trl', 'openrlhf', 'verl', 'llamafactory', 'openai'."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


def masks_for(convention: Convention, response_mask: jax.Array):
    """(policy_mask, value_mask) as bool [B, T] for a right-padded response mask."""
    response_mask = as_bool_mask(response_mask)
    if convention.mask_mode == "response":
        return response_mask, response_mask
    if convention.mask_mode == "response_plus_one":
        return response_mask, extend_mask(response_mask)
    full = jnp.ones_like(response_mask)
    return full, full


class Advantages(NamedTuple):
    """What one rollout batch yields before the PPO epochs. All [B, T] float32 except `controller_kl`."""

    kl: jax.Array  # per-token KL estimate, 0 outside the policy mask
    rewards: jax.Array  # shaped rewards
    advantages: jax.Array  # whitened if the convention says so
    returns: jax.Array  # advantages (before whitening) + values
    policy_mask: jax.Array  # bool
    value_mask: jax.Array  # bool
    controller_kl: jax.Array  # scalar fed to the KL controller


def assemble_advantages(
    convention: Convention,
    *,
    scores: jax.Array,
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    values: jax.Array,
    response_mask: jax.Array,
    kl_coef: Optional[float | jax.Array] = None,
    stopped: Optional[jax.Array] = None,
) -> Advantages:
    """KL → shaped rewards → GAE → whitening under one convention.

    Args:
      scores: [B] sequence scores. logprobs, ref_logprobs: [B, T] rollout-time log-probs (at the sampling
        temperature). values: [B, T] critic values from the rollout. response_mask: [B, T] right-padded.
      kl_coef: β; defaults to `convention.kl_coef` (pass the controller's `state.coef` when adaptive).
      stopped: [B] bool, needed when the convention has a missing-EOS rule.
    """
    policy_mask, value_mask = masks_for(convention, response_mask)
    beta = convention.kl_coef if kl_coef is None else kl_coef
    kl = kl_penalty(
        logprobs, ref_logprobs, estimator=convention.kl_estimator, mask=policy_mask, clamp=convention.kl_clamp
    )
    rewards = shape_rewards(
        scores,
        kl,
        policy_mask,
        kl_coef=beta if convention.kl_in_reward else 0.0,
        score_placement=convention.score_placement,
        stopped=stopped,
        missing_eos_penalty=convention.missing_eos_penalty,
        missing_eos_score=convention.missing_eos_score,
        score_clip=convention.score_clip,
        length_reward=convention.length_reward,
        length_penalty=convention.length_penalty,
        lengths=masked_count(response_mask, axis=-1),
    )
    if convention.whiten_rewards:
        rewards = whiten(rewards, value_mask, shift_mean=False, unbiased=convention.whiten_unbiased)
    advantages, returns = compute_gae(rewards, values, value_mask, gamma=convention.gamma, lam=convention.lam)
    if convention.whiten_advantages:
        advantages = whiten(
            advantages, policy_mask, unbiased=convention.whiten_unbiased, eps_mode=convention.whiten_eps_mode
        )
    else:
        advantages = jnp.where(policy_mask, advantages, 0.0)
    return Advantages(
        kl=kl,
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        policy_mask=policy_mask,
        value_mask=value_mask,
        controller_kl=kl_for_controller(kl, policy_mask, mode=convention.controller_kl),
    )


def ppo_losses(
    convention: Convention,
    *,
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    policy_mask: jax.Array,
    value_mask: jax.Array,
    logits: Optional[jax.Array] = None,
    entropy_coef: float = 0.0,
    as_sum_count: bool = False,
) -> tuple[jax.Array, jax.Array, Stats]:
    """(policy_loss, value_loss, stats) under one convention. The joint loss is pg + vf_coef · vf.

    as_sum_count: return both losses as `SumCount` pairs (for exact gradient accumulation).
    """
    pg_loss, pg_stats = clipped_loss(
        logprobs,
        old_logprobs,
        advantages,
        policy_mask,
        clip_eps=convention.clip_eps,
        clip_eps_high=convention.clip_eps_high,
        dual_clip=convention.dual_clip,
        log_ratio_clamp=convention.log_ratio_clamp,
        entropy_coef=entropy_coef,
        logits=logits,
        aggregation=convention.loss_aggregation,
        as_sum_count=as_sum_count,
    )
    vf_loss, vf_stats = value_loss(
        values,
        old_values,
        returns,
        value_mask,
        clip_eps=convention.value_clip_eps,
        aggregation=convention.loss_aggregation,
        as_sum_count=as_sum_count,
    )
    stats = {**pg_stats, **vf_stats}
    if convention.ratio_threshold is not None:
        skip = pg_stats["ratio_mean"] > convention.ratio_threshold
        stats["ratio_skipped"] = skip.astype(jnp.float32)
        if as_sum_count:
            pg_loss = SumCount(jnp.where(skip, 0.0, pg_loss.total), pg_loss.count)
            vf_loss = SumCount(jnp.where(skip, 0.0, vf_loss.total), vf_loss.count)
        else:
            pg_loss, vf_loss = jnp.where(skip, 0.0, pg_loss), jnp.where(skip, 0.0, vf_loss)
    return pg_loss, vf_loss, stats
