"""Each preset against a plain numpy transcription of that system's published algorithm.

The transcriptions follow the structure of the original code (loops, fills, scatter of the score) rather
than ppojax's masked formulation, so the two can disagree if ppojax gets a convention wrong.
"""

import chex
import jax
import numpy as np
from absl.testing import absltest, parameterized

import ppojax
from presets_testing import run_preset

B, T = 4, 5
LENGTHS = np.array([5, 3, 1, 4])  # fills the width; stopped early; length 1; stopped early


def hand_batch(seed=0):
    rng = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < LENGTHS[:, None]).astype(np.float32)
    logprobs = (rng.normal(size=(B, T)) * 0.5 - 1.5).astype(np.float32)
    return dict(
        mask=mask,
        scores=np.array([1.5, -0.7, 12.0, 0.3], np.float32),  # 12 exercises OpenRLHF's score clamp
        logprobs=logprobs,
        ref_logprobs=(logprobs + rng.normal(size=(B, T)) * 0.3).astype(np.float32),
        values=rng.normal(size=(B, T)).astype(np.float32),
        new_logprobs=(logprobs + rng.normal(size=(B, T)) * 0.3).astype(np.float32),
        new_values=rng.normal(size=(B, T)).astype(np.float32),
        stopped=np.array([False, True, True, True]),
    )


def gae_full_width(rewards, values, gamma, lam):
    """The unmasked loop TRL, OpenRLHF and OpenAI share (padding already zeroed by the caller)."""
    lastgaelam, reversed_advs = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        nextvalues = values[:, t + 1] if t < rewards.shape[1] - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_advs.append(lastgaelam)
    advantages = np.stack(reversed_advs[::-1], axis=1)
    return advantages, advantages + values


def np_masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def np_masked_whiten(x, mask, shift_mean=True, unbiased=True):
    mean = np_masked_mean(x, mask)
    var = np_masked_mean((x - mean) ** 2, mask)
    if unbiased:
        var = var * mask.sum() / (mask.sum() - 1)
    out = (x - mean) / np.sqrt(var + 1e-8)
    return out if shift_mean else out + mean


def trl_reference(d, kl_coef=0.05, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2):
    """TRL 1.12 PPOTrainer (trl.experimental.ppo) — the N+ paper's code."""
    invalid_logprob = 1.0
    padding_mask = d["mask"] == 0
    sequence_lengths = d["mask"].sum(1).astype(int) - 1
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = np.arange(T)[None] > sequence_lengths_p1[:, None]
    logprobs = np.where(padding_mask, invalid_logprob, d["logprobs"]).astype(np.float64)
    ref_logprobs = np.where(padding_mask, invalid_logprob, d["ref_logprobs"])
    values = np.where(padding_mask_p1, 0.0, d["values"]).astype(np.float64)
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    actual_end = np.where(sequence_lengths_p1 < T, sequence_lengths_p1, sequence_lengths)
    rewards[np.arange(B), actual_end] += d["scores"]
    advantages, returns = gae_full_width(rewards, values, gamma, lam)
    advantages = np.where(padding_mask, 0.0, np_masked_whiten(advantages, ~padding_mask))
    # Losses on the first (only) minibatch.
    new_logprobs = np.where(padding_mask, invalid_logprob, d["new_logprobs"])
    vpred = d["new_values"]
    vpredclipped = np.clip(vpred, values - cliprange_value, values + cliprange_value)
    vf_max = np.maximum((vpred - returns) ** 2, (vpredclipped - returns) ** 2)
    vf_loss = 0.5 * np_masked_mean(vf_max, ~padding_mask_p1)
    ratio = np.exp(new_logprobs - logprobs)
    pg_max = np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 1 - cliprange, 1 + cliprange))
    pg_loss = np_masked_mean(pg_max, ~padding_mask)
    return dict(
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        policy_mask=~padding_mask,
        value_mask=~padding_mask_p1,
        controller_kl=kl.sum(1).mean(),
    )


