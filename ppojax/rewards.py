"""Per-token reward assembly: KL penalty on every token, the sequence score on one."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ppojax.stats import as_bool_mask, as_f32, check_same_shape, masked_count

SCORE_PLACEMENTS = ("last", "after_last", "final")
LENGTH_REWARDS = ("none", "penalty", "sqrt")


def last_valid_index(mask: jax.Array) -> jax.Array:
    """[B, T] mask -> [B] int32 index of the last valid token, −1 for a row with none."""
    mask = as_bool_mask(mask)
    positions = jnp.arange(mask.shape[-1], dtype=jnp.int32)
    return jnp.max(jnp.where(mask, positions, -1), axis=-1)


def extend_mask(mask: jax.Array) -> jax.Array:
    """The mask plus the one slot after each row's last valid token (when it fits in the width).

    TRL / the N+ paper score a response one slot after its stop token and train the value function on that
    slot too: their value mask is this extended mask. An empty row gains slot 0.
    """
    mask = as_bool_mask(mask)
    width = mask.shape[-1]
    after = last_valid_index(mask) + 1
    extra = jax.nn.one_hot(after, width, dtype=jnp.bool_)  # all False when after == width
    return mask | extra


def score_index(mask: jax.Array, placement: str = "last") -> jax.Array:
    """[B] column where each sequence's score is added.

    "last": the last valid token (OpenRLHF, verl; the EOS token of a stopped response), −1 for an empty row
      (the score is then dropped: there is no token to credit).
    "after_last": the slot after the last valid token, or the last column when the response fills the width
      (TRL's PPOTrainer, the N+ paper); pair it with `extend_mask` as the value mask.
    "final": the last column of a fixed-width response (OpenAI lm-human-preferences).
    """
    width = jnp.shape(mask)[-1]
    if placement == "last":
        return last_valid_index(mask)
    if placement == "after_last":
        return jnp.minimum(last_valid_index(mask) + 1, width - 1)
    if placement == "final":
        return jnp.full(jnp.shape(mask)[:-1], width - 1, jnp.int32)
    raise ValueError(f"score_index: placement must be one of {SCORE_PLACEMENTS}, got {placement!r}")


def length_aware_scores(
    scores: jax.Array, lengths: jax.Array, *, mode: str = "none", penalty: float | jax.Array = 0.0
) -> jax.Array:
    """Sequence scores corrected for response length, against reward models that learnt "longer is better".

        none:     s
        penalty:  s − penalty · L
        sqrt:     s / √max(L, 1)

    Args:
      scores: [B] sequence scores. lengths: [B] response lengths in tokens (the stop token included).
      mode: one of "none", "penalty", "sqrt". penalty: c in the "penalty" mode.

    "sqrt" shrinks a positive score the longer the response, but makes a negative score *less* negative:
    with a reward model centred on 0 it rewards length for bad answers. Use it on positive scores, or use
    "penalty".

    Returns:
      [B] float32.
    """
    scores, lengths = as_f32(scores), as_f32(lengths)
    if jnp.shape(scores) != jnp.shape(lengths):
        raise ValueError(
            f"length_aware_scores: scores has shape {jnp.shape(scores)} but lengths {jnp.shape(lengths)}; expected one length per score"
        )
    if mode == "none":
        return scores
    if mode == "penalty":
        return scores - as_f32(penalty) * lengths
    if mode == "sqrt":
        return scores / jnp.sqrt(jnp.maximum(lengths, 1.0))
    raise ValueError(f"length_aware_scores: mode must be one of {LENGTH_REWARDS}, got {mode!r}")


def adjust_scores(
    scores: jax.Array,
    mask: jax.Array,
    *,
    stopped: Optional[jax.Array] = None,
    missing_eos_penalty: Optional[float] = None,
    missing_eos_score: Optional[float] = None,
    length_penalty: float = 0.0,
    score_clip: Optional[float] = None,
    length_reward: Optional[str] = None,
    lengths: Optional[jax.Array] = None,
) -> jax.Array:
    """Sequence-level score adjustments, applied in this order:

    1. responses that did not stop (`stopped` False): the score is replaced by `missing_eos_score`
       (OpenAI's "score := −1") or lowered by `missing_eos_penalty` (TRL's `missing_eos_penalty`);
    2. the length term (`length_aware_scores`): `length_reward` "penalty" (score −= length_penalty · length),
       "sqrt" (score /= √length) or "none"; None means "penalty" when length_penalty is non-zero;
    3. clipped to [−score_clip, score_clip] (OpenRLHF clamps to ±10).

    Args:
      scores: [B] reward-model (or programmatic) scores.
      mask: [B, T] response mask (the lengths, unless `lengths` is given).
      stopped: [B] bool, whether each response emitted a stop token. Required with a missing-EOS option.
      lengths: optional [B] response lengths (e.g. the real lengths when the loss mask is the full width).
    Returns:
      [B] float32.
    """
    scores = as_f32(scores)
    if missing_eos_penalty is not None or missing_eos_score is not None:
        if stopped is None:
            raise ValueError(
                "adjust_scores: `stopped` ([B] bool) is required with missing_eos_penalty / missing_eos_score"
            )
        if missing_eos_penalty is not None and missing_eos_score is not None:
            raise ValueError("adjust_scores: give missing_eos_penalty or missing_eos_score, not both")
        stopped = as_bool_mask(stopped)
        if missing_eos_score is not None:
            scores = jnp.where(stopped, scores, missing_eos_score)
        else:
            scores = jnp.where(stopped, scores, scores - missing_eos_penalty)
    mode = length_reward if length_reward is not None else ("penalty" if length_penalty else "none")
    if mode != "none":
        lengths = masked_count(mask, axis=-1) if lengths is None else lengths
        scores = length_aware_scores(scores, lengths, mode=mode, penalty=length_penalty)
    if score_clip is not None:
        scores = jnp.clip(scores, -score_clip, score_clip)
    return scores


def shape_rewards(
    scores: jax.Array,
    kl: jax.Array,
    mask: jax.Array,
    *,
    kl_coef: float | jax.Array,
    score_placement: str = "last",
    stopped: Optional[jax.Array] = None,
    missing_eos_penalty: Optional[float] = None,
    missing_eos_score: Optional[float] = None,
    length_penalty: float = 0.0,
    score_clip: Optional[float] = None,
    length_reward: Optional[str] = None,
    lengths: Optional[jax.Array] = None,
) -> jax.Array:
    """Per-token rewards r_t = −kl_coef · kl_t on valid tokens, plus the sequence score at one token.

    Args:
      scores: [B] sequence scores.
      kl: [B, T] per-token KL estimates (`kl_penalty`); only valid positions are used.
      mask: [B, T] response mask (1 on response tokens, the stop token included).
      kl_coef: β, a float or a traced scalar (from a KL controller).
      score_placement: "last" (default), "after_last" or "final"; see `score_index`.
      stopped, missing_eos_penalty, missing_eos_score, length_penalty, score_clip, length_reward, lengths:
        see `adjust_scores`.

    Returns:
      [B, T] float32 rewards. Positions outside the mask are 0, except the score's own slot under
      "after_last" / "final" placements, which may lie one past the response.
    """
    check_same_shape("shape_rewards", rank=2, kl=kl, mask=mask)
    if jnp.shape(scores) != jnp.shape(mask)[:1]:
        raise ValueError(
            f"shape_rewards: scores has shape {jnp.shape(scores)}; expected ({jnp.shape(mask)[0]},), one score per row of mask"
        )
    scores = adjust_scores(
        scores,
        mask,
        stopped=stopped,
        missing_eos_penalty=missing_eos_penalty,
        missing_eos_score=missing_eos_score,
        length_penalty=length_penalty,
        score_clip=score_clip,
        length_reward=length_reward,
        lengths=lengths,
    )
    mask = as_bool_mask(mask)
    rewards = jnp.where(mask, -as_f32(kl_coef) * as_f32(kl), 0.0)
    at_score = jax.nn.one_hot(score_index(mask, score_placement), mask.shape[-1], dtype=jnp.bool_)
    return rewards + jnp.where(at_score, scores[:, None], 0.0)
