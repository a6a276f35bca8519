"""Rollout loop and scoring tests on FAKE models (tests/fake_models.py), jitted and un-jitted.

The fakes follow the ppojax.models contract; parity with transformers on the real models is in
tests/test_rollout_hf.py.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from chi_square import chi_square_pvalue
from fake_models import BagOfWordsLM, TableLM
from ppojax import rollout as R

PAD = 16  # a token the fake model's greedy decoding never emits, so padding is visible
MODEL = BagOfWordsLM()
PARAMS = MODEL.init(jax.random.key(0))
PROMPTS = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12], [5]]
PROMPT_IDS, PROMPT_MASK = R.pad_prompts(PROMPTS, PAD, bucket=8)
N = 6

rollout_jit = jax.jit(R.rollout, static_argnames=R.ROLLOUT_STATIC_ARGNAMES)


def _run(jit, **kw):
    fn = rollout_jit if jit else R.rollout
    kw.setdefault("max_new_tokens", N)
    kw.setdefault("stop_token_ids", [])
    kw.setdefault("pad_token_id", PAD)
    return fn(MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, jax.random.key(7), **kw)


@jax.jit
def _last_logits(ids, length):
    """Logits at column length - 1 of one right-padded row [1, W] (no cache, full causal pass)."""
    mask = (jnp.arange(ids.shape[1]) < length).astype(jnp.int32)[None]
    return MODEL.apply(PARAMS, ids, mask).logits[0, length - 1]


def _greedy_without_cache(prompts, n):
    """Reference decoding: one full forward over the whole (unpadded) sequence per new token."""
    responses = []
    for prompt in prompts:
        ids = np.zeros((1, len(prompt) + n), np.int32)
        ids[0, : len(prompt)] = prompt
        for i in range(len(prompt), len(prompt) + n):
            ids[0, i] = int(jnp.argmax(_last_logits(ids, i)))
        responses.append(ids[0, len(prompt):])
    return np.array(responses)


def _mixed_stop_token(full):
    """A token of row 0 (earliest first) that some other row never emits: some rows stop, some do not."""
    for token in full[0]:
        if not all(token in row for row in full):
            return int(token)
    raise AssertionError("test setup: every token of row 0 appears in every row")


def _cut_at_stop(full, stop_ids):
    """Expected (ids, mask) from unstopped responses: pad after the first stop token, which is kept."""
    ids, mask = np.full_like(full, PAD), np.zeros_like(full)
    for row, tokens in enumerate(full):
        for col, token in enumerate(tokens):
            ids[row, col], mask[row, col] = token, 1
            if token in stop_ids:
                break
    return ids, mask


# ----------------------------------------------------------------------------------------------------------


def test_bucket_length_and_pad_prompts():
    assert [R.bucket_length(n, 64) for n in (1, 63, 64, 65, 200)] == [64, 64, 64, 128, 256]
    assert R.bucket_length(0, 16) == 16
    ids, mask = R.pad_prompts([[5, 6, 7], [9]], pad_token_id=1, bucket=4)
    np.testing.assert_array_equal(ids, [[1, 5, 6, 7], [1, 1, 1, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    assert ids.dtype == mask.dtype == np.int32
    with pytest.raises(ValueError, match="empty prompt"):
        R.pad_prompts([[1], []], 0)
    with pytest.raises(ValueError, match="positive"):
        R.bucket_length(3, 0)


@pytest.mark.parametrize("jit", [True, False])
def test_greedy_matches_uncached_decoding_and_stops_exactly(jit):
    full = _greedy_without_cache(PROMPTS, N)
    stop = _mixed_stop_token(full)
    stop_rows = [r for r in range(len(PROMPTS)) if stop in full[r]]
    assert 0 < len(stop_rows) < len(PROMPTS), "test setup: want rows that stop and rows that do not"
    want_ids, want_mask = _cut_at_stop(full, [stop])

    out = _run(jit, temperature=0.0, stop_token_ids=[stop])
    np.testing.assert_array_equal(out.response_ids, want_ids)
    np.testing.assert_array_equal(out.response_mask, want_mask)
    np.testing.assert_array_equal(out.lengths, want_mask.sum(1))
    np.testing.assert_array_equal(out.stopped, [r in stop_rows for r in range(len(PROMPTS))])
    assert out.response_ids.dtype == out.response_mask.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.logprobs)[want_mask == 0], 0.0)
    assert np.all(np.asarray(out.logprobs)[want_mask == 1] < 0)


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_behaviour_logprobs_equal_teacher_forced(jit, temperature):
    stop = _mixed_stop_token(np.asarray(_run(True, temperature=temperature).response_ids))
    out = _run(jit, temperature=temperature, stop_token_ids=[stop, 99])
    assert np.any(out.stopped) and not np.all(out.stopped), "test setup: want stopped and unstopped rows"
    score_fn = jax.jit(R.response_logprobs, static_argnums=0) if jit else R.response_logprobs
    teacher = score_fn(MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, out.response_ids, out.response_mask, temperature)
    np.testing.assert_allclose(teacher, out.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(teacher)[np.asarray(out.response_mask) == 0], 0.0)


def test_logprobs_are_tempered():
    hot = _run(True, temperature=2.0)
    tf = functools.partial(R.response_logprobs, MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, hot.response_ids)
    np.testing.assert_allclose(tf(hot.response_mask, 2.0), hot.logprobs, atol=1e-5)
    assert np.max(np.abs(tf(hot.response_mask, 1.0) - hot.logprobs)) > 1e-2


def test_same_key_same_responses_different_key_different():
    first = _run(True)
    again = _run(True)
    other = rollout_jit(
        MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, jax.random.key(8), max_new_tokens=N, stop_token_ids=[], pad_token_id=PAD
    )
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first.response_ids, other.response_ids)


def test_jit_and_no_jit_agree():
    chex.assert_trees_all_close(_run(True, stop_token_ids=[1, 2]), _run(False, stop_token_ids=[1, 2]), atol=1e-6)


def test_rows_stopped_from_the_first_token_and_early_exit():
    calls = []

    class Counting(BagOfWordsLM):
        def apply(self, params, input_ids, attention_mask, **kw):
            jax.debug.callback(lambda: calls.append(input_ids.shape[1]))
            return super().apply(params, input_ids, attention_mask, **kw)

    full = _greedy_without_cache(PROMPTS, 3)
    stops = sorted({int(t) for t in full[:, :3].ravel()})  # every row stops within 3 tokens
    out = rollout_jit(
        Counting(), PARAMS, PROMPT_IDS, PROMPT_MASK, jax.random.key(0),
        max_new_tokens=N, temperature=0.0, stop_token_ids=stops, pad_token_id=PAD,
    )
    jax.effects_barrier()
    assert np.all(out.stopped) and np.all(out.lengths == 1)
    np.testing.assert_array_equal(out.response_ids[:, 1:], PAD)
    assert calls == [PROMPT_IDS.shape[1]], "expected the prefill only: all rows stopped at the first token"

    calls.clear()
    row, col = next((r, c) for c in range(1, 3) for r in range(len(PROMPTS)) if full[r, c] not in full[r, :c])
    stop = int(full[row, col])
    out = rollout_jit(
        Counting(), PARAMS, PROMPT_IDS[row : row + 1], PROMPT_MASK[row : row + 1], jax.random.key(0),
        max_new_tokens=N, temperature=0.0, stop_token_ids=[stop], pad_token_id=PAD,
    )
    jax.effects_barrier()
    assert int(out.lengths[0]) == col + 1 and calls == [PROMPT_IDS.shape[1]] + [1] * col


def test_unpadded_and_padded_prompts_give_the_same_rollout():
    out = _run(True, temperature=0.0)
    single_ids, single_mask = R.pad_prompts(PROMPTS[1:2], PAD, bucket=1)  # no padding at all
    single = rollout_jit(
        MODEL, PARAMS, single_ids, single_mask, jax.random.key(7),
        max_new_tokens=N, temperature=0.0, stop_token_ids=[], pad_token_id=PAD,
    )
    np.testing.assert_array_equal(single.response_ids[0], out.response_ids[1])
    np.testing.assert_allclose(single.logprobs[0], out.logprobs[1], atol=1e-5)


def test_compiles_once_per_prompt_bucket():
    traced = jax.jit(chex.assert_max_traces(R.rollout, n=2), static_argnames=R.ROLLOUT_STATIC_ARGNAMES)
    kw = dict(max_new_tokens=4, top_k=3)
    for temperature, top_p, stops, seed in [(1.0, 1.0, [1], 0), (0.5, 0.9, [2], 1), (0.0, 0.3, [3], 2)]:
        traced(MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, jax.random.key(seed), temperature=temperature,
               top_p=top_p, stop_token_ids=jnp.asarray(stops), pad_token_id=PAD, **kw)
    wide_ids, wide_mask = R.pad_prompts(PROMPTS + [list(range(1, 12))], PAD, bucket=8)  # next bucket: 16
    traced(MODEL, PARAMS, wide_ids, wide_mask, jax.random.key(0), stop_token_ids=jnp.asarray([1]), pad_token_id=PAD, **kw)
    with pytest.raises(AssertionError, match="traced > 2"):
        traced(MODEL, PARAMS, wide_ids, wide_mask, jax.random.key(0), stop_token_ids=jnp.asarray([1]),
               pad_token_id=PAD, max_new_tokens=5, top_k=3)


# ----------------------------------------------------------------------------------------------------------
# The sampler inside the loop, on a fixed-table fake model

TABLE = jnp.log(jnp.array([0.05, 0.3, 0.1, 0.25, 0.12, 0.18]))


def _table_rollout(n_rows, **kw):
    ids = jnp.ones((n_rows, 2), jnp.int32)
    return rollout_jit(TableLM(), {"table": TABLE}, ids, ids, jax.random.key(11), max_new_tokens=4,
                       stop_token_ids=[], pad_token_id=PAD, **kw)


def test_rollout_samples_follow_tempered_softmax():
    out = _table_rollout(2000, temperature=0.8)
    probs = np.asarray(jax.nn.softmax(TABLE / 0.8))
    for col in range(4):  # each column is an independent draw from the same table
        assert chi_square_pvalue(out.response_ids[:, col], probs) > 1e-3
    np.testing.assert_allclose(out.logprobs, np.log(probs)[np.asarray(out.response_ids)], atol=1e-5)


def test_rollout_top_k_and_top_p_keep_the_right_tokens():
    top_k = _table_rollout(500, top_k=2)
    assert set(np.unique(top_k.response_ids)) == {1, 3}
    top_p = _table_rollout(500, top_p=0.6)  # 0.3 + 0.25 < 0.6 → add 0.18
    assert set(np.unique(top_p.response_ids)) == {1, 3, 5}


# ----------------------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("jit", [True, False])
def test_score_bundles_policy_reference_critic_and_reward(jit):
    stop = _mixed_stop_token(np.asarray(_run(True, temperature=0.7).response_ids))
    out = _run(True, temperature=0.7, stop_token_ids=[stop])
    assert np.any(out.stopped) and not np.all(out.stopped), "test setup: want stopped and unstopped rows"
    lora = {"bias": jnp.linspace(-1.0, 1.0, MODEL.vocab_size)}
    score_fn = R.score
    if jit:
        score_fn = jax.jit(R.score, static_argnames=("policy_model", "critic_model", "reward_model"))
    batch = (PROMPT_IDS, PROMPT_MASK, out.response_ids, out.response_mask)
    got = score_fn(MODEL, PARAMS, *batch, temperature=0.7, critic_model=MODEL, critic_params=PARAMS,
                   reward_model=MODEL, reward_params=PARAMS, lora=lora)
    mask = np.asarray(out.response_mask) == 1

    np.testing.assert_allclose(got.logprobs, R.response_logprobs(MODEL, PARAMS, *batch, 0.7, lora=lora), atol=1e-6)
    np.testing.assert_allclose(got.ref_logprobs, out.logprobs, atol=1e-5)  # reference = adapters off
    assert np.max(np.abs(got.logprobs - got.ref_logprobs)) > 1e-2

    # Values: the value head at the column that predicts each response token, in the unpadded sequence.
    # Reward: the reward head at the last real token.
    for row, prompt in enumerate(PROMPTS):
        length = int(out.lengths[row])
        seq = jnp.asarray([prompt + list(np.asarray(out.response_ids[row, :length]))], jnp.int32)
        ref = MODEL.apply(PARAMS, seq, jnp.ones_like(seq))
        np.testing.assert_allclose(got.values[row, :length], ref.values[0, len(prompt) - 1 : -1], atol=1e-5)
        np.testing.assert_allclose(got.scores[row], ref.scores[0, -1], atol=1e-5)
    for field in (got.logprobs, got.ref_logprobs, got.values):
        assert field.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(field)[~mask], 0.0)


def test_score_requires_a_reference():
    with pytest.raises(ValueError, match="ref_params"):
        R.score(MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, PROMPT_IDS, PROMPT_MASK, temperature=1.0,
                critic_model=MODEL, critic_params=PARAMS, reward_model=MODEL, reward_params=PARAMS)
