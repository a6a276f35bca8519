"""Tests for ppojax.sampling: exact masks, tie rules, the sampled distribution, greedy, keys."""

import functools
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from rollout_testing import chi_square_pvalue, jit_for_tests
from ppojax import sampling


class MaskTest(parameterized.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_top_k_keeps_exactly_the_k_largest(self):
        logits = jnp.array([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
        keep = self.variant(sampling.top_k_mask, static_argnums=1)(logits, 2)
        np.testing.assert_array_equal(keep, [[0, 1, 0, 1, 0], [1, 1, 0, 0, 0]])

    @chex.all_variants(with_pmap=False)
    def test_top_k_keeps_all_ties_at_the_boundary(self):
        logits = jnp.array([[1.0, 2.0, 2.0, 2.0, 0.0]])
        keep = self.variant(sampling.top_k_mask, static_argnums=1)(logits, 2)
        np.testing.assert_array_equal(keep, [[0, 1, 1, 1, 0]])

    def test_top_k_zero_and_large_k_keep_everything(self):
        logits = jnp.array([[1.0, -2.0, 3.0]])
        np.testing.assert_array_equal(sampling.top_k_mask(logits, 0), [[1, 1, 1]])
        np.testing.assert_array_equal(sampling.top_k_mask(logits, 7), [[1, 1, 1]])
        with pytest.raises(ValueError, match="top_k"):
            sampling.top_k_mask(logits, -1)

    @chex.all_variants(with_pmap=False)
    def test_top_p_keeps_the_smallest_prefix_reaching_p(self):
        probs = jnp.array([[0.1, 0.4, 0.05, 0.3, 0.15]])
        logits = jnp.log(probs)
        top_p_mask = self.variant(sampling.top_p_mask)
        # sorted: 0.4, 0.3, 0.15, 0.1, 0.05; mass before each: 0, 0.4, 0.7, 0.85, 0.95
        np.testing.assert_array_equal(top_p_mask(logits, 0.3), [[0, 1, 0, 0, 0]])
        np.testing.assert_array_equal(top_p_mask(logits, 0.5), [[0, 1, 0, 1, 0]])
        np.testing.assert_array_equal(top_p_mask(logits, 0.7), [[0, 1, 0, 1, 0]])  # 0.4 + 0.3 reaches 0.7
        np.testing.assert_array_equal(top_p_mask(logits, 0.71), [[0, 1, 0, 1, 1]])
        np.testing.assert_array_equal(top_p_mask(logits, 0.9), [[1, 1, 0, 1, 1]])
        np.testing.assert_array_equal(top_p_mask(logits, 0.96), [[1, 1, 1, 1, 1]])
        np.testing.assert_array_equal(top_p_mask(logits, 0.0), [[0, 1, 0, 0, 0]])  # the argmax survives

    @chex.all_variants(with_pmap=False)
    def test_top_p_keeps_ties_at_the_edge_and_everything_at_one(self):
        logits = jnp.log(jnp.array([[0.4, 0.2, 0.2, 0.2, 1e-12]]))
        top_p_mask = self.variant(sampling.top_p_mask)
        np.testing.assert_array_equal(top_p_mask(logits, 0.5), [[1, 1, 1, 1, 0]])
        np.testing.assert_array_equal(top_p_mask(logits, 1.0), [[1, 1, 1, 1, 1]])

    def test_filter_applies_temperature_then_top_k_then_top_p(self):
        logits = jnp.log(jnp.array([[0.5, 0.25, 0.125, 0.0625, 0.0625]]))
        # T = 0.5 squares the probabilities: 0.25, 0.0625, 0.0156, 0.0039, 0.0039 (unnormalised);
        # top-k 3 keeps the first three; top-p 0.9 of their renormalised mass (0.76, 0.19, 0.05) keeps two.
        filtered = sampling.filter_logits(logits, 0.5, top_k=3, top_p=0.9)
        np.testing.assert_array_equal(jnp.isfinite(filtered), [[1, 1, 0, 0, 0]])
        np.testing.assert_allclose(filtered[0, :2], logits[0, :2] / 0.5, rtol=1e-6)


def _reference_top_k(row, k):
    """numpy: keep every logit >= the k-th largest."""
    return row >= np.sort(row)[::-1][k - 1]


def _reference_top_p(row, p):
    """numpy, float64, the module doc's rule by sorting: (keep mask, distance of p from the nearest mass
    boundary — below float32 rounding the float32 implementations may legitimately decide either way)."""
    order = np.argsort(-row, kind="stable")
    finite = row > -np.inf
    probs = np.where(finite, np.exp(row - row.max()), 0.0)
    probs = probs / probs.sum()
    sorted_logits, sorted_probs = row[order], probs[order]
    mass_before = np.cumsum(sorted_probs) - sorted_probs
    in_nucleus = mass_before < p
    in_nucleus[0] = True
    threshold = sorted_logits[in_nucleus].min()
    margin = np.min(np.abs(mass_before[sorted_probs > 0] - p))
    return (row >= threshold) | (p >= 1.0), margin


def _random_logits(seed, rows=40, vocab=300):
    """Rows with ties (values rounded to a coarse grid in half the rows) and -inf entries (as top-k leaves)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(rows, vocab)) * rng.uniform(0.3, 4.0, size=(rows, 1))
    logits[::2] = np.round(logits[::2] * 2) / 2
    logits[1::3, rng.choice(vocab, vocab // 3, replace=False)] = -np.inf
    return logits.astype(np.float32)


class ThresholdTest(parameterized.TestCase):
    """top-k / top-p against numpy references on random rows, for both ways of finding the threshold: the
    bisection the CPU backend uses and the sort used elsewhere (forced here through `_search_thresholds`)."""

    def _use(self, search):
        # The choice is made while tracing: drop traces cached by a run with the other choice.
        patcher = mock.patch.object(sampling, "_search_thresholds", return_value=search)
        jax.clear_caches()
        patcher.start()
        self.addCleanup(jax.clear_caches)
        self.addCleanup(patcher.stop)

    @chex.all_variants(with_pmap=False)
    @parameterized.parameters(True, False)
    def test_top_k_mask_matches_numpy(self, search):
        self._use(search)
        logits = _random_logits(1)
        for k in (1, 2, 7, 50, 299):
            got = np.asarray(self.variant(sampling.top_k_mask, static_argnums=1)(logits, k))
            want = np.stack([_reference_top_k(row, k) for row in logits])
            np.testing.assert_array_equal(got, want, err_msg=f"top_k={k}")

    @chex.all_variants(with_pmap=False)
    @parameterized.parameters(True, False)
    def test_top_p_mask_matches_numpy(self, search):
        self._use(search)
        logits = _random_logits(2)
        top_p_mask = self.variant(sampling.top_p_mask)
        compared = 0
        for p in (0.0, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0):
            got = np.asarray(top_p_mask(logits, p))
            for row, kept in zip(logits, got):
                want, margin = _reference_top_p(row.astype(np.float64), p)
                if margin > 1e-5 or p in (0.0, 1.0):
                    np.testing.assert_array_equal(kept, want, err_msg=f"top_p={p}")
                    compared += 1
        self.assertGreater(compared, 0.9 * 9 * len(logits))  # boundary cases are rare: the test compares

    def test_search_and_sort_agree_in_a_jitted_sampler(self):
        logits = jnp.asarray(_random_logits(3))
        results = []
        for search in (True, False):
            with mock.patch.object(sampling, "_search_thresholds", return_value=search):
                jax.clear_caches()
                fn = jit_for_tests(sampling.filter_logits, static_argnames="top_k")
                results.append(np.asarray(fn(logits, 0.8, top_k=40, top_p=0.7)))
        np.testing.assert_array_equal(results[0], results[1])
        self.assertTrue(np.all(np.isfinite(results[0]).sum(-1) >= 1))

    def test_search_is_the_cpu_choice(self):
        self.assertEqual(sampling._search_thresholds(), jax.default_backend() == "cpu")


class ScanTest(parameterized.TestCase):
    @chex.all_variants(with_pmap=False)
    def test_cumulative_sum_matches_numpy(self):
        # 1 and 32 fit one block; 33 and 1536 need a second level; 1100 (35 blocks) a third.
        for size in (1, 32, 33, 1100, 1536):
            x = np.random.default_rng(size).exponential(size=(3, size)).astype(np.float32)
            x[:, ::7] = 0.0  # zero weights (excluded tokens), some at block boundaries
            got = np.asarray(self.variant(sampling.cumulative_sum)(x))
            np.testing.assert_allclose(got, np.cumsum(x.astype(np.float64), axis=-1), rtol=2e-6)
            blocks = got[:, : size // 32 * 32].reshape(3, -1, 32)  # exact repeats and no decrease inside a block
            self.assertTrue(np.all(np.diff(blocks, axis=-1) >= 0))
            np.testing.assert_array_equal(
                np.diff(blocks, axis=-1)[x[:, : size // 32 * 32].reshape(3, -1, 32)[..., 1:] == 0], 0
            )

    @chex.all_variants(with_pmap=False)
    def test_first_argmax_is_argmax_with_the_first_index_on_ties(self):
        x = np.array([[0.0, 2.0, 2.0, -1.0], [3.0, 0.0, 1.0, 5.0], [-np.inf, -1.0, -np.inf, -1.0]], np.float32)
        np.testing.assert_array_equal(self.variant(sampling.first_argmax)(x), [1, 3, 1])

    def test_excluded_tokens_at_block_boundaries_are_never_drawn(self):
        # Support only at tokens next to the 32-wide blocks' edges, everything else -inf (as top-k leaves it).
        probs = np.zeros(100)
        probs[[0, 31, 33, 63, 64, 99]] = [0.1, 0.25, 0.05, 0.2, 0.3, 0.1]
        logits = jnp.broadcast_to(jnp.log(jnp.asarray(probs, jnp.float32)), (20_000, 100))
        tokens = jit_for_tests(sampling.categorical)(jax.random.key(5), logits)
        self.assertGreater(chi_square_pvalue(tokens, probs), 1e-3)


class SampleTest(parameterized.TestCase):
    table = np.log(np.array([0.02, 0.3, 0.08, 0.25, 0.15, 0.2], np.float32)) + 1.7

    def _samples(self, temperature, *, top_k=0, top_p=1.0, n=20_000, jit=True):
        logits = jnp.broadcast_to(jnp.asarray(self.table), (n, len(self.table)))
        fn = sampling.sample_tokens
        if jit:
            fn = jit_for_tests(fn, static_argnames="top_k")
        tokens, logprobs = fn(jax.random.key(0), logits, temperature, top_k=top_k, top_p=top_p)
        return np.asarray(tokens), np.asarray(logprobs)

    @parameterized.parameters(1.0, 0.7, 2.0)
    def test_samples_follow_tempered_softmax(self, temperature):
        tokens, logprobs = self._samples(temperature)
        probs = np.asarray(jax.nn.softmax(self.table / temperature))
        self.assertGreater(chi_square_pvalue(tokens, probs), 1e-3)
        np.testing.assert_allclose(logprobs, np.log(probs)[tokens], rtol=1e-5, atol=1e-6)

    def test_chi_square_rejects_the_untempered_distribution(self):
        # The test above can fail: at T = 0.7 the samples do not fit softmax(logits).
        tokens, _ = self._samples(0.7)
        self.assertLess(chi_square_pvalue(tokens, np.asarray(jax.nn.softmax(self.table))), 1e-6)

    @parameterized.parameters(True, False)
    def test_top_k_top_p_sample_the_renormalised_nucleus_but_report_full_logprobs(self, jit):
        tokens, logprobs = self._samples(1.0, top_k=4, top_p=0.7, n=5000, jit=jit)
        # top-4: 0.3, 0.25, 0.2, 0.15 (mass 0.9); top-p 0.7 of that: mass before 0.333, 0.611, 0.833 → 3 tokens.
        kept = np.zeros(6)
        kept[[1, 3, 5]] = [0.3, 0.25, 0.2]
        self.assertGreater(chi_square_pvalue(tokens, kept / kept.sum()), 1e-3)
        full = np.asarray(jax.nn.log_softmax(self.table))
        np.testing.assert_allclose(logprobs, full[tokens], rtol=1e-5, atol=1e-6)

    @chex.all_variants(with_pmap=False)
    def test_temperature_zero_is_greedy_with_untempered_logprobs(self):
        logits = jnp.array([[0.0, 2.0, 2.0, -1.0], [3.0, 0.0, 1.0, 5.0]])
        tokens, logprobs = self.variant(sampling.sample_tokens)(jax.random.key(3), logits, 0.0)
        np.testing.assert_array_equal(tokens, [1, 3])  # first index wins a tie, as torch.argmax
        np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[jnp.arange(2), tokens], rtol=1e-6)

    def test_same_key_same_samples_different_key_different(self):
        logits = jnp.zeros((64, 50))
        first, _ = sampling.sample_tokens(jax.random.key(1), logits)
        again, _ = sampling.sample_tokens(jax.random.key(1), logits)
        other, _ = sampling.sample_tokens(jax.random.key(2), logits)
        np.testing.assert_array_equal(first, again)
        self.assertFalse(np.array_equal(first, other))

    @chex.all_variants(with_pmap=False)
    def test_given_uniforms_pick_the_inverse_cdf_token(self):
        # r = (1 - u) · total; the token is the first j with cdf[j] >= r (numpy loop below).
        logits = jnp.log(jnp.array([[0.1, 0.2, 0.3, 0.4]] * 5))
        u = np.array([[0.95], [0.85], [0.6], [0.35], [0.0]], np.float32)
        tokens, logprobs = self.variant(sampling.sample_tokens)(jax.random.key(0), logits, 1.0, uniform=u)
        cdf = np.cumsum([0.1, 0.2, 0.3, 0.4])
        want = [int(np.argmax(cdf >= (1.0 - ui) * cdf[-1] - 1e-7)) for ui in u[:, 0]]
        np.testing.assert_array_equal(tokens, want)
        self.assertEqual(want, [0, 1, 2, 3, 3])
        np.testing.assert_allclose(logprobs, np.log([0.1, 0.2, 0.3, 0.4, 0.4]), rtol=1e-6)
        # Without `uniform` the key draws one per row: the same tokens as passing those draws.
        logits = jax.random.normal(jax.random.key(5), (64, 50))
        drawn = jax.random.uniform(jax.random.key(7), (64, 1), jnp.float32)
        by_key, _ = self.variant(sampling.sample_tokens)(jax.random.key(7), logits, 0.8)
        given, _ = self.variant(sampling.sample_tokens)(jax.random.key(0), logits, 0.8, uniform=drawn)
        np.testing.assert_array_equal(by_key, given)

    @parameterized.parameters(True, False)
    def test_repetition_penalty_samples_the_penalised_distribution_but_reports_the_models(self, jit):
        # The table's logits are all positive (+1.7): shift two of them below 0 so both branches of the rule run.
        table = self.table - np.array([0, 0, 0, 2.5, 0, 2.5], np.float32)
        seen = np.array([False, True, False, True, False, False])  # token 1 (logit > 0) and 3 (< 0) seen
        penalty, temperature, n = 1.8, 0.8, 20_000
        logits = jnp.broadcast_to(jnp.asarray(table), (n, 6))
        fn = jit_for_tests(sampling.sample_tokens, static_argnames="top_k") if jit else sampling.sample_tokens
        seen_rows = jnp.broadcast_to(jnp.asarray(seen), (n, 6))
        tokens, logprobs = fn(jax.random.key(0), logits, temperature, repetition_penalty=penalty, seen=seen_rows)
        tokens, logprobs = np.asarray(tokens), np.asarray(logprobs)
        # CTRL's rule by hand: a seen logit x becomes x / p if x > 0 else x * p; then temperature.
        penalised = np.array([x / penalty if x > 0 else x * penalty for x in table], np.float64)
        penalised = np.where(seen, penalised, table)
        self.assertLess(penalised[1], table[1])
        self.assertLess(penalised[3], table[3])
        probs = np.exp(penalised / temperature) / np.exp(penalised / temperature).sum()
        self.assertGreater(chi_square_pvalue(tokens, probs), 1e-3)
        plain = np.exp(table / temperature) / np.exp(table / temperature).sum()
        self.assertLess(chi_square_pvalue(tokens, plain), 1e-6)  # the penalty is visible in the samples
        np.testing.assert_allclose(logprobs, np.log(plain)[tokens], rtol=1e-5, atol=1e-6)  # the model's
        np.testing.assert_allclose(
            sampling.apply_repetition_penalty(jnp.asarray(table), jnp.asarray(seen), penalty), penalised, rtol=1e-6
        )

    @chex.all_variants(with_pmap=False)
    def test_repetition_penalty_greedy_and_filters(self):
        # Greedy takes the argmax of the penalised logits; top-k then applies to them (transformers' order).
        logits = jnp.array([[3.0, 2.5, -1.0, 0.5], [3.0, 2.5, -1.0, 0.5]])
        seen = jnp.array([[True, False, False, False], [False, False, False, False]])
        greedy, logprobs = self.variant(sampling.sample_tokens)(
            jax.random.key(0), logits, 0.0, repetition_penalty=2.0, seen=seen
        )
        np.testing.assert_array_equal(greedy, [1, 0])  # row 0: 3 / 2 = 1.5 < 2.5
        np.testing.assert_allclose(logprobs, jax.nn.log_softmax(logits)[jnp.arange(2), greedy], rtol=1e-6)
        sampled, _ = self.variant(functools.partial(sampling.sample_tokens, top_k=1))(
            jax.random.key(1), logits, 1.0, repetition_penalty=2.0, seen=seen
        )
        np.testing.assert_array_equal(sampled, [1, 0])  # top-1 of the penalised logits

    def test_repetition_penalty_needs_seen(self):
        with self.assertRaisesRegex(ValueError, "repetition_penalty and seen go together"):
            sampling.sample_tokens(jax.random.key(0), jnp.zeros((2, 4)), repetition_penalty=1.2)

    def test_token_logprobs_divides_by_temperature(self):
        logits = jnp.array([[1.0, 2.0, 0.5]], jnp.bfloat16)
        got = sampling.token_logprobs(logits, jnp.array([2]), 0.5)
        self.assertEqual(got.dtype, jnp.float32)
        want = jax.nn.log_softmax(jnp.array([2.0, 4.0, 1.0]))[2]
        np.testing.assert_allclose(got[0], want, rtol=1e-6)
