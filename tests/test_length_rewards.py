"""Length-aware rewards: score − c·length and score / √length, as a pure function and through the conventions."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import absltest
from hypothesis import given
from hypothesis import strategies as st

import ppojax
from batches import masked_batches


def np_length_aware(scores, lengths, mode, penalty):
    out = []
    for s, n in zip(scores.astype(np.float64), lengths):
        if mode == "penalty":
            out.append(s - penalty * n)
        elif mode == "sqrt":
            out.append(s / np.sqrt(max(n, 1)))
        else:
            out.append(s)
    return np.array(out)


class LengthAwareScoresTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @given(
        masked_batches(kinds=("right_padded", "with_empty_and_single_rows", "holes"), fixed_shape=(5, 9)),
        st.sampled_from(ppojax.LENGTH_REWARDS),
        st.floats(0.0, 0.5),
    )
    def test_matches_loop_through_adjust_scores(self, drawn, mode, penalty):
        rng, batch, width, mask = drawn
        scores = (rng.normal(size=batch) * 3).astype(np.float32)
        lengths = mask.sum(axis=1)
        got = self.variant(lambda s, m, c: ppojax.adjust_scores(s, m, length_reward=mode, length_penalty=c))(
            scores, mask, penalty
        )
        np.testing.assert_allclose(got, np_length_aware(scores, lengths, mode, penalty), rtol=1e-5, atol=1e-6)
        direct = self.variant(lambda s, n: ppojax.length_aware_scores(s, n, mode=mode, penalty=penalty))(
            scores, lengths
        )
        np.testing.assert_allclose(direct, got, rtol=1e-6)

    def test_hand_computed(self):
        scores, lengths = jnp.array([4.0, -4.0, 3.0]), jnp.array([16, 4, 0])
        np.testing.assert_allclose(
            ppojax.length_aware_scores(scores, lengths, mode="penalty", penalty=0.25), [0.0, -5.0, 3.0]
        )
        # √16 = 4, √4 = 2, an empty response divides by 1. A negative score becomes less negative.
        np.testing.assert_allclose(ppojax.length_aware_scores(scores, lengths, mode="sqrt"), [1.0, -2.0, 3.0])
        np.testing.assert_allclose(ppojax.length_aware_scores(scores, lengths, mode="none"), scores)

    def test_legacy_length_penalty_still_means_penalty(self):
        mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
        got = ppojax.adjust_scores(jnp.array([1.0, 1.0]), mask, length_penalty=0.5)
        np.testing.assert_allclose(got, [-0.5, 0.5])

    def test_errors(self):
        with pytest.raises(ValueError, match="mode must be one of"):
            ppojax.length_aware_scores(jnp.zeros(2), jnp.ones(2), mode="log")
        with pytest.raises(ValueError, match="one length per score"):
            ppojax.length_aware_scores(jnp.zeros(2), jnp.ones(3), mode="sqrt")
        with pytest.raises(ValueError, match="set both or neither"):
            ppojax.get_preset("ppojax").replace(length_reward="penalty")
        with pytest.raises(ValueError, match="set both or neither"):
            ppojax.get_preset("ppojax").replace(length_penalty=0.1)
        with pytest.raises(ValueError, match="length_reward must be one of"):
            ppojax.get_preset("ppojax").replace(length_reward="log")


class ConventionLengthRewardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_assemble_advantages_uses_response_lengths(self):
        """Under OpenAI's full-width loss mask the length is still the response's, not the width."""
        rng = np.random.default_rng(0)
        batch, width = 4, 6
        lengths = np.array([6, 3, 1, 4])
        response_mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
        scores = rng.normal(size=batch).astype(np.float32) + 2
        logp, ref, values = (rng.normal(size=(batch, width)).astype(np.float32) for _ in range(3))
        for conv_name, mode, penalty in (("openai", "sqrt", 0.0), ("ppojax", "penalty", 0.05)):
            base = ppojax.get_preset(conv_name)
            length_conv = base.replace(length_reward=mode, length_penalty=penalty)

            def run(conv, s):
                return ppojax.assemble_advantages(
                    conv,
                    scores=s,
                    logprobs=logp,
                    ref_logprobs=ref,
                    values=values,
                    response_mask=response_mask,
                    stopped=np.ones(batch, bool),  # OpenAI's missing-EOS rule needs it
                ).rewards

            got = self.variant(lambda s: run(length_conv, s))(scores)
            want = run(base, np_length_aware(scores, lengths, mode, penalty).astype(np.float32))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    absltest.main()
