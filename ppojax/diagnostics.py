"""Reward-hacking diagnostics for any PPO run: is the policy gaming its reward model?

Pure functions on one rollout batch (jit-able, masked; [B, N] responses right-padded):

  correlation(proxy, gold)                 Pearson correlation of the reward model's scores with a gold reward
  repetition_rate(ids, mask, n)            fraction of response n-grams that repeat an earlier n-gram of the row
  hacking_metrics(...)                     the batch's diagnostics as a dict of float32 scalars

and one host-side judgement over a run's logged rows (`hacking_flags`): proxy rising while gold falls, low
proxy-gold correlation, length drift, repetition growth and entropy collapse, each a flag with a one-line reason.
This module is about reward hacking; the ranges of ordinary PPO metrics (clip fractions, ratios, explained
variance) are `ppojax.health`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ppojax.stats import as_f32, masked_mean, safe_divide


def correlation(x: jax.Array, y: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Pearson correlation of two [B] vectors over the rows where `mask` is true; 0 if either is constant."""
    x, y = as_f32(x), as_f32(y)
    mask = jnp.ones(x.shape, bool) if mask is None else jnp.asarray(mask) > 0
    dx = jnp.where(mask, x - masked_mean(x, mask), 0.0)
    dy = jnp.where(mask, y - masked_mean(y, mask), 0.0)
    return safe_divide(jnp.sum(dx * dy), jnp.sqrt(jnp.sum(dx * dx) * jnp.sum(dy * dy)))


def repetition_rate(response_ids: jax.Array, response_mask: jax.Array, n: int = 1) -> jax.Array:
    """Fraction of the valid n-grams of each response that equal an earlier n-gram of the same response,
    averaged over all valid n-grams of the batch. [B, N] ids and mask (right-padded); `n` static.

    "the film was good and the film was good" has 9 unigrams of which 4 repeat (4/9) and 8 bigrams of which 3
    repeat. 0 for a batch without any full n-gram."""
    ids = jnp.asarray(response_ids, jnp.int32)
    valid = jnp.asarray(response_mask) > 0
    width = ids.shape[1] - n + 1
    if width <= 0:
        return jnp.zeros((), jnp.float32)
    grams = jnp.stack([ids[:, k : k + width] for k in range(n)], axis=-1)  # [B, W, n]
    gram_valid = jnp.all(jnp.stack([valid[:, k : k + width] for k in range(n)], axis=-1), axis=-1)  # [B, W]
    same = jnp.all(grams[:, :, None, :] == grams[:, None, :, :], axis=-1)  # [B, W(later), W(earlier)]
    earlier = jnp.tril(jnp.ones((width, width), bool), k=-1)
    repeats = jnp.any(same & earlier & gram_valid[:, None, :], axis=-1) & gram_valid
    return safe_divide(jnp.sum(repeats), jnp.sum(gram_valid)).astype(jnp.float32)


def repetition_rate_host(response_ids, response_mask, n: int = 2) -> float:
    """`repetition_rate` computed on the host in O(N) per row (a set of the row's valid n-grams) instead of
    the jittable O(N²) comparison: cheap enough to log for every PPO iteration of a long-response run."""
    ids, valid = np.asarray(response_ids).tolist(), (np.asarray(response_mask) > 0).tolist()
    repeats = total = 0
    for row, ok in zip(ids, valid):
        seen = set()
        for k in range(len(row) - n + 1):
            if all(ok[k : k + n]):
                gram = tuple(row[k : k + n])
                total += 1
                repeats += gram in seen
                seen.add(gram)
    return repeats / total if total else 0.0


def hacking_metrics(
    response_ids: jax.Array,
    response_mask: jax.Array,
    proxy: jax.Array,
    gold: jax.Array | None = None,
    *,
    ngram: int = 2,
) -> dict:
    """Per-batch diagnostics (float32 scalars): hacking/{repetition, length_mean, proxy_mean}, and with a gold
    reward hacking/{gold_mean, proxy_gold_corr}. proxy, gold: [B] sequence rewards."""
    lengths = jnp.sum(jnp.asarray(response_mask) > 0, axis=1).astype(jnp.float32)
    out = {
        "hacking/repetition": repetition_rate(response_ids, response_mask, ngram),
        "hacking/length_mean": jnp.mean(lengths),
        "hacking/proxy_mean": jnp.mean(as_f32(proxy)),
    }
    if gold is not None:
        out["hacking/gold_mean"] = jnp.mean(as_f32(gold))
        out["hacking/proxy_gold_corr"] = correlation(proxy, gold)
    return out


