"""Helpers shared by the rollout and sampling tests."""

import jax
import numpy as np
from scipy import stats


def chi_square_pvalue(samples, probs):
    """p-value of a chi-square test of integer samples against `probs` (renormalised, bins with p > 0).

    Fails outright if any sample falls outside the support of `probs`.
    """
    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    counts = np.bincount(np.asarray(samples).ravel(), minlength=len(probs))
    support = probs > 0
    assert counts[~support].sum() == 0, f"sampled tokens outside the support: {np.nonzero(counts * ~support)}"
    return stats.chisquare(counts[support], probs[support] * counts.sum()).pvalue


def jit_for_tests(fn, **kwargs):
    """`jax.jit` with XLA's backend optimisations off: compiles 2-3x faster, and these tests check results,
    not speed (the benchmark in experiments/bench uses the default options)."""
    return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)
