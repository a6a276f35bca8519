import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from hypothesis import given
from hypothesis import strategies as st

import ppojax
from batches import masked_batches, poison


def np_masked_mean(x, mask):
    valid = x[mask > 0]
    return float(valid.mean()) if valid.size else 0.0


def np_masked_var(x, mask, unbiased):
    valid = x[mask > 0].astype(np.float64)
    n = valid.size
    if n == 0:
        return 0.0
    ddof = 1 if (unbiased and n > 1) else 0
    return float(valid.var(ddof=ddof))


class StatsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(), st.booleans())
    def test_masked_mean_and_var_match_numpy(self, drawn, unbiased):
        rng, batch, width, mask = drawn
        x = rng.normal(size=(batch, width)).astype(np.float32) * 3 + 1
        mean = self.variant(ppojax.masked_mean)(poison(x, mask, rng), mask)
        var = self.variant(lambda x, m: ppojax.masked_var(x, m, unbiased=unbiased))(poison(x, mask, rng), mask)
        np.testing.assert_allclose(mean, np_masked_mean(x, mask), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(var, np_masked_var(x, mask, unbiased), rtol=1e-5, atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_masked_mean_per_row_with_empty_row(self):
        x = jnp.array([[1.0, 2.0, jnp.nan], [jnp.inf, 5.0, 7.0]])
        mask = jnp.array([[1, 1, 0], [0, 0, 0]])
        got = self.variant(lambda x, m: ppojax.masked_mean(x, m, axis=-1))(x, mask)
        np.testing.assert_array_equal(got, [1.5, 0.0])

    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(), st.booleans(), st.booleans())
    def test_whiten_standardises_valid_tokens(self, drawn, unbiased, shift_mean):
        rng, batch, width, mask = drawn
        x = (rng.normal(size=(batch, width)) * 2.5 + 4.0).astype(np.float32)
        fn = lambda x, m: ppojax.whiten(x, m, shift_mean=shift_mean, unbiased=unbiased)
        out = np.asarray(self.variant(fn)(poison(x, mask, rng), mask))
        valid = mask > 0
        assert np.all(np.isfinite(out))
        np.testing.assert_array_equal(out[~valid], 0.0)
        n = int(valid.sum())
        mean, var = np_masked_mean(x, mask), np_masked_var(x, mask, unbiased)
        expected = (x - mean) / np.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
        np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-4)
        if n >= 2 and var > 1e-3:
            centred = out[valid] - (mean if not shift_mean else 0.0)
            np.testing.assert_allclose(centred.mean(), 0.0, atol=1e-5)
            np.testing.assert_allclose(centred.var(ddof=1 if unbiased else 0), 1.0, rtol=1e-4)

    def test_whiten_eps_modes(self):
        x = jnp.array([[0.0, 1e-5, 0.0]])
        mask = jnp.array([[1, 1, 0]])
        var = np.var([0.0, 1e-5])  # 2.5e-11, far below eps
        added = ppojax.whiten(x, mask, unbiased=False, eps_mode="add")
        maxed = ppojax.whiten(x, mask, unbiased=False, eps_mode="max")
        np.testing.assert_allclose(added[0, 1], 0.5e-5 / np.sqrt(var + 1e-8), rtol=1e-3)
        np.testing.assert_allclose(maxed[0, 1], 0.5e-5 / np.sqrt(1e-8), rtol=1e-3)
        with self.assertRaisesRegex(ValueError, "eps_mode"):
            ppojax.whiten(x, mask, eps_mode="mul")

    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches())
    def test_masked_sum_count_max_match_numpy(self, drawn):
        rng, batch, width, mask = drawn
        x = rng.normal(size=(batch, width)).astype(np.float32) * 3 + 1
        poisoned = poison(x, mask, rng)
        valid = mask > 0
        for axis in (None, -1):
            total = self.variant(lambda x, m, a=axis: ppojax.masked_sum(x, m, axis=a))(poisoned, mask)
            count = self.variant(lambda m, a=axis: ppojax.masked_count(m, axis=a))(mask)
            best = self.variant(lambda x, m, a=axis: ppojax.masked_max(x, m, axis=a))(poisoned, mask)
            want_max = np.where(valid.any(axis=axis), np.where(valid, x, -np.inf).max(axis=axis), 0.0)
            np.testing.assert_allclose(total, np.where(valid, x, 0).sum(axis=axis), rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(count, valid.sum(axis=axis).astype(np.float32))
            np.testing.assert_array_equal(best, want_max.astype(np.float32))
            assert count.dtype == jnp.float32 and best.dtype == jnp.float32

    def test_bf16_inputs_give_float32(self):
        x = jnp.arange(6.0, dtype=jnp.bfloat16).reshape(2, 3)
        mask = jnp.ones((2, 3))
        assert ppojax.masked_mean(x, mask).dtype == jnp.float32
        assert ppojax.whiten(x, mask).dtype == jnp.float32

    def test_sum_count_adds_exactly(self):
        a = ppojax.SumCount(jnp.array(3.0), jnp.array(2.0))
        b = ppojax.SumCount(jnp.array(5.0), jnp.array(6.0))
        np.testing.assert_allclose((a + b).value(), 1.0)
        assert float(ppojax.SumCount(jnp.array(0.0), jnp.array(0.0)).value()) == 0.0


if __name__ == "__main__":
    absltest.main()
