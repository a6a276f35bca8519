import functools

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import absltest
from hypothesis import given
from hypothesis import strategies as st

import ppojax
from batches import masked_batches, poison


def np_shape_rewards(scores, kl, mask, kl_coef, placement):
    batch, width = mask.shape
    rewards = np.where(mask > 0, -kl_coef * kl.astype(np.float64), 0.0)
    for b in range(batch):
        valid = np.nonzero(mask[b])[0]
        last = valid[-1] if valid.size else -1
        if placement == "last":
            if last >= 0:
                rewards[b, last] += scores[b]
        elif placement == "after_last":
            rewards[b, min(last + 1, width - 1)] += scores[b]
        else:
            rewards[b, width - 1] += scores[b]
    return rewards


class ShapeRewardsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(
        masked_batches(kinds=("right_padded", "with_empty_and_single_rows", "full")),
        st.sampled_from(ppojax.SCORE_PLACEMENTS),
        st.floats(0.0, 0.5),
    )
    def test_matches_reference(self, drawn, placement, kl_coef):
        rng, batch, width, mask = drawn
        scores = rng.normal(size=batch).astype(np.float32)
        kl = rng.normal(size=(batch, width)).astype(np.float32)
        fn = functools.partial(ppojax.shape_rewards, score_placement=placement)
        got = self.variant(lambda s, k, m, c: fn(s, k, m, kl_coef=c))(scores, poison(kl, mask, rng), mask, kl_coef)
        np.testing.assert_allclose(got, np_shape_rewards(scores, kl, mask, kl_coef, placement), rtol=1e-5, atol=1e-6)

    def test_hand_computed_placements(self):
        mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
        kl = jnp.array([[0.5, 1.0, 9.0, 9.0], [1.0, 1.0, 1.0, 2.0]])
        scores = jnp.array([10.0, 20.0])
        last = ppojax.shape_rewards(scores, kl, mask, kl_coef=0.1, score_placement="last")
        np.testing.assert_allclose(last, [[-0.05, 9.9, 0, 0], [-0.1, -0.1, -0.1, 19.8]], rtol=1e-6)
        after = ppojax.shape_rewards(scores, kl, mask, kl_coef=0.1, score_placement="after_last")
        np.testing.assert_allclose(after, [[-0.05, -0.1, 10.0, 0], [-0.1, -0.1, -0.1, 19.8]], rtol=1e-6)
        final = ppojax.shape_rewards(scores, kl, mask, kl_coef=0.1, score_placement="final")
        np.testing.assert_allclose(final, [[-0.05, -0.1, 0, 10.0], [-0.1, -0.1, -0.1, 19.8]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_adjust_scores_jitted_and_not(self):
        fn = self.variant(
            lambda s, m, st: ppojax.adjust_scores(s, m, stopped=st, missing_eos_penalty=0.5, length_penalty=0.1)
        )
        got = fn(jnp.array([1.0, 1.0]), jnp.array([[1, 1, 0], [1, 1, 1]]), jnp.array([True, False]))
        np.testing.assert_allclose(got, [1.0 - 0.2, 1.0 - 0.5 - 0.3], rtol=1e-6)

    def test_score_adjustments(self):
        mask = jnp.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
        stopped = jnp.array([True, False, True])
        scores = jnp.array([1.0, 2.0, 30.0])
        penalised = ppojax.adjust_scores(scores, mask, stopped=stopped, missing_eos_penalty=1.0)
        np.testing.assert_allclose(penalised, [1.0, 1.0, 30.0])
        replaced = ppojax.adjust_scores(scores, mask, stopped=stopped, missing_eos_score=-1.0)
        np.testing.assert_allclose(replaced, [1.0, -1.0, 30.0])
        length = ppojax.adjust_scores(scores, mask, length_penalty=0.5, score_clip=10.0)
        np.testing.assert_allclose(length, [1.0 - 1.5, 2.0 - 2.0, 10.0])
        rewards = ppojax.shape_rewards(
            scores, jnp.zeros((3, 4)), mask, kl_coef=0.1, stopped=stopped, missing_eos_penalty=1.0
        )
        np.testing.assert_allclose(rewards[1, 3], 1.0)
        with self.assertRaisesRegex(ValueError, "`stopped`"):
            ppojax.adjust_scores(scores, mask, missing_eos_penalty=1.0)
        with self.assertRaisesRegex(ValueError, "not both"):
            ppojax.adjust_scores(scores, mask, stopped=stopped, missing_eos_penalty=1.0, missing_eos_score=-1.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_extend_mask_and_last_index(self):
        mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0]])
        np.testing.assert_array_equal(self.variant(ppojax.last_valid_index)(mask), [1, 3, -1, 2])
        np.testing.assert_array_equal(
            self.variant(ppojax.extend_mask)(mask), [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 0, 1, 1]]
        )
        np.testing.assert_array_equal(self.variant(lambda m: ppojax.score_index(m, "after_last"))(mask), [2, 3, 0, 3])

    def test_nan_score_in_one_row_stays_in_that_row(self):
        mask = jnp.array([[1, 1], [1, 1]])
        rewards = ppojax.shape_rewards(jnp.array([jnp.nan, 1.0]), jnp.zeros((2, 2)), mask, kl_coef=0.1)
        assert np.isnan(rewards[0, 1]) and np.isfinite(rewards[0, 0])
        np.testing.assert_allclose(rewards[1], [0.0, 1.0])


if __name__ == "__main__":
    absltest.main()
