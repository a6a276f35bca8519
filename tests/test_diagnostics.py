"""Reward-hacking diagnostics: against numpy references and hand-computed cases, jitted and not."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ppojax import diagnostics


def repetition_reference(ids, mask, n):
    repeats = total = 0
    for row, row_mask in zip(ids, mask):
        seen = []
        for t in range(len(row) - n + 1):
            if not all(row_mask[t : t + n]):
                continue
            gram = tuple(row[t : t + n])
            total += 1
            repeats += gram in seen
            seen.append(gram)
    return repeats / total if total else 0.0


class DiagnosticsTest(chex.TestCase):
    @chex.variants(with_jit=True)  # un-jitted: the hand case below
    @parameterized.parameters(1, 2, 3)
    def test_repetition_rate_matches_a_numpy_loop(self, n):
        rng = np.random.default_rng(n)
        ids = rng.integers(0, 4, (5, 9))
        lengths = np.array([0, 1, 4, 9, 6])
        mask = np.arange(9)[None] < lengths[:, None]
        ids = np.where(mask, ids, 3)  # padding equal to real tokens must not count
        rate = self.variant(diagnostics.repetition_rate, static_argnums=2)(ids, mask, n)
        self.assertAlmostEqual(float(rate), repetition_reference(ids, mask, n), places=6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_repetition_rate_hand_case(self):
        words = ["the", "film", "was", "good", "and", "the", "film", "was", "good"]
        vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
        ids = jnp.asarray([[vocab[w] for w in words] + [0, 0]])
        mask = jnp.asarray([[1] * 9 + [0, 0]])
        rate = self.variant(diagnostics.repetition_rate, static_argnums=2)
        self.assertAlmostEqual(float(rate(ids, mask, 1)), 4 / 9, places=6)
        self.assertAlmostEqual(float(rate(ids, mask, 2)), 3 / 8, places=6)
        self.assertEqual(float(rate(ids, jnp.zeros_like(mask), 2)), 0.0)

    @chex.variants(with_jit=True, without_jit=True)
    def test_correlation_matches_numpy_with_a_mask(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=12)
        y = 0.5 * x + rng.normal(size=12)
        mask = np.arange(12) < 9
        got = self.variant(diagnostics.correlation)(np.where(mask, x, np.nan), y, mask)
        self.assertAlmostEqual(float(got), np.corrcoef(x[:9], y[:9])[0, 1], places=5)
        self.assertEqual(float(self.variant(diagnostics.correlation)(np.ones(4), np.arange(4.0))), 0.0)


def test_hacking_metrics_keys_and_values():
    ids = jnp.asarray([[1, 2, 1, 2], [3, 3, 0, 0]])
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]])
    proxy, gold = jnp.asarray([1.0, 2.0]), jnp.asarray([2.0, 1.0])
    out = jax.jit(diagnostics.hacking_metrics, static_argnames="ngram")(ids, mask, proxy, gold, ngram=1)
    assert float(out["hacking/length_mean"]) == 3.0
    assert float(out["hacking/repetition"]) == pytest.approx(3 / 6)
    assert float(out["hacking/proxy_gold_corr"]) == pytest.approx(-1.0)
    assert "hacking/gold_mean" not in diagnostics.hacking_metrics(ids, mask, proxy)


def rows(**series):
    n = len(next(iter(series.values())))
    return [{key: values[i] for key, values in series.items()} for i in range(n)]


def test_hacking_flags_raise_on_the_patterns_and_stay_quiet_otherwise():
    t = np.linspace(0, 1, 20)
    hacked = rows(
        **{
            "hacking/proxy_mean": t,
            "hacking/gold_mean": 0.5 - t,
            "hacking/proxy_gold_corr": 0.8 - t,
            "hacking/length_mean": 10 + 10 * t,
            "hacking/repetition": 0.05 + 0.3 * t,
            "objective/entropy": 2.0 - 1.9 * t,
        }
    )
    flags = {f.name: f for f in diagnostics.hacking_flags(hacked)}
    assert set(flags) == {
        "proxy_up_gold_down",
        "low_proxy_gold_correlation",
        "length_drift",
        "repetition",
        "entropy_collapse",
    }
    assert all(f.raised for f in flags.values()), diagnostics.format_flags(flags.values())
    healthy = rows(
        **{
            "hacking/proxy_mean": t,
            "hacking/gold_mean": t,
            "hacking/proxy_gold_corr": 0.7 + 0 * t,
            "hacking/length_mean": 10 + t,
            "hacking/repetition": 0.05 + 0 * t,
            "objective/entropy": 2.0 - 0.5 * t,
        }
    )
    assert not any(f.raised for f in diagnostics.hacking_flags(healthy))
    assert diagnostics.hacking_flags(rows(other=t)) == []
    assert diagnostics.format_flags(diagnostics.hacking_flags(hacked)).count("[!]") == 5


def test_hacking_flags_read_the_metric_names_of_ppojax_train():
    t = np.linspace(0, 1, 12)
    flags = diagnostics.hacking_flags(
        rows(**{"objective/scores": t, "response/length_mean": 10 - 8 * t, "objective/entropy": 1.0 + 0 * t})
    )
    by_name = {f.name: f for f in flags}
    assert set(by_name) == {"length_drift", "entropy_collapse"}
    assert by_name["length_drift"].raised and not by_name["entropy_collapse"].raised


def test_host_repetition_rate_equals_the_jitted_one():
    """The O(N) host version used by `ppojax train` against the jnp definition, masks with holes included."""
    from ppojax.diagnostics import repetition_rate, repetition_rate_host

    rng = np.random.default_rng(3)
    for n in (1, 2, 3):
        ids = rng.integers(0, 4, size=(5, 9))
        mask = rng.random((5, 9)) < 0.8
        mask[0] = False  # a row with no valid token
        expected = float(repetition_rate(ids, mask, n))
        assert repetition_rate_host(ids, mask, n) == pytest.approx(expected, abs=1e-6)
    # the docstring's case: "the film was good and the film was good", 3 of 8 bigrams repeat
    words = "the film was good and the film was good".split()
    row = np.array([[words.index(w) for w in words]])
    assert repetition_rate_host(row, np.ones_like(row), 2) == pytest.approx(3 / 8)
