"""Shared by the preset tests: one convention applied to a batch given as a dict of arrays."""

import ppojax


def run_preset(convention, d):
    """assemble_advantages then ppo_losses on d's rollout fields (mask, scores, logprobs, ref_logprobs, values,
    optional stopped) and its new_logprobs / new_values. Returns (advantages, pg_loss, vf_loss, stats)."""
    adv = ppojax.assemble_advantages(
        convention,
        scores=d["scores"],
        logprobs=d["logprobs"],
        ref_logprobs=d["ref_logprobs"],
        values=d["values"],
        response_mask=d["mask"],
        stopped=d.get("stopped"),
    )
    pg_loss, vf_loss, stats = batch_losses(convention, d, adv.advantages, adv.returns, adv.policy_mask, adv.value_mask)
    return adv, pg_loss, vf_loss, stats


def batch_losses(convention, d, advantages, returns, policy_mask, value_mask, as_sum_count=False):
    """ppo_losses on d's new_logprobs / new_values against its rollout logprobs / values."""
    return ppojax.ppo_losses(
        convention,
        logprobs=d["new_logprobs"],
        old_logprobs=d["logprobs"],
        advantages=advantages,
        values=d["new_values"],
        old_values=d["values"],
        returns=returns,
        policy_mask=policy_mask,
        value_mask=value_mask,
        as_sum_count=as_sum_count,
    )