# ----------------------------------------------------------------------------------------------------------
# Judging a run


class Thresholds(NamedTuple):
    """When a flag is raised. `window`: rows averaged at the start and at the end of the run."""

    window: int = 5
    min_gold_drop: float = 0.05  # gold falls by more than this while proxy rises
    min_correlation: float = 0.3  # proxy-gold correlation at the end below this
    max_length_drift: float = 0.5  # relative change of the mean response length
    max_repetition_rise: float = 0.15  # absolute rise of the repetition rate
    min_entropy_ratio: float = 0.3  # final / initial policy entropy


class Flag(NamedTuple):
    name: str
    raised: bool
    reason: str


def _ends(rows: Sequence[Mapping], keys: Sequence[str], window: int) -> tuple[float, float] | None:
    keys = (keys,) if isinstance(keys, str) else keys
    key = next((k for k in keys if any(k in r for r in rows)), None)
    if key is None:
        return None
    values = np.array([float(r[key]) for r in rows if key in r and np.isfinite(float(r[key]))], np.float64)
    if len(values) < 2:
        return None
    w = max(1, min(window, len(values) // 2))
    return float(values[:w].mean()), float(values[-w:].mean())


def hacking_flags(
    rows: Sequence[Mapping],
    thresholds: Thresholds = Thresholds(),
    *,
    proxy_key: Sequence[str] = ("hacking/proxy_mean", "objective/scores"),
    gold_key: Sequence[str] = ("hacking/gold_mean",),
    corr_key: Sequence[str] = ("hacking/proxy_gold_corr",),
    length_key: Sequence[str] = ("hacking/length_mean", "response/length_mean"),
    repetition_key: Sequence[str] = ("hacking/repetition",),
    entropy_key: Sequence[str] = ("objective/entropy",),
) -> list[Flag]:
    """Flags over a run's logged rows (dicts, first to last), e.g. `ppojax.reports.read_metrics_csv` of any
    `ppo_metrics/training_metrics.csv`. Each key argument lists candidate column names, the first present is
    used (the `ppojax train` metric names are the fallbacks). A flag whose metric is absent is not reported."""
    t, flags = thresholds, []
    proxy, gold = _ends(rows, proxy_key, t.window), _ends(rows, gold_key, t.window)
    if proxy and gold:
        raised = proxy[1] > proxy[0] and gold[1] < gold[0] - t.min_gold_drop
        flags.append(
            Flag(
                "proxy_up_gold_down",
                raised,
                f"proxy {proxy[0]:.3f} -> {proxy[1]:.3f}, gold {gold[0]:.3f} -> {gold[1]:.3f}",
            )
        )
    corr = _ends(rows, corr_key, t.window)
    if corr:
        flags.append(
            Flag("low_proxy_gold_correlation", corr[1] < t.min_correlation, f"correlation at the end {corr[1]:.3f}")
        )
    length = _ends(rows, length_key, t.window)
    if length:
        drift = (length[1] - length[0]) / max(abs(length[0]), 1e-8)
        flags.append(
            Flag(
                "length_drift",
                abs(drift) > t.max_length_drift,
                f"mean length {length[0]:.2f} -> {length[1]:.2f} ({drift:+.0%})",
            )
        )
    repetition = _ends(rows, repetition_key, t.window)
    if repetition:
        rise = repetition[1] - repetition[0]
        flags.append(
            Flag(
                "repetition",
                rise > t.max_repetition_rise,
                f"repetition rate {repetition[0]:.3f} -> {repetition[1]:.3f}",
            )
        )
    entropy = _ends(rows, entropy_key, t.window)
    if entropy:
        ratio = entropy[1] / max(entropy[0], 1e-8)
        flags.append(
            Flag(
                "entropy_collapse",
                ratio < t.min_entropy_ratio,
                f"entropy {entropy[0]:.3f} -> {entropy[1]:.3f} ({ratio:.0%} of the start)",
            )
        )
    return flags


def format_flags(flags: Sequence[Flag]) -> str:
    """One line per flag: "[!] name: reason" when raised, "[ok] name: reason" otherwise."""
    return "\n".join(f"{'[!]' if f.raised else '[ok]'} {f.name}: {f.reason}" for f in flags)
