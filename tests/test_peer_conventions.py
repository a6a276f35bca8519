"""The `openrlhf`, `verl` and `llamafactory` presets against the outputs of OpenRLHF's, verl's and TRL 0.9.6's own
functions.

tests/data/peer_conventions.npz holds what OpenRLHF 0.11.2 and verl 0.9.1 return on four hand-made batches
(written by experiments/parity/peer_conventions.py, which runs their code under torch; see its docstring for
the environment); tests/data/trl0_conventions.npz what TRL 0.9.6's PPOTrainer (LLaMA-Factory's PPO) returns on
the same batches (experiments/parity/trl0_conventions.py). tests/test_presets.py compares the presets with numpy transcriptions of the same systems;
this compares them with the systems themselves, so a misread of their code shows up here.
"""

import dataclasses
import os

import chex
import numpy as np
from absl.testing import absltest, parameterized

import ppojax
from presets_testing import batch_losses, run_preset

DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "peer_conventions.npz"))
TRL0 = np.load(os.path.join(os.path.dirname(__file__), "data", "trl0_conventions.npz"))
CASES = DATA["in/mask"].shape[0]


def case_inputs(case):
    return {k.split("/", 1)[1]: DATA[k][case] for k in DATA.files if k.startswith("in/")}


def peer(system, case):
    data = TRL0 if system == "trl0" else DATA
    return {k.split("/", 1)[1]: data[k][case] for k in data.files if k.startswith(system + "/")}


def micro_losses(convention, d):
    """ppo_losses of one micro-batch as the training step accumulates them (SumCount pairs)."""
    mask = d["mask"] > 0
    return batch_losses(convention, d, d["advantages"], d["returns"], mask, mask, as_sum_count=True)


def trl0_whitened_reward_advantages(rewards, values, mask, lam):
    """What TRL 0.9.6's compute_advantages does with whiten_rewards=True (float64 numpy, γ = 1): whitened
    `rewards * mask` keep non-zero padding, and the full-width GAE reads it."""
    mask = mask.astype(np.float64)
    count = mask.sum()
    r = rewards * mask
    mean = (r * mask).sum() / count
    var = (((r - mean) ** 2) * mask).sum() / count * count / (count - 1)
    r = (r - mean) / np.sqrt(var + 1e-8) + mean
    v = values * mask
    adv, last = np.zeros_like(r), 0.0
    for t in reversed(range(r.shape[1])):
        nextvalues = v[:, t + 1] if t + 1 < r.shape[1] else 0.0
        last = r[:, t] + nextvalues - v[:, t] + lam * last
        adv[:, t] = last
    mean = (adv * mask).sum() / count
    var = (((adv - mean) ** 2) * mask).sum() / count * count / (count - 1)
    return (adv - mean) / np.sqrt(var + 1e-8)


def assert_on_mask(actual, expected, mask, **tolerance):
    """The peers leave arbitrary values in padding slots; ppojax zeroes them. Compare where they are used."""
    mask = np.asarray(mask) > 0
    np.testing.assert_allclose(np.where(mask, actual, 0.0), np.where(mask, expected, 0.0), **tolerance)