def openrlhf_reference(d, kl_coef=0.01, gamma=1.0, lambd=1.0, clip_eps=0.2, value_clip=0.5):
    """OpenRLHF 0.11: compute_reward, get_advantages_and_returns, buffer normalisation, Policy/ValueLoss."""
    action_mask = d["mask"]
    log_ratio = (d["logprobs"].astype(np.float64) - d["ref_logprobs"]) * action_mask
    kl = np.clip(log_ratio, -10, 10)
    r = np.clip(d["scores"], -10, 10)
    kl_reward = -kl_coef * kl
    eos_indices = action_mask.shape[1] - 1 - np.argmax(action_mask[:, ::-1], axis=1)
    last_reward = np.zeros_like(kl)
    last_reward[np.arange(B), eos_indices] = r
    reward = last_reward + kl_reward
    values = action_mask * d["values"]
    rewards = action_mask * reward
    advantages, returns = gae_full_width(rewards, values, gamma, lambd)
    num = action_mask.sum()
    mean = (advantages * action_mask).sum() / num
    var = (((advantages - mean) ** 2) * action_mask).sum() / num
    advantages = (advantages - mean) / np.sqrt(max(var, 1e-8))
    ratio = np.exp(np.clip(d["new_logprobs"].astype(np.float64) - d["logprobs"], -20.0, 20.0))
    surr1, surr2 = ratio * advantages, np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * advantages
    pg_loss = np_masked_mean(-np.minimum(surr1, surr2), action_mask)
    old_values = d["values"]
    values_clipped = old_values + np.clip(d["new_values"] - old_values, -value_clip, value_clip)
    vf = np.maximum((values_clipped - returns) ** 2, (d["new_values"] - returns) ** 2)
    vf_loss = 0.5 * np_masked_mean(vf, action_mask)
    mask = action_mask > 0
    return dict(
        rewards=reward,
        advantages=advantages,
        returns=returns,
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        policy_mask=mask,
        value_mask=mask,
        # ppo_trainer feeds kl_ctl the experiences' per-sample kl info (each row's masked mean), sample-weighted.
        controller_kl=np.mean((kl * action_mask).sum(1) / action_mask.sum(1)),
    )


def verl_reference(d, gamma=1.0, lam=1.0, clip_ratio=0.2, clip_ratio_c=3.0, cliprange_value=0.5, kl_coef=None):
    """verl 0.9 core_algos: scores at the last attention-mask position; KL kept out of the reward unless
    `kl_coef` is given (use_kl_in_reward, apply_kl_penalty with the k1 estimator); clip_ratio_c=None drops
    the dual clip."""
    response_mask = d["mask"]
    scores = np.zeros((B, T))
    last = response_mask.sum(-1).astype(int) - 1
    scores[np.arange(B), last] = d["scores"]
    token_level_rewards = scores
    if kl_coef is not None:
        kld = (d["logprobs"].astype(np.float64) - d["ref_logprobs"]) * response_mask
        token_level_rewards = scores - kl_coef * kld
    values = d["values"].astype(np.float64)
    nextvalues, lastgaelam, reversed_advs = 0.0, 0.0, []
    for t in reversed(range(T)):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        reversed_advs.append(lastgaelam)
    advantages = np.stack(reversed_advs[::-1], axis=1)
    returns = advantages + values
    advantages = np_masked_whiten(advantages, response_mask)
    negative_approx_kl = np.clip(d["new_logprobs"].astype(np.float64) - d["logprobs"], -20.0, 20.0)
    ratio = np.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * np.clip(ratio, 1 - clip_ratio, 1 + clip_ratio)
    clip_pg_losses1 = np.maximum(pg_losses1, pg_losses2)
    if clip_ratio_c is None:
        pg_losses = clip_pg_losses1
    else:
        pg_losses3 = -advantages * clip_ratio_c
        clip_pg_losses2 = np.minimum(pg_losses3, clip_pg_losses1)
        pg_losses = np.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = np_masked_mean(pg_losses, response_mask)
    vpreds = d["new_values"]
    vpredclipped = np.clip(vpreds, values - cliprange_value, values + cliprange_value)
    vf = np.maximum((vpreds - returns) ** 2, (vpredclipped - returns) ** 2)
    vf_loss = 0.5 * np_masked_mean(vf, response_mask)
    kl = (d["logprobs"].astype(np.float64) - d["ref_logprobs"]) * response_mask
    mask = response_mask > 0
    return dict(
        rewards=token_level_rewards,
        advantages=advantages,
        returns=returns,
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        policy_mask=mask,
        value_mask=mask,
        # apply_kl_penalty: masked_mean(kld, response_mask, axis=-1), then the mean over the batch.
        controller_kl=np.mean((kl * response_mask).sum(1) / (response_mask.sum(1) + 1e-8)),
    )


def openai_reference(
    d, kl_coef=0.15, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, penalty_reward_value=-1.0
):
    """OpenAI lm-human-preferences train_policy.py: fixed-width responses, no masks, TF-style whitening."""
    scores = np.where(d["stopped"], d["scores"], penalty_reward_value)
    kl = d["logprobs"].astype(np.float64) - d["ref_logprobs"]
    rewards = -kl_coef * kl
    rewards[:, -1] += scores
    values = d["values"].astype(np.float64)
    advantages, returns = gae_full_width(rewards, values, gamma, lam)
    mean, var = advantages.mean(), advantages.var()  # tf.nn.moments: population variance
    advantages = (advantages - mean) / np.sqrt(var + 1e-8)
    ratio = np.exp(d["new_logprobs"].astype(np.float64) - d["logprobs"])
    pg_loss = np.mean(np.maximum(-advantages * ratio, -advantages * np.clip(ratio, 1 - cliprange, 1 + cliprange)))
    vpred = d["new_values"]
    vpredclipped = np.clip(vpred, values - cliprange_value, values + cliprange_value)
    vf_loss = 0.5 * np.mean(np.maximum((vpred - returns) ** 2, (vpredclipped - returns) ** 2))
    full = np.ones((B, T), bool)
    return dict(
        rewards=rewards,
        advantages=advantages,
        returns=returns,
        pg_loss=pg_loss,
        vf_loss=vf_loss,
        policy_mask=full,
        value_mask=full,
        controller_kl=kl.sum(1).mean(),
    )


