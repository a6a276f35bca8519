import chex
import jax
import jax.numpy as jnp
import numpy as np
import rlax
from absl.testing import absltest
from hypothesis import given
from hypothesis import strategies as st

import ppojax
from batches import masked_batches, poison


def numpy_gae(rewards, values, mask, gamma, lam):
    """Plain loop: walk each row right to left over its valid tokens only."""
    advantages = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t] == 0:
                continue
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b, t]
            advantages[b, t] = next_adv
    returns = np.where(mask > 0, advantages + values, 0.0)
    return advantages, returns


_rlax_truncated_gae = jax.jit(rlax.truncated_generalized_advantage_estimation)


def rlax_gae(rewards, values, mask, gamma, lam):
    """rlax's truncated GAE on each row's valid tokens, bootstrapping from V = 0 after the last one."""
    advantages = np.zeros(rewards.shape, np.float64)
    for b in range(rewards.shape[0]):
        idx = np.nonzero(mask[b])[0]
        if idx.size == 0:
            continue
        r = jnp.asarray(rewards[b, idx], jnp.float32)
        v = jnp.concatenate([jnp.asarray(values[b, idx], jnp.float32), jnp.zeros(1)])
        advantages[b, idx] = _rlax_truncated_gae(r, jnp.full_like(r, gamma), lam, v)
    return advantages


def draw_inputs(drawn):
    rng, batch, width, mask = drawn
    rewards = rng.normal(size=(batch, width)).astype(np.float32)
    values = rng.normal(size=(batch, width)).astype(np.float32)
    return rng, mask, rewards, values


class GAETest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(max_width=12), st.floats(0.5, 1.0), st.floats(0.0, 1.0))
    def test_matches_numpy_loop_and_rlax(self, drawn, gamma, lam):
        rng, mask, rewards, values = draw_inputs(drawn)
        fn = self.variant(lambda r, v, m, g, l: ppojax.compute_gae(r, v, m, gamma=g, lam=l))
        # Poisoned padding must not leak into valid outputs.
        adv, ret = fn(poison(rewards, mask, rng), poison(values, mask, rng), mask, gamma, lam)
        ref_adv, ref_ret = numpy_gae(rewards, values, mask, gamma, lam)
        np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(adv, rlax_gae(rewards, values, mask, gamma, lam), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(adv)[mask == 0], 0.0)
        np.testing.assert_array_equal(np.asarray(ret)[mask == 0], 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(max_width=12), st.floats(0.5, 1.0))
    def test_lambda_one_is_returns_to_go_minus_values(self, drawn, gamma):
        rng, mask, rewards, values = draw_inputs(drawn)
        adv, ret = self.variant(lambda r, v, m: ppojax.compute_gae(r, v, m, gamma=gamma, lam=1.0))(
            rewards, values, mask
        )
        expected = np.zeros_like(rewards, dtype=np.float64)
        for b in range(rewards.shape[0]):
            idx = np.nonzero(mask[b])[0]
            for i, t in enumerate(idx):
                later = rewards[b, idx[i:]].astype(np.float64)
                expected[b, t] = np.sum(later * gamma ** np.arange(later.size)) - values[b, t]
        np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret, np.where(mask > 0, expected + values, 0.0), rtol=1e-5, atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(max_width=12), st.floats(0.5, 1.0))
    def test_lambda_zero_is_one_step_td_error(self, drawn, gamma):
        rng, mask, rewards, values = draw_inputs(drawn)
        adv, _ = self.variant(lambda r, v, m: ppojax.compute_gae(r, v, m, gamma=gamma, lam=0.0))(rewards, values, mask)
        expected = np.zeros_like(rewards, dtype=np.float64)
        for b in range(rewards.shape[0]):
            idx = np.nonzero(mask[b])[0]
            for i, t in enumerate(idx):
                next_value = values[b, idx[i + 1]] if i + 1 < idx.size else 0.0
                expected[b, t] = rewards[b, t] + gamma * next_value - values[b, t]
        np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)

    def test_hand_computed_case(self):
        # One row [r=1, r=0, r=2 | pad], V = [.5, .2, .1], γ=0.9, λ=0.5, by hand:
        # δ2 = 2 − .1 = 1.9;            A2 = 1.9
        # δ1 = 0 + .9·.1 − .2 = −.11;   A1 = −.11 + .45·1.9 = .745
        # δ0 = 1 + .9·.2 − .5 = .68;    A0 = .68 + .45·.745 = 1.01525
        adv, ret = ppojax.compute_gae(
            jnp.array([[1.0, 0.0, 2.0, 7.0]]),
            jnp.array([[0.5, 0.2, 0.1, 9.0]]),
            jnp.array([[1, 1, 1, 0]]),
            gamma=0.9,
            lam=0.5,
        )
        np.testing.assert_allclose(adv, [[1.01525, 0.745, 1.9, 0.0]], rtol=1e-6)
        np.testing.assert_allclose(ret, [[1.51525, 0.945, 2.0, 0.0]], rtol=1e-6)

    def test_bf16_inputs_are_computed_in_float32(self):
        rewards = jnp.ones((2, 5), jnp.bfloat16)
        adv, ret = ppojax.compute_gae(rewards, jnp.zeros((2, 5), jnp.bfloat16), jnp.ones((2, 5)), gamma=1.0, lam=0.95)
        assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32

    def test_gradient_is_finite_with_poisoned_padding(self):
        mask = jnp.array([[1.0, 1.0, 0.0]])
        values = jnp.array([[0.1, 0.2, jnp.nan]])
        g = jax.grad(lambda r: jnp.sum(ppojax.compute_gae(r, values, mask, gamma=1.0, lam=0.9)[0]))(jnp.ones((1, 3)))
        assert np.all(np.isfinite(g))
        np.testing.assert_allclose(g, [[1.0, 1.9, 0.0]], rtol=1e-6)


if __name__ == "__main__":
    absltest.main()
