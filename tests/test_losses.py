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


def np_aggregate(per_token, mask, mode):
    valid = mask > 0
    rows = [b for b in range(mask.shape[0]) if valid[b].any()]
    if mode in ("token-mean", "micro-token-mean"):  # one call is one micro-batch
        return per_token[valid].sum() / valid.sum() if valid.any() else 0.0
    if not rows:
        return 0.0
    if mode == "seq-mean-token-mean":
        return np.mean([per_token[b][valid[b]].mean() for b in rows])
    if mode == "seq-mean-token-sum":
        return np.mean([per_token[b][valid[b]].sum() for b in rows])
    if mode == "seq-mean-token-sum-norm":
        return per_token[valid].sum() / (len(rows) * mask.shape[1])
    raise ValueError(mode)


def np_clipped_per_token(logp, old, adv, eps_low, eps_high, dual_clip=None, log_ratio_clamp=None):
    log_ratio = logp.astype(np.float64) - old
    if log_ratio_clamp is not None:
        log_ratio = np.clip(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = np.exp(log_ratio)
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))
    if dual_clip is not None:
        loss = np.where(adv < 0, np.minimum(loss, -dual_clip * adv), loss)
    return loss, ratio


def draw_policy_batch(drawn):
    rng, batch, width, mask = drawn
    old = (rng.normal(size=(batch, width)) - 2).astype(np.float32)
    logp = (old + rng.normal(size=(batch, width)) * 0.4).astype(np.float32)
    adv = rng.normal(size=(batch, width)).astype(np.float32)
    return rng, mask, logp, old, adv


class ClippedLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(
        masked_batches(),
        st.sampled_from(ppojax.LOSS_AGGREGATIONS),
        st.floats(0.05, 0.4),
        st.sampled_from([None, 0.28]),
        st.sampled_from([None, 3.0]),
        st.sampled_from([None, 0.3]),
    )
    def test_matches_formula(self, drawn, aggregation, clip_eps, clip_eps_high, dual_clip, log_ratio_clamp):
        rng, mask, logp, old, adv = draw_policy_batch(drawn)
        fn = functools.partial(
            ppojax.clipped_loss,
            clip_eps=clip_eps,
            clip_eps_high=clip_eps_high,
            dual_clip=dual_clip,
            log_ratio_clamp=log_ratio_clamp,
            aggregation=aggregation,
        )
        loss, stats = self.variant(fn)(poison(logp, mask, rng), poison(old, mask, rng), poison(adv, mask, rng), mask)
        eps_high = clip_eps if clip_eps_high is None else clip_eps_high
        per_token, ratio = np_clipped_per_token(logp, old, adv, clip_eps, eps_high, dual_clip, log_ratio_clamp)
        np.testing.assert_allclose(loss, np_aggregate(per_token, mask, aggregation), rtol=1e-4, atol=1e-5)
        valid = mask > 0
        if valid.any():
            np.testing.assert_allclose(stats["ratio_mean"], ratio[valid].mean(), rtol=1e-5)
            np.testing.assert_allclose(stats["ratio_max"], ratio[valid].max(), rtol=1e-5)
            log_ratio = np.log(ratio)
            np.testing.assert_allclose(stats["approx_kl"], np.mean(0.5 * log_ratio[valid] ** 2), rtol=1e-4, atol=1e-7)
            clipped_branch = -adv * np.clip(ratio, 1 - clip_eps, 1 + eps_high) > -adv * ratio
            np.testing.assert_allclose(stats["clipfrac"], clipped_branch[valid].mean(), atol=1e-6)
            lower = clipped_branch & (ratio < 1 - clip_eps)
            np.testing.assert_allclose(stats["clipfrac_lower"], lower[valid].mean(), atol=1e-6)
        for value in jax.tree.leaves(stats):
            assert np.isfinite(value)

    @chex.variants(with_jit=True, without_jit=True)
    @given(
        masked_batches(kinds=("right_padded", "holes", "full"), fixed_shape=(4, 9)),
        st.sampled_from(ppojax.LOSS_AGGREGATIONS),
    )
    def test_gradient_zero_exactly_where_clipped_on_the_pushing_side(self, drawn, aggregation):
        rng, mask, logp, old, adv = draw_policy_batch(drawn)
        eps = 0.2
        grad = self.variant(
            jax.grad(lambda lp: ppojax.clipped_loss(lp, old, adv, mask, clip_eps=eps, aggregation=aggregation)[0])
        )(logp)
        grad = np.asarray(grad)
        ratio = np.exp(logp.astype(np.float64) - old)
        valid = mask > 0
        clipped_up = (adv > 0) & (ratio > 1 + eps)
        clipped_down = (adv < 0) & (ratio < 1 - eps)
        frozen = (clipped_up | clipped_down) & valid
        np.testing.assert_array_equal(grad[frozen], 0.0)
        np.testing.assert_array_equal(grad[~valid], 0.0)
        # Elsewhere the gradient is the unclipped one: −A·ρ (times the aggregation weight), never zero.
        active = valid & ~frozen & (adv != 0)
        assert np.all(grad[active] != 0.0)
        assert np.all(np.sign(grad[active]) == -np.sign(adv[active]))

    def test_hand_computed_case(self):
        # Two tokens, ε = 0.2. Token 0: A = 1, ρ = e^0.5 ≈ 1.6487 → clipped at 1.2, loss −1.2.
        # Token 1: A = −2, ρ = e^−0.1 ≈ 0.9048 → unclipped, loss 1.8097. Token-mean: 0.30967.
        logp = jnp.array([[0.0, -0.1]])
        old = jnp.array([[-0.5, 0.0]])
        adv = jnp.array([[1.0, -2.0]])
        loss, stats = ppojax.clipped_loss(logp, old, adv, jnp.ones((1, 2)))
        np.testing.assert_allclose(loss, (-1.2 + 2 * np.exp(-0.1)) / 2, rtol=1e-6)
        np.testing.assert_allclose(stats["clipfrac"], 0.5)
        np.testing.assert_allclose(stats["clipfrac_lower"], 0.0)
        # Dual clip with c = 1.5 caps the second token's loss at −c·A = 3 only when larger: here 1.81 < 3.
        loss_dual, _ = ppojax.clipped_loss(logp, old, adv, jnp.ones((1, 2)), dual_clip=1.5)
        np.testing.assert_allclose(loss_dual, loss, rtol=1e-6)
        big = jnp.array([[0.0, 2.0]])  # ρ = e^2 on the A < 0 token: loss 2e² ≈ 14.78 → capped at 3.
        loss_capped, stats_capped = ppojax.clipped_loss(
            big, jnp.zeros((1, 2)), jnp.array([[0.0, -2.0]]), jnp.ones((1, 2)), dual_clip=1.5
        )
        np.testing.assert_allclose(loss_capped, (0.0 + 3.0) / 2, rtol=1e-6)
        np.testing.assert_allclose(stats_capped["dual_clipfrac"], 0.5)

    @parameterized.parameters(*(mode for mode in ppojax.LOSS_AGGREGATIONS if mode != "micro-token-mean"))
    def test_sum_count_accumulation_equals_full_batch_loss_and_gradient(self, aggregation):
        rng = np.random.default_rng(3)
        batch, width = 8, 6
        lengths = rng.integers(0, width + 1, size=batch)
        mask = (np.arange(width)[None] < lengths[:, None]).astype(np.float32)
        old = rng.normal(size=(batch, width)).astype(np.float32)
        logp = old + 0.3 * rng.normal(size=(batch, width)).astype(np.float32)
        adv = rng.normal(size=(batch, width)).astype(np.float32)

        def pair(lp, rows):
            return ppojax.clipped_loss(
                lp[rows], old[rows], adv[rows], mask[rows], aggregation=aggregation, as_sum_count=True
            )[0]

        full = ppojax.clipped_loss(logp, old, adv, mask, aggregation=aggregation)[0]
        chunks = [slice(0, 3), slice(3, 5), slice(5, 8)]
        total = functools.reduce(lambda a, b: a + b, [pair(logp, c) for c in chunks])
        # float32 sums taken in another order: error bounded by ~1e-7 of the summed magnitudes, not of the result.
        np.testing.assert_allclose(total.value(), full, rtol=1e-5, atol=1e-7)

        # Gradient: the accumulated numerator gradients divided by the total count equal the full gradient.
        full_grad = jax.grad(lambda lp: ppojax.clipped_loss(lp, old, adv, mask, aggregation=aggregation)[0])(
            jnp.asarray(logp)
        )
        num_grad = sum(jax.grad(lambda lp, c=c: pair(lp, c).total)(jnp.asarray(logp)) for c in chunks)
        np.testing.assert_allclose(num_grad / total.count, full_grad, rtol=1e-5, atol=1e-7)

    def test_micro_token_mean_is_the_mean_of_the_micro_batches_token_means(self):
        # TRL 0.x: each micro-batch back-propagates its masked mean, accelerate averages the accumulation steps.
        rng = np.random.default_rng(4)
        per_token = rng.normal(size=(6, 5)).astype(np.float32)
        mask = (np.arange(5)[None] < np.array([5, 1, 3, 0, 2, 4])[:, None]).astype(np.float32)
        chunks = [slice(0, 2), slice(2, 4), slice(4, 6)]
        pairs = [ppojax.aggregate_loss(per_token[c], mask[c], "micro-token-mean") for c in chunks]
        total = functools.reduce(lambda a, b: a + b, pairs)
        means = [per_token[c][mask[c] > 0].mean() for c in chunks]
        np.testing.assert_allclose(total.value(), np.mean(means), rtol=1e-6)
        assert float(total.count) == 3.0
        # A micro-batch without a valid token counts for nothing (its mean would be 0 / 0).
        empty = ppojax.aggregate_loss(per_token[3:4], mask[3:4], "micro-token-mean")
        assert float(empty.total) == 0.0 and float(empty.count) == 0.0
        # In one call it is the token mean.
        np.testing.assert_allclose(
            ppojax.aggregate_loss(per_token, mask, "micro-token-mean").value(),
            ppojax.aggregate_loss(per_token, mask, "token-mean").value(),
            rtol=1e-6,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_from_logits(self):
        rng = np.random.default_rng(3)
        logits = (rng.normal(size=(3, 4, 6)) * 2).astype(np.float32)
        logits[0, 1, :4] = -np.inf  # a top-k-filtered row: two tokens left
        logits[1, 2] = [0, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf]  # one token left: entropy 0
        logits[2, 3] = 40.0  # uniform over 6
        z = logits.astype(np.float64)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        want = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1)
        got = self.variant(ppojax.entropy_from_logits)(logits)
        assert got.dtype == jnp.float32 and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got[1, 2], 0.0, atol=1e-7)
        np.testing.assert_allclose(got[2, 3], np.log(6), rtol=1e-6)
        half = self.variant(ppojax.entropy_from_logits)(jnp.asarray(logits[2:, :3], jnp.bfloat16))
        assert half.dtype == jnp.float32
        np.testing.assert_allclose(half, want[2:, :3], rtol=2e-2, atol=2e-2)

    def test_entropy_bonus_and_stat(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
        mask = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
        zeros = np.zeros((2, 3), np.float32)
        adv = rng.normal(size=(2, 3)).astype(np.float32)
        p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        entropy = -(p * np.log(p)).sum(-1)
        base, _ = ppojax.clipped_loss(zeros, zeros, adv, mask)
        with_bonus, stats = ppojax.clipped_loss(zeros, zeros, adv, mask, logits=logits, entropy_coef=0.01)
        np.testing.assert_allclose(stats["entropy"], entropy[mask > 0].mean(), rtol=1e-5)
        np.testing.assert_allclose(with_bonus, base - 0.01 * entropy[mask > 0].mean(), rtol=1e-5)
        with self.assertRaisesRegex(ValueError, "needs `logits`"):
            ppojax.clipped_loss(zeros, zeros, adv, mask, entropy_coef=0.01)

    @chex.variants(with_jit=True, without_jit=True)
    def test_empty_mask_gives_zero_not_nan(self):
        nan = jnp.full((2, 3), jnp.nan)
        loss, stats = self.variant(ppojax.clipped_loss)(nan, nan, nan, jnp.zeros((2, 3)))
        assert float(loss) == 0.0
        assert all(float(v) == 0.0 for v in stats.values())
        vloss, vstats = self.variant(ppojax.value_loss)(nan, nan, nan, jnp.zeros((2, 3)))
        assert float(vloss) == 0.0
        assert all(float(v) == 0.0 for v in vstats.values())

    def test_bad_dual_clip(self):
        with self.assertRaisesRegex(ValueError, "dual_clip must be > 1"):
            ppojax.clipped_loss(
                jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.ones((1, 1)), dual_clip=0.5
            )


class ValueLossTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(masked_batches(), st.sampled_from([None, 0.2, 0.5]), st.sampled_from(ppojax.LOSS_AGGREGATIONS))
    def test_matches_formula(self, drawn, clip_eps, aggregation):
        rng, batch, width, mask = drawn
        old = rng.normal(size=(batch, width)).astype(np.float32)
        values = (old + rng.normal(size=(batch, width)) * 0.5).astype(np.float32)
        returns = rng.normal(size=(batch, width)).astype(np.float32)
        fn = functools.partial(ppojax.value_loss, clip_eps=clip_eps, aggregation=aggregation)
        loss, stats = self.variant(fn)(
            poison(values, mask, rng), poison(old, mask, rng), poison(returns, mask, rng), mask
        )
        v, r = values.astype(np.float64), returns.astype(np.float64)
        unclipped = (v - r) ** 2
        if clip_eps is None:
            per_token, frac = 0.5 * unclipped, np.zeros_like(unclipped, bool)
        else:
            clipped = (np.clip(v, old - clip_eps, old + clip_eps) - r) ** 2
            per_token, frac = 0.5 * np.maximum(unclipped, clipped), clipped > unclipped
        np.testing.assert_allclose(loss, np_aggregate(per_token, mask, aggregation), rtol=1e-4, atol=1e-5)
        valid = mask > 0
        if valid.any():
            np.testing.assert_allclose(stats["vf_clipfrac"], frac[valid].mean(), atol=1e-6)
            var_r = r[valid].var()
            expected_ev = 1 - (r - v)[valid].var() / var_r if var_r > 0 else 0.0
            np.testing.assert_allclose(stats["explained_variance"], expected_ev, rtol=1e-3, atol=1e-4)

    def test_hand_computed_case(self):
        # V = 1.0, V_old = 0.0, R = 2.0, ε = 0.2: unclipped (1−2)² = 1; clipped (0.2−2)² = 3.24 → ½·3.24.
        loss, stats = ppojax.value_loss(jnp.array([[1.0]]), jnp.array([[0.0]]), jnp.array([[2.0]]), jnp.ones((1, 1)))
        np.testing.assert_allclose(loss, 1.62, rtol=1e-6)
        np.testing.assert_allclose(stats["vf_clipfrac"], 1.0)


if __name__ == "__main__":
    absltest.main()
