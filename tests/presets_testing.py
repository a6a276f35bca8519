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
    pg_loss, vf_loss, stats = ppojax.ppo_losses(
        convention,
        logprobs=d["new_logprobs"],
        old_logprobs=d["logprobs"],
        advantages=adv.advantages,
        values=d["new_values"],
        old_values=d["values"],
        returns=adv.returns,
        policy_mask=adv.policy_mask,
        value_mask=adv.value_mask,
    )
    return adv, pg_loss, vf_loss, stats