REFERENCES = {
    "trl": trl_reference,
    "openrlhf": openrlhf_reference,
    "verl": verl_reference,
    "openai": openai_reference,
}


class PresetTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*REFERENCES)
    def test_preset_matches_its_system(self, name):
        convention = ppojax.get_preset(name)
        for seed in range(3):
            d = hand_batch(seed)
            adv, pg_loss, vf_loss, _ = self.variant(run_preset, static_argnums=0)(convention, d)
            ref = REFERENCES[name](d)
            np.testing.assert_array_equal(adv.policy_mask, ref["policy_mask"])
            np.testing.assert_array_equal(adv.value_mask, ref["value_mask"])
            np.testing.assert_allclose(adv.rewards, ref["rewards"], rtol=1e-5, atol=1e-6)
            policy, value = ref["policy_mask"], ref["value_mask"]
            # The peers leave arbitrary values at padding; ppojax zeroes it. Compare where they are used.
            np.testing.assert_allclose(
                np.where(policy, adv.advantages, 0), np.where(policy, ref["advantages"], 0), rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(
                np.where(value, adv.returns, 0), np.where(value, ref["returns"], 0), rtol=1e-5, atol=1e-5
            )
            np.testing.assert_allclose(pg_loss, ref["pg_loss"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(vf_loss, ref["vf_loss"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(adv.controller_kl, ref["controller_kl"], rtol=1e-5, atol=1e-6)

    def test_presets_really_differ(self):
        d = hand_batch(0)
        losses = {name: run_preset(ppojax.get_preset(name), d)[1:3] for name in ppojax.PRESETS}
        distinct = {(round(float(p), 6), round(float(v), 6)) for p, v in losses.values()}
        assert len(distinct) == len(losses), losses

    @chex.variants(with_jit=True, without_jit=True)
    def test_ppojax_default(self):
        # ppojax's own default is verl's masked algorithm with KL (k1, β 0.05) in the reward, λ 0.95,
        # no dual clip and value clip 0.2; the log-ratio clamp at 20 is verl's too.
        convention = ppojax.get_preset("ppojax")
        for seed in range(3):
            d = hand_batch(seed)
            adv, pg_loss, vf_loss, _ = self.variant(run_preset, static_argnums=0)(convention, d)
            ref = verl_reference(d, lam=0.95, clip_ratio_c=None, cliprange_value=0.2, kl_coef=0.05)
            mask = d["mask"] > 0
            np.testing.assert_allclose(adv.rewards, ref["rewards"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(adv.advantages, np.where(mask, ref["advantages"], 0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(adv.returns, np.where(mask, ref["returns"], 0), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(pg_loss, ref["pg_loss"], rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(vf_loss, ref["vf_loss"], rtol=1e-5, atol=1e-6)

    def test_unknown_preset_and_bad_convention(self):
        with self.assertRaisesRegex(ValueError, "unknown preset 'tlr'"):
            ppojax.get_preset("tlr")
        with self.assertRaisesRegex(ValueError, "score_placement"):
            ppojax.Convention(name="x", score_placement="first")

    def test_openai_needs_stopped(self):
        d = hand_batch(0)
        with self.assertRaisesRegex(ValueError, "`stopped`"):
            ppojax.assemble_advantages(
                ppojax.get_preset("openai"),
                scores=d["scores"],
                logprobs=d["logprobs"],
                ref_logprobs=d["ref_logprobs"],
                values=d["values"],
                response_mask=d["mask"],
            )

    def test_adaptive_controller_consumes_controller_kl(self):
        d = hand_batch(0)
        convention = ppojax.get_preset("openai")
        controller = ppojax.adaptive_kl_controller(convention.kl_coef, convention.kl_target, convention.kl_horizon)
        state = controller.init()
        adv = ppojax.assemble_advantages(
            convention,
            kl_coef=state.coef,
            scores=d["scores"],
            logprobs=d["logprobs"],
            ref_logprobs=d["ref_logprobs"],
            values=d["values"],
            response_mask=d["mask"],
            stopped=d["stopped"],
        )
        state = jax.jit(controller.update)(state, adv.controller_kl, B)
        kl_seq = float(np.mean(np.sum(d["logprobs"] - d["ref_logprobs"], axis=1)))
        np.testing.assert_allclose(state.coef, 0.15 * (1 + np.clip(kl_seq / 6 - 1, -0.2, 0.2) * B / 10000), rtol=1e-6)


if __name__ == "__main__":
    absltest.main()
