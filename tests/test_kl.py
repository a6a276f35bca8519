import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest, parameterized
from hypothesis import given
from hypothesis import strategies as st

import ppojax
from batches import masked_batches, poison

NUMPY_ESTIMATORS = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * d**2,
    "k3": lambda d: np.exp(-d) - 1 + d,
    "abs": np.abs,
}


class KLPenaltyTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(), st.sampled_from(sorted(NUMPY_ESTIMATORS)), st.sampled_from([None, 0.5, 10.0]))
    def test_estimators_match_formulas(self, drawn, estimator, clamp):
        rng, batch, width, mask = drawn
        logp = rng.normal(size=(batch, width)).astype(np.float32) - 2
        ref = rng.normal(size=(batch, width)).astype(np.float32) - 2
        fn = functools.partial(ppojax.kl_penalty, estimator=estimator, clamp=clamp)
        got = self.variant(lambda a, b, m: fn(a, b, mask=m))(poison(logp, mask, rng), ref, mask)
        expected = NUMPY_ESTIMATORS[estimator](logp.astype(np.float64) - ref)
        if clamp is not None:
            expected = np.clip(expected, -clamp, clamp)
        expected = np.where(mask > 0, expected, 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    @given(st.floats(-30, 30))
    def test_k3_is_non_negative(self, d):
        k3 = ppojax.kl_penalty(jnp.array([[d]]), jnp.array([[0.0]]), estimator="k3")
        assert float(k3[0, 0]) >= 0.0

    @parameterized.parameters("k1", "k3")
    def test_unbiased_estimators_approach_true_kl_on_samples(self, estimator):
        key_p, key_q, key_s = jax.random.split(jax.random.PRNGKey(0), 3)
        vocab = 6
        logp = jax.nn.log_softmax(jax.random.normal(key_p, (vocab,)))
        logq = jax.nn.log_softmax(jax.random.normal(key_q, (vocab,)))
        true_kl = float(jnp.sum(jnp.exp(logp) * (logp - logq)))
        samples = jax.random.categorical(key_s, logp, shape=(200, 500))
        est = ppojax.kl_penalty(logp[samples], logq[samples], estimator=estimator)
        per_sample_std = float(jnp.std(est))
        standard_error = per_sample_std / np.sqrt(est.size)
        assert abs(float(jnp.mean(est)) - true_kl) < 5 * standard_error, (float(jnp.mean(est)), true_kl)

    def test_unknown_estimator(self):
        with self.assertRaisesRegex(ValueError, "estimator must be one of"):
            ppojax.kl_penalty(jnp.zeros((1, 1)), jnp.zeros((1, 1)), estimator="k4")


class FullKLTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(max_batch=3, max_width=4), st.sampled_from([1.0, 0.7]))
    def test_matches_numpy(self, drawn, temperature):
        rng, batch, width, mask = drawn
        logits = rng.normal(size=(batch, width, 7)).astype(np.float32) * 3
        ref_logits = rng.normal(size=(batch, width, 7)).astype(np.float32) * 3
        got = self.variant(lambda a, b, m: ppojax.kl_from_logits(a, b, m, temperature=temperature))(
            logits, ref_logits, mask
        )
        lp = logits / temperature - np.log(np.sum(np.exp(logits / temperature), -1, keepdims=True))
        lq = ref_logits / temperature - np.log(np.sum(np.exp(ref_logits / temperature), -1, keepdims=True))
        expected = np.where(mask > 0, np.sum(np.exp(lp) * (lp - lq), -1), 0.0)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(got) >= -1e-6)

    def test_extreme_logits_stay_finite(self):
        logits = jnp.array([[[0.0, -1e30, 5.0]]])
        ref_logits = jnp.array([[[0.0, 3.0, -1e30]]])
        kl = ppojax.kl_from_logits(logits, ref_logits)
        # π puts ~0.99 of its mass where π_ref has logit −1e30: KL ≈ 0.99e30, finite, not NaN.
        np.testing.assert_allclose(kl, 0.9933e30, rtol=1e-3)
        kl_self = ppojax.kl_from_logits(logits, logits)
        np.testing.assert_allclose(kl_self, 0.0, atol=1e-6)


def trl_adaptive_controller(init_kl_coef, target, horizon, observations):
    """Plain transcription of the published AdaptiveKLController (Ziegler et al.; old TRL)."""
    value, out = init_kl_coef, []
    for current, n_steps in observations:
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        value *= 1 + proportional_error * n_steps / horizon
        out.append(value)
    return out


class KLControllerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(1, 512)), min_size=1, max_size=12))
    def test_adaptive_follows_formula_step_by_step(self, observations):
        controller = ppojax.adaptive_kl_controller(0.2, target=6.0, horizon=10000)
        update = self.variant(controller.update)
        state = controller.init()
        expected = trl_adaptive_controller(0.2, 6.0, 10000, observations)
        for (kl, n), want in zip(observations, expected):
            state = update(state, jnp.float32(kl), jnp.int32(n))
            np.testing.assert_allclose(state.coef, want, rtol=1e-5)

    def test_fixed_never_moves_and_state_is_a_pytree(self):
        controller = ppojax.fixed_kl_controller(0.05)
        state = jax.jit(controller.update)(controller.init(), jnp.float32(100.0), jnp.int32(64))
        np.testing.assert_allclose(state.coef, 0.05)
        assert len(jax.tree.leaves(state)) == 1

    def test_bad_target(self):
        with self.assertRaisesRegex(ValueError, "target must be > 0"):
            ppojax.adaptive_kl_controller(0.1, target=0.0, horizon=10)

    def test_sequence_kl_sums_valid_tokens(self):
        kl = np.array([[0.5, -0.25, np.nan, np.inf], [2.0, 1.0, 1.0, -1.0], [np.nan, 3.0, 3.0, 3.0]], np.float32)
        mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
        for fn in (ppojax.sequence_kl, jax.jit(ppojax.sequence_kl)):
            got = fn(kl, mask)
            assert got.shape == (3,) and got.dtype == jnp.float32
            np.testing.assert_allclose(got, [0.25, 3.0, 0.0])

    def test_controller_kl_modes(self):
        kl = jnp.array([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
        mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # the last row has no valid token
        for fn in (ppojax.kl_for_controller, jax.jit(ppojax.kl_for_controller, static_argnames="mode")):
            np.testing.assert_allclose(fn(kl, mask, mode="seq_sum"), (3.0 + 3.0 + 0.0) / 3)
            np.testing.assert_allclose(fn(kl, mask, mode="token_mean"), 6.0 / 3)
            # verl / OpenRLHF: each row's token mean (1.5 and 3.0), averaged over the rows that have tokens.
            np.testing.assert_allclose(fn(kl, mask, mode="seq_mean"), (1.5 + 3.0) / 2)
            np.testing.assert_allclose(fn(kl, jnp.zeros_like(mask), mode="seq_mean"), 0.0)
        with self.assertRaisesRegex(ValueError, "mode must be one of .*'seq_mean'.*got 'mean'"):
            ppojax.kl_for_controller(kl, mask, mode="mean")
        with self.assertRaisesRegex(ValueError, "controller_kl must be one of"):
            ppojax.Convention(name="x", controller_kl="token")
        with self.assertRaisesRegex(ValueError, "kl_estimator must be one of"):
            ppojax.Convention(name="x", kl_estimator="k4")


def hand_step_rule(init_coef, target, observations):
    """The step rule as practitioners write it: a plain Python loop."""
    beta, out = init_coef, []
    for kl in observations:
        if kl > target * 1.5:
            beta *= 1.5
        elif kl < target * 0.5:
            beta *= 0.75
        out.append(beta)
    return out


class StepKLControllerTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(st.lists(st.floats(0.0, 30.0), min_size=1, max_size=12), st.sampled_from([1, 64]))
    def test_follows_hand_loop_step_by_step(self, observations, n_steps):
        controller = ppojax.step_kl_controller(0.05, target=6.0)
        update = self.variant(controller.update)
        state = controller.init()
        for kl, want in zip(observations, hand_step_rule(0.05, 6.0, observations)):
            state = update(state, jnp.float32(kl), jnp.int32(n_steps))
            np.testing.assert_allclose(state.coef, want, rtol=1e-5)

    def test_band_edges_and_non_finite_kl(self):
        controller = ppojax.step_kl_controller(0.1, target=4.0)
        update = jax.jit(controller.update)
        cases = {9.0: 0.15, 6.0: 0.1, 4.0: 0.1, 2.0: 0.1, 1.99: 0.075, float("nan"): 0.1}
        for kl, want in cases.items():
            state = update(controller.init(), jnp.float32(kl), jnp.int32(8))
            np.testing.assert_allclose(state.coef, want, rtol=1e-6, err_msg=f"kl={kl}")

    def test_bad_arguments(self):
        with self.assertRaisesRegex(ValueError, "target must be > 0"):
            ppojax.step_kl_controller(0.1, target=-1.0)
        with self.assertRaisesRegex(ValueError, "low <= high"):
            ppojax.step_kl_controller(0.1, target=1.0, low=2.0, high=1.5)
        with self.assertRaisesRegex(ValueError, "decrease"):
            ppojax.step_kl_controller(0.1, target=1.0, decrease=1.5)


class ControllerSelectionTest(parameterized.TestCase):
    # kl 20 against target 6: the proportional rule moves β by (1 + 0.2 · 64 / 10000), the step rule by 1.5.
    @parameterized.parameters(
        (False, "proportional", 0.05),
        (False, "step", 0.05),
        (True, "proportional", 0.05 * (1 + 0.2 * 64 / 10000)),
        (True, "step", 0.075),
    )
    def test_convention_selects_controller(self, adaptive, rule, want):
        convention = ppojax.get_preset("ppojax").replace(adaptive_kl=adaptive, kl_rule=rule, kl_coef=0.05)
        controller = ppojax.kl_controller(convention)
        state = controller.update(controller.init(), jnp.float32(20.0), jnp.float32(64))
        np.testing.assert_allclose(state.coef, want, rtol=1e-6)

    def test_unknown_rule(self):
        with self.assertRaisesRegex(ValueError, "kl_rule must be one of"):
            ppojax.get_preset("ppojax").replace(kl_rule="pid")
        with self.assertRaisesRegex(ValueError, "rule must be one of"):
            ppojax.make_kl_controller(adaptive=True, init_coef=0.1, rule="pid")


if __name__ == "__main__":
    absltest.main()