class PeerConventionTest(chex.TestCase):
    def test_the_cases_exercise_the_clamps(self):
        # Guards the data's own premises: scores outside ±10, log-ratios beyond ±20 on valid tokens, rows of
        # several lengths (the controller-KL and aggregation modes only differ when lengths differ).
        scores = DATA["in/scores"]
        log_ratio = np.where(DATA["in/mask"] > 0, DATA["in/new_logprobs"] - DATA["in/logprobs"], 0)
        assert np.abs(scores).max() > 10 and np.abs(log_ratio).max() > 20
        assert len(set(DATA["in/mask"][0].sum(-1).tolist())) > 3

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*range(CASES))
    def test_openrlhf(self, case):
        d, ref = case_inputs(case), peer("openrlhf", case)
        convention = ppojax.get_preset("openrlhf")
        adv, pg_loss, vf_loss, stats = self.variant(run_preset, static_argnums=0)(convention, d)
        mask = d["mask"]
        for estimator in ("k1", "k2", "k3"):
            kl = self.variant(ppojax.kl_penalty, static_argnames=("estimator", "clamp"))(
                d["logprobs"], d["ref_logprobs"], estimator=estimator, clamp=convention.kl_clamp
            )
            np.testing.assert_allclose(kl, ref[f"kl_{estimator}"], rtol=1e-5, atol=1e-6, err_msg=estimator)
        assert_on_mask(adv.rewards, ref["rewards"], mask, rtol=1e-5, atol=1e-6)
        assert_on_mask(adv.advantages, ref["advantages"], mask, rtol=1e-4, atol=1e-5)
        assert_on_mask(adv.returns, ref["returns"], mask, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pg_loss, ref["pg_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["clipfrac"], ref["clipfrac"], rtol=1e-6)
        np.testing.assert_allclose(vf_loss, ref["vf_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(adv.controller_kl, ref["controller_kl"], rtol=1e-5, atol=1e-7)
        dual = dataclasses.replace(convention, dual_clip=3.0)
        _, pg_dual, _, _ = self.variant(run_preset, static_argnums=0)(dual, d)
        np.testing.assert_allclose(pg_dual, ref["pg_loss_dual_clip"], rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*range(CASES))
    def test_verl(self, case):
        d, ref = case_inputs(case), peer("verl", case)
        convention = ppojax.get_preset("verl")
        adv, pg_loss, vf_loss, stats = self.variant(run_preset, static_argnums=0)(convention, d)
        mask = d["mask"]
        # KL stays out of the reward by default: the rewards are the scores at the last response token.
        np.testing.assert_allclose(adv.rewards, ref["token_level_scores"], rtol=1e-6)
        assert_on_mask(adv.advantages, ref["advantages"], mask, rtol=1e-4, atol=1e-5)
        assert_on_mask(adv.returns, ref["returns"], mask, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pg_loss, ref["pg_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["clipfrac"], ref["clipfrac"], rtol=1e-6)
        np.testing.assert_allclose(stats["dual_clipfrac"], ref["dual_clipfrac"], rtol=1e-6)
        np.testing.assert_allclose(vf_loss, ref["vf_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["vf_clipfrac"], ref["vf_clipfrac"], rtol=1e-6)
        np.testing.assert_allclose(adv.controller_kl, ref["controller_kl"], rtol=1e-5, atol=1e-7)

        # use_kl_in_reward: β 0.001, k1 over the response mask; GAE on those rewards.
        with_kl = dataclasses.replace(convention, kl_in_reward=True)
        adv_kl, _, _, _ = self.variant(run_preset, static_argnums=0)(with_kl, d)
        assert_on_mask(adv_kl.rewards, ref["rewards_kl"], mask, rtol=1e-5, atol=1e-7)
        assert_on_mask(adv_kl.advantages, ref["advantages_kl"], mask, rtol=1e-4, atol=1e-5)
        assert_on_mask(adv_kl.returns, ref["returns_kl"], mask, rtol=1e-5, atol=1e-5)
        controller = ppojax.adaptive_kl_controller(convention.kl_coef, 6.0, 10000.0)
        update = self.variant(controller.update)
        coef = update(controller.init(), adv_kl.controller_kl, mask.shape[0]).coef
        np.testing.assert_allclose(coef, ref["adaptive_coef_after"], rtol=1e-6)

        for name, estimator in (("kl", "k1"), ("abs", "abs"), ("mse", "k2")):
            kl = self.variant(ppojax.kl_penalty, static_argnames="estimator")(
                d["logprobs"], d["ref_logprobs"], estimator=estimator
            )
            np.testing.assert_allclose(kl, ref[f"kl_{name}"], rtol=1e-5, atol=1e-6, err_msg=name)
        k3 = self.variant(ppojax.kl_penalty, static_argnames=("estimator", "clamp"))(
            d["logprobs"], d["ref_logprobs"], estimator="k3", clamp=10.0
        )
        np.testing.assert_allclose(k3, ref["kl_low_var_kl"], rtol=1e-5, atol=1e-6)

        for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            loss = self.variant(lambda x, m: ppojax.aggregate_loss(x, m, mode).value())(d["loss_mat"], mask)
            np.testing.assert_allclose(loss, ref[f"agg_{mode}"], rtol=1e-5, atol=1e-6, err_msg=mode)

    def test_trl0_data_uses_the_same_inputs(self):
        for name in ("mask", "scores", "logprobs", "ref_logprobs", "values", "new_logprobs", "new_values"):
            np.testing.assert_array_equal(TRL0[f"in/{name}"], DATA[f"in/{name}"])

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*range(CASES))
    def test_llamafactory_is_trl0(self, case):
        """TRL 0.9.6's PPOTrainer arithmetic, as LLaMA-Factory configures it."""
        d, ref = case_inputs(case), peer("trl0", case)
        convention = ppojax.get_preset("llamafactory")
        run = self.variant(run_preset, static_argnums=0)
        adv, pg_loss, vf_loss, stats = run(convention, d)
        mask = d["mask"]
        assert_on_mask(adv.rewards, ref["rewards"], mask, rtol=1e-5, atol=1e-6)
        assert_on_mask(adv.advantages, ref["advantages"], mask, rtol=1e-4, atol=1e-5)
        assert_on_mask(adv.returns, ref["returns"], mask, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pg_loss, ref["pg_loss"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(convention.vf_coef * vf_loss, ref["vf_loss_weighted"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats["clipfrac"], ref["clipfrac"], rtol=1e-6)  # skipped or not, as TRL logs it
        np.testing.assert_allclose(stats["vf_clipfrac"], ref["vf_clipfrac"], rtol=1e-6)
        np.testing.assert_allclose(adv.controller_kl, ref["controller_kl"], rtol=1e-5, atol=1e-6)
        controller = ppojax.kl_controller(convention)
        coef = self.variant(controller.update)(controller.init(), adv.controller_kl, mask.shape[0]).coef
        np.testing.assert_allclose(coef, ref["adaptive_coef_after"], rtol=1e-6)

        # Reward whitening: TRL 0.9.6 whitens `rewards * mask` and runs its full-width GAE on the result without
        # zeroing the padding again, so each padding slot carries −mean/std + mean into the advantages of the
        # shorter rows (TRL 1.x zeroes it; ppojax does too), and through the advantage whitening into every row.
        # The returns (before that whitening) of the rows that fill the width have no padding: equal.
        whitened, _, _, _ = run(convention.replace(whiten_rewards=True), d)
        full = mask.sum(1) == mask.shape[1]
        assert full.sum() == 2
        assert_on_mask(whitened.returns[full], ref["returns_whitened_rewards"][full], mask[full], rtol=1e-5, atol=1e-5)
        leak = trl0_whitened_reward_advantages(ref["rewards"], d["values"], mask, convention.lam)
        assert_on_mask(leak, ref["advantages_whitened_rewards"], mask, rtol=1e-4, atol=1e-5)
        assert np.abs(np.where(mask > 0, whitened.advantages - leak, 0)).max() > 1e-2

        # step(): micro-batches of 2 rows, each backpropagating pg + vf_coef · vf, averaged by the accumulation.
        micro = [
            {k: (v[s : s + 2] if np.ndim(v) else v) for k, v in d.items()} for s in range(0, d["mask"].shape[0], 2)
        ]
        pairs = []
        for part, start in zip(micro, range(0, d["mask"].shape[0], 2)):
            part = {**part, "advantages": adv.advantages[start : start + 2], "returns": adv.returns[start : start + 2]}
            pairs.append(self.variant(micro_losses, static_argnums=0)(convention, part))
        pg_total = sum(p[0].total for p in pairs) / sum(p[0].count for p in pairs)
        vf_total = sum(p[1].total for p in pairs) / sum(p[1].count for p in pairs)
        np.testing.assert_allclose(
            pg_total + convention.vf_coef * vf_total, ref["micro_total_loss"], rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose([p[0].value() for p in pairs], ref["micro_pg_losses"], rtol=1e-5, atol=1e-6)
        if case == 1:  # the micro-batches holding log-ratios of 23-25 are skipped, the middle one is not
            assert [float(p[2]["ratio_skipped"]) for p in pairs] == [1.0, 0.0, 1.0]

    def test_a_changed_detail_is_seen(self):
        # Negative controls: each detail the presets encode moves a compared output well beyond tolerance.
        d, ref = case_inputs(1), peer("verl", 1)
        base = ppojax.get_preset("verl")
        for changed in (
            dataclasses.replace(base, lam=0.95),
            dataclasses.replace(base, value_clip_eps=0.2),
            dataclasses.replace(base, dual_clip=None),
            dataclasses.replace(base, whiten_unbiased=False),
        ):
            adv, pg_loss, vf_loss, _ = run_preset(changed, d)
            got = np.array(
                [pg_loss, vf_loss, np.abs(np.where(d["mask"] > 0, adv.advantages - ref["advantages"], 0)).max()]
            )
            want = np.array([ref["pg_loss"], ref["vf_loss"], 0.0])
            assert np.abs(got - want).max() > 1e-3, changed


if __name__ == "__main__":
    absltest.main()
