"""The `openrlhf` and `verl` presets against the outputs of OpenRLHF's and verl's own functions.

tests/data/peer_conventions.npz holds what OpenRLHF 0.11.2 and verl 0.9.1 return on four hand-made batches
(written by experiments/parity/peer_conventions.py, which runs their code under torch; see its docstring for
the environment). tests/test_presets.py compares the presets with numpy transcriptions of the same systems;
this compares them with the systems themselves, so a misread of their code shows up here.
"""

import dataclasses
import os

import chex
import numpy as np
from absl.testing import absltest, parameterized

import ppojax
from presets_testing import run_preset

DATA = np.load(os.path.join(os.path.dirname(__file__), "data", "peer_conventions.npz"))
CASES = DATA["in/mask"].shape[0]


def case_inputs(case):
    return {k.split("/", 1)[1]: DATA[k][case] for k in DATA.files if k.startswith("in/")}


def peer(system, case):
    return {k.split("/", 1)[1]: DATA[k][case] for k in DATA.files if k.startswith(system + "/")}


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

        for mode in ppojax.LOSS_AGGREGATIONS:
            loss = self.variant(lambda x, m: ppojax.aggregate_loss(x, m, mode).value())(d["loss_mat"], mask)
            np.testing.assert_allclose(loss, ref[f"agg_{mode}"], rtol=1e-5, atol=1e-6, err_msg=mode)

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
