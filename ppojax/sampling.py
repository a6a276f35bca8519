"""Pure sampling transforms over next-token logits.

Every function takes logits `[..., V]` (any float dtype; math is done in float32) and works jitted and
un-jitted. The order of the transforms matches Hugging Face's: temperature, then top-k, then top-p (on the
distribution left by top-k).

Tie rules (deliberate, tested):
  * top-k keeps every token whose logit is >= the k-th largest logit, so more than k tokens survive when
    several tie at the boundary.
  * top-p keeps the smallest prefix of tokens, sorted by probability, whose mass reaches `top_p`
    (a token is kept when the mass of the tokens strictly before it is < top_p), and then every token whose
    logit equals the smallest kept one. The most likely token is always kept. `top_p >= 1` keeps all.

Log-probs of a chosen token are always taken from the full tempered distribution
`log_softmax(logits / T)` (PPO_DETAILS items 3 and 5): the teacher-forced pass that recomputes them sees
the full distribution too, so the first PPO ratio is exactly 1. At T = 0 (greedy) the untempered logits
are used.

A repetition penalty (transformers' `repetition_penalty`, CTRL's rule: the logit of every token already in
the sequence is divided by the penalty where positive and multiplied by it where negative) is a sampling filter
like top-k / top-p: it comes first (before temperature, as in transformers) and changes which token is drawn,
never the log-probs, which stay those of the model's own distribution.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def effective_temperature(temperature: jax.Array | float) -> jax.Array:
    """The divisor for logits: `temperature`, or 1 where it is 0 (greedy). float32 scalar."""
    temperature = jnp.asarray(temperature, jnp.float32)
    return jnp.where(temperature > 0, temperature, 1.0)


def apply_temperature(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """`logits / T` in float32; `T = 0` leaves the logits unchanged (greedy uses them as they are)."""
    return logits.astype(jnp.float32) / effective_temperature(temperature)


def token_logprobs(logits: jax.Array, tokens: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """log softmax(logits / T)[token] in float32.

    logits: [..., V]; tokens: [...] int. Returns [...] float32.
    """
    logprobs = jax.nn.log_softmax(apply_temperature(logits, temperature), axis=-1)
    return jnp.take_along_axis(logprobs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array | float) -> jax.Array:
    """float32 `[..., V]`: `logits` with every `seen` token's logit divided by `penalty` where it is positive
    and multiplied by it where negative (transformers' `RepetitionPenaltyLogitsProcessor`). seen: bool
    `[..., V]`; penalty: a traced scalar > 0 (1 changes nothing; > 1 discourages repeats)."""
    logits = logits.astype(jnp.float32)
    penalty = jnp.asarray(penalty, jnp.float32)
    return jnp.where(seen, jnp.where(logits < 0, logits * penalty, logits / penalty), logits)


def top_k_mask(logits: jax.Array, top_k: int) -> jax.Array:
    """Boolean [..., V]: True for tokens with logit >= the k-th largest logit. `top_k` is static; 0 keeps all."""
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it); found {top_k}")
    if top_k == 0 or top_k >= logits.shape[-1]:
        return jnp.ones(logits.shape, bool)
    if _search_thresholds():
        kth_largest = _kth_largest_by_search(logits.astype(jnp.float32), top_k)
    else:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
    return logits >= kth_largest


def top_p_mask(logits: jax.Array, top_p: jax.Array | float) -> jax.Array:
    """Boolean [..., V]: the nucleus of mass `top_p` (traced scalar) of softmax(logits); see module doc for ties.

    Tokens already at -inf (masked by top-k) have probability 0 and are never added to the nucleus.
    """
    top_p = jnp.asarray(top_p, jnp.float32)
    logits = logits.astype(jnp.float32)
    if _search_thresholds():
        threshold = _nucleus_threshold_by_search(logits, top_p)
    else:
        threshold = _nucleus_threshold_by_sort(logits, top_p)
    # Rounding in the mass sums must not drop tail tokens when the caller asked for everything.
    return (logits >= threshold) | (top_p >= 1.0)


def _search_thresholds() -> bool:
    """Whether top-k / top-p find their thresholds by bisection (CPU) rather than by sorting (GPU / TPU).

    On CPU, XLA sorts floats with a compiled comparator called per comparison: `jnp.sort` of [32, 1536] takes
    ≈ 9 ms, so top-p made a decode step cost several times the model's forward pass. `lax.top_k` is no way out
    (k = 50 at [64, 1536], per step: 17 ms on one CPU device; 1.7 ms on two, where the partitioner, which has no
    rule for it, all-gathers the logits of the rows split over the devices). The bisection is 32 passes of a
    comparison and a row sum: 0.5-0.8 ms per step for either filter there, with row-wise ops only (nothing to
    gather when the rows are sharded). `experiments/bench/bench_sampling.py` times both ways on any backend;
    `experiments/bench/bench_rollout.py --top-k / --top-p` the whole rollout.
    """
    return jax.default_backend() == "cpu"


def _nucleus_threshold_by_sort(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """[..., 1]: the smallest logit inside the nucleus, from the sorted probabilities (module doc's rule)."""
    sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    in_nucleus = mass_before < top_p
    in_nucleus = in_nucleus.at[..., 0].set(True)  # the most likely token always survives
    return jnp.min(jnp.where(in_nucleus, sorted_logits, jnp.inf), axis=-1, keepdims=True)


# Threshold search without sorting. Each float32 maps to an int32 key of the same order, so a threshold can be
# bisected over the keys: 32 halvings pin it to one float exactly. The rule searched for is monotone in the
# threshold t, and the answer is the smallest key that passes — always a logit value of the row, because the
# rules only change at logit values.


def _ordered_key(x: jax.Array) -> jax.Array:
    """int32 keys ordered as the float32 values (−0.0 just below +0.0; no NaN)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _from_key(key: jax.Array) -> jax.Array:
    return jax.lax.bitcast_convert_type(jnp.where(key < 0, key ^ 0x7FFFFFFF, key), jnp.float32)


def _row_sum(x: jax.Array) -> jax.Array:
    """[..., V] -> [..., 1]: as a product with a ones vector (≈ 20 % faster than a reduction on CPU here)."""
    return (x @ jnp.ones((x.shape[-1],), x.dtype))[..., None]


def _smallest_passing(low: jax.Array, high: jax.Array, passes) -> jax.Array:
    """[..., 1] float32: the smallest value t (bisected over the keys in [low, high]) with `passes(t)`, for a rule
    false below some t* and true from t* on, true at `high`."""

    def halve(_, bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without int32 overflow
        ok = passes(_from_key(middle))
        return jnp.where(ok, low, middle + 1), jnp.where(ok, middle, high)

    _, high = jax.lax.fori_loop(0, 32, halve, (_ordered_key(low), _ordered_key(high)), unroll=4)
    return _from_key(high)


def _kth_largest_by_search(logits: jax.Array, k: int) -> jax.Array:
    """[..., 1]: the k-th largest logit of each row (with ties counted, as `lax.top_k`'s k-th value): the
    smallest t with fewer than k logits above it."""
    low = jnp.min(logits, axis=-1, keepdims=True)
    high = jnp.max(logits, axis=-1, keepdims=True)
    return _smallest_passing(low, high, lambda t: _row_sum((logits > t).astype(jnp.float32)) < k)


def _nucleus_threshold_by_search(logits: jax.Array, top_p: jax.Array) -> jax.Array:
    """[..., 1]: the smallest logit v whose tokens are in the nucleus, i.e. the mass strictly above v is < top_p
    (the sorted rule: the first token of value v has exactly that mass before it). The maximum always passes
    (mass 0), unless top_p <= 0, where nothing passes and the search returns the maximum: the argmax survives."""
    high = jnp.max(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - high)
    probs = probs / _row_sum(probs)
    low = jnp.min(jnp.where(logits > -jnp.inf, logits, high), axis=-1, keepdims=True)
    return _smallest_passing(low, high, lambda t: _row_sum(jnp.where(logits > t, probs, 0.0)) < top_p)


def filter_logits(
    logits: jax.Array, temperature: jax.Array | float, *, top_k: int = 0, top_p: jax.Array | float = 1.0
) -> jax.Array:
    """Tempered float32 logits with the tokens outside top-k / top-p set to -inf. [..., V]."""
    tempered = apply_temperature(logits, temperature)
    tempered = jnp.where(top_k_mask(tempered, top_k), tempered, -jnp.inf)
    top_p = jnp.asarray(top_p, jnp.float32)
    # Finding the nucleus is a sort or 32 passes over the logits: skip it when top_p >= 1.
    return jax.lax.cond(
        top_p < 1.0,
        lambda x: jnp.where(top_p_mask(x, top_p), x, -jnp.inf),
        lambda x: x,
        tempered,
    )


_SCAN_BLOCK = 32


def cumulative_sum(x: jax.Array) -> jax.Array:
    """Inclusive cumulative sum over the last axis, `[..., V]` -> `[..., V]`, as triangular matmuls over blocks
    of 32 entries plus an exclusive sum of the block totals (itself blocked, so any V works).

    Same values as `jnp.cumsum` up to float rounding (another summation order). On CPU, XLA lowers `jnp.cumsum`
    to reduce-windows: ≈ 580 µs for [32, 1536] against ≈ 70 µs here (the sampler runs once per decode step).
    Within a block of non-negative x the result never decreases and a zero entry repeats its predecessor
    exactly (one matmul, the same operations for every column); across a block boundary the two levels'
    roundings can differ by an ulp, so the result may decrease by an ulp there (as `jnp.cumsum`'s tree can).
    """
    return _block_scan(x, exclusive=False)


def _block_scan(x: jax.Array, exclusive: bool) -> jax.Array:
    size = x.shape[-1]
    if size <= _SCAN_BLOCK:
        return x @ jnp.triu(jnp.ones((size, size), x.dtype), 1 if exclusive else 0)
    blocks = -(-size // _SCAN_BLOCK)
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, blocks * _SCAN_BLOCK - size)])
    padded = padded.reshape(*x.shape[:-1], blocks, _SCAN_BLOCK)
    within = padded @ jnp.triu(jnp.ones((_SCAN_BLOCK, _SCAN_BLOCK), x.dtype), 1 if exclusive else 0)
    before = _block_scan(jnp.sum(padded, axis=-1), exclusive=True)  # [..., blocks]: the mass of earlier blocks
    return (within + before[..., None]).reshape(*x.shape[:-1], blocks * _SCAN_BLOCK)[..., :size]


def first_argmax(x: jax.Array) -> jax.Array:
    """`[...]` int32: the first index of the largest entry along the last axis (the tie rule of torch and
    `jnp.argmax`), for x `[..., V]` float without NaN.

    A max and a min over a float index (exact for V < 2^24): on CPU, XLA's argmax (a variadic reduce) costs
    ≈ 5× more at [32, 1536].
    """
    size = x.shape[-1]
    is_top = x == jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(is_top, jnp.arange(size, dtype=jnp.float32), jnp.float32(size)), axis=-1)
    return jnp.minimum(index.astype(jnp.int32), size - 1)


def _inverse_cdf(weights: jax.Array, uniform: jax.Array, fallback: jax.Array) -> jax.Array:
    """The token j with cdf[j-1] < r <= cdf[j], r = (1 - u) * total in (0, total], for weights `[..., V]` >= 0
    and u `[..., 1]` in [0, 1). A weight-0 token has cdf[j] == cdf[j-1] inside a block of `cumulative_sum` and
    is never drawn there; should the ulp-level rounding at a block boundary select one (probability ~1e-7),
    `fallback` `[...]` (a token of positive weight) is returned instead, so only tokens of positive weight
    are ever drawn."""
    cdf = cumulative_sum(weights)
    threshold = (1.0 - uniform) * cdf[..., -1:]
    # A float sum of 0/1 is exact below 2^24 and vectorises; an int32 sum does not on CPU.
    index = jnp.sum((cdf < threshold).astype(jnp.float32), axis=-1).astype(jnp.int32)
    index = jnp.minimum(index, weights.shape[-1] - 1)
    drawn_weight = jnp.take_along_axis(weights, index[..., None], axis=-1)[..., 0]
    return jnp.where(drawn_weight > 0, index, fallback)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One draw per row from softmax(logits): logits `[..., V]` float32 (-inf = excluded; at least one finite
    per row). Returns `[...]` int32.

    Inverse CDF with one uniform per row: the token j with cdf[j-1] < r <= cdf[j], r = (1 - u) * total in
    (0, total]. A token of probability 0 is never drawn. Same distribution as `jax.random.categorical`
    (Gumbel-max), which draws V uniforms per row: on CPU generating those dominated the sampler (≈ 3 ms of a
    decode step at batch 64, vocab 1536; this sampler ≈ 0.2 ms).
    """
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # excluded tokens: 0, the max: 1
    uniform = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32)
    return _inverse_cdf(weights, uniform, first_argmax(logits))


def sample_tokens(
    key: jax.Array,
    logits: jax.Array,
    temperature: jax.Array | float = 1.0,
    *,
    top_k: int = 0,
    top_p: jax.Array | float = 1.0,
    uniform: jax.Array | None = None,
    repetition_penalty: jax.Array | float | None = None,
    seen: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Sample one token per row and return it with its behaviour log-prob.

    logits: [B, V]; temperature, top_p: traced scalars; top_k: static int (0 = off). `uniform` `[B, 1]` in
    [0, 1): the draws to use instead of `jax.random.uniform(key, (B, 1))` (the rollout makes every step's at
    once, before its decode loop); the key is then unused. `repetition_penalty` (traced scalar > 0) with `seen`
    (bool [B, V]: the tokens already in each row's sequence) penalises those tokens' logits before temperature,
    top-k and top-p (`apply_repetition_penalty`); None: no penalty.
    Temperature 0 is greedy (argmax of the raw logits; the first index wins a tie, as in torch).
    Returns (tokens [B] int32, logprobs [B] float32) where logprobs = log softmax(logits / T)[token] over
    the full distribution (not the top-k / top-p / repetition-penalised one).

    One pass over the tempered logits serves both: the max, exp(x - max) and its sum give the log-softmax
    (the formula of `jax.nn.log_softmax`), and the same exponentials, zeroed outside top-k / top-p, are the
    sampling weights.
    """
    if (repetition_penalty is None) != (seen is None):
        raise ValueError("sample_tokens: repetition_penalty and seen go together; pass both or neither")
    temperature = jnp.asarray(temperature, jnp.float32)
    tempered = apply_temperature(logits, temperature)
    shifted = tempered - jnp.max(tempered, axis=-1, keepdims=True)
    weights = jnp.exp(shifted)
    log_total = jnp.log(jnp.sum(weights, axis=-1))
    if seen is None:
        target, target_tempered, target_weights = logits, tempered, weights
    else:  # the penalised distribution is sampled; the log-probs above stay the model's
        chex.assert_equal_shape([logits, seen])
        target = apply_repetition_penalty(logits, seen, repetition_penalty)
        target_tempered = apply_temperature(target, temperature)
        target_weights = jnp.exp(target_tempered - jnp.max(target_tempered, axis=-1, keepdims=True))
    kept = filter_logits(target, temperature, top_k=top_k, top_p=top_p) > -jnp.inf
    greedy = first_argmax(target_tempered)  # the argmax of the raw logits at T = 0 (divisor 1), kept by every filter
    if uniform is None:
        uniform = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32)
    sampled = _inverse_cdf(jnp.where(kept, target_weights, 0.0), uniform, greedy)
    tokens = jnp.where(temperature > 0, sampled, greedy)
    logprobs = jnp.take_along_axis(shifted, tokens[..., None], axis=-1)[..., 0] - log_total
    return tokens, logprobs
