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

from rollout_testing import chi_square_pvalue, jit_for_tests
from fake_models import BagOfWordsLM, TableLM
import ppojax
from ppojax import generation as R
from ppojax.models import DecoderModel, ModelConfig, init_lora, merge_lora

PAD = 16  # a token the fake model's greedy decoding never emits, so padding is visible
MODEL = BagOfWordsLM()
PARAMS = MODEL.init(jax.random.key(0))
PROMPTS = ((3, 4, 5, 6, 7), (8, 9), (10, 11, 12), (5,))
PROMPT_IDS, PROMPT_MASK = R.pad_prompts(PROMPTS, PAD, bucket=8)
N = 6

rollout_jit = R.rollout_jit  # the library's entry point: one program per static configuration
response_logprobs_jit = jit_for_tests(R.response_logprobs, static_argnums=0)


def _stops(*ids):
    """Stop ids padded with -1 (never a token) to a fixed count, so every stop set shares one program."""
    assert len(ids) <= 6
    return np.array(list(ids) + [-1] * (6 - len(ids)), np.int32)


def _run(jit=True, *, model=MODEL, prompt_ids=PROMPT_IDS, prompt_mask=PROMPT_MASK, key=7, stops=(), **kw):
    fn = rollout_jit if jit else R.rollout
    kw.setdefault("max_new_tokens", N)
    return fn(
        model,
        PARAMS,
        prompt_ids,
        prompt_mask,
        jax.random.key(key),
        stop_token_ids=_stops(*stops),
        pad_token_id=PAD,
        **kw,
    )


@jax.jit
def _last_logits(ids, length):
    """Logits at column length - 1 of one right-padded row [1, W] (no cache, full causal pass)."""
    mask = (jnp.arange(ids.shape[1]) < length).astype(jnp.int32)[None]
    return MODEL.apply(PARAMS, ids, mask).logits[0, length - 1]


@functools.lru_cache
def _greedy_without_cache(prompts, n):
    """Reference decoding: one full forward over the whole (unpadded) sequence per new token."""
    responses = []
    for prompt in prompts:
        ids = np.zeros((1, max(map(len, PROMPTS)) + N), np.int32)  # one width: one compilation
        ids[0, : len(prompt)] = prompt
        for i in range(len(prompt), len(prompt) + n):
            ids[0, i] = int(jnp.argmax(_last_logits(ids, i)))
        responses.append(ids[0, len(prompt) : len(prompt) + n])
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


def test_greedy_matches_uncached_decoding_and_stops_exactly():
    full = _greedy_without_cache(PROMPTS, N)
    stop = _mixed_stop_token(full)
    stop_rows = [r for r in range(len(PROMPTS)) if stop in full[r]]
    assert 0 < len(stop_rows) < len(PROMPTS), "test setup: want rows that stop and rows that do not"
    want_ids, want_mask = _cut_at_stop(full, [stop])

    out = _run(temperature=0.0, stops=[stop])
    np.testing.assert_array_equal(out.response_ids, want_ids)
    np.testing.assert_array_equal(out.response_mask, want_mask)
    np.testing.assert_array_equal(out.lengths, want_mask.sum(1))
    np.testing.assert_array_equal(out.stopped, [r in stop_rows for r in range(len(PROMPTS))])
    assert out.response_ids.dtype == out.response_mask.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out.logprobs)[want_mask == 0], 0.0)
    assert np.all(np.asarray(out.logprobs)[want_mask == 1] < 0)


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_behaviour_logprobs_equal_teacher_forced(temperature):
    stop = _mixed_stop_token(np.asarray(_run(temperature=temperature).response_ids))
    out = _run(temperature=temperature, stops=[stop, 99])
    assert np.any(out.stopped) and not np.all(out.stopped), "test setup: want stopped and unstopped rows"
    teacher = response_logprobs_jit(
        MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, out.response_ids, out.response_mask, temperature
    )
    np.testing.assert_allclose(teacher, out.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(teacher)[np.asarray(out.response_mask) == 0], 0.0)


def test_logprobs_are_tempered():
    hot = _run(temperature=2.0)
    tf = functools.partial(response_logprobs_jit, MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, hot.response_ids)
    np.testing.assert_allclose(tf(hot.response_mask, 2.0), hot.logprobs, atol=1e-5)
    assert np.max(np.abs(tf(hot.response_mask, 1.0) - hot.logprobs)) > 1e-2


def test_same_key_same_responses_different_key_different():
    first, again, other = _run(), _run(), _run(key=8)
    chex.assert_trees_all_equal(first, again)
    assert not np.array_equal(first.response_ids, other.response_ids)


@pytest.mark.slow  # un-jitted: eager prefill and scoring compile op by op (~15 s on the shared 2-core box)
def test_jit_and_no_jit_agree():
    # Stop ids that key 7 samples mid-response in some rows but not all (checked below: the stop path is exercised).
    jitted = _run(temperature=0.7, stops=[4, 11])
    plain = _run(False, temperature=0.7, stops=[4, 11])
    chex.assert_trees_all_close(jitted, plain, atol=1e-6)
    assert np.any(plain.stopped) and not np.all(plain.stopped)
    teacher = R.response_logprobs(MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, plain.response_ids, plain.response_mask, 0.7)
    np.testing.assert_allclose(teacher, plain.logprobs, atol=1e-5, rtol=0)


def test_one_new_token():
    out = _run(max_new_tokens=1, temperature=0.0)
    np.testing.assert_array_equal(out.response_ids[:, 0], _greedy_without_cache(PROMPTS, 1)[:, 0])
    np.testing.assert_array_equal(out.lengths, 1)
    np.testing.assert_array_equal(out.response_mask, 1)


def test_rows_stopped_from_the_first_token_and_early_exit():
    calls = []

    class Counting(BagOfWordsLM):
        def apply(self, params, input_ids, attention_mask, **kw):
            jax.debug.callback(lambda: calls.append(input_ids.shape[1]))
            return super().apply(params, input_ids, attention_mask, **kw)

    full = _greedy_without_cache(PROMPTS, N)
    out = _run(model=Counting(), temperature=0.0, stops=sorted({int(t) for t in full[:, 0]}))
    jax.effects_barrier()
    assert np.all(out.stopped) and np.all(out.lengths == 1)
    np.testing.assert_array_equal(out.response_ids[:, 1:], PAD)
    assert calls == [PROMPT_IDS.shape[1]], "expected the prefill only: all rows stopped at the first token"

    # Each row's first new token that differs from its earlier ones: every row stops within N - 1 tokens.
    stops = sorted({int(next(t for c, t in enumerate(row) if c and t not in row[:c])) for row in full})
    want_ids, want_mask = _cut_at_stop(full, stops)
    longest = int(want_mask.sum(1).max())
    assert 1 < longest < N, "test setup: want an early exit after some decode steps"
    calls.clear()
    out = _run(model=Counting(), temperature=0.0, stops=stops)
    jax.effects_barrier()
    np.testing.assert_array_equal(out.response_ids, want_ids)
    assert calls == [PROMPT_IDS.shape[1]] + [1] * (longest - 1), "one decode step per column until all stopped"


def test_unpadded_and_padded_prompts_give_the_same_rollout():
    out = _run(temperature=0.0)
    single_ids, single_mask = R.pad_prompts(PROMPTS[1:2], PAD, bucket=1)  # no padding at all
    single = _run(prompt_ids=single_ids, prompt_mask=single_mask, temperature=0.0)
    np.testing.assert_array_equal(single.response_ids[0], out.response_ids[1])
    np.testing.assert_allclose(single.logprobs[0], out.logprobs[1], atol=1e-5)


def test_compiles_once_per_prompt_bucket():
    traced = jit_for_tests(chex.assert_max_traces(R.rollout, n=2), static_argnames=R.ROLLOUT_STATIC_ARGNAMES)
    kw = dict(max_new_tokens=4, top_k=3)
    for temperature, top_p, stops, seed in [(1.0, 1.0, [1], 0), (0.5, 0.9, [2], 1), (0.0, 0.3, [3], 2)]:
        traced(
            MODEL,
            PARAMS,
            PROMPT_IDS,
            PROMPT_MASK,
            jax.random.key(seed),
            temperature=temperature,
            top_p=top_p,
            stop_token_ids=jnp.asarray(stops),
            pad_token_id=PAD,
            **kw,
        )
    wide_ids, wide_mask = R.pad_prompts(list(PROMPTS) + [list(range(1, 12))], PAD, bucket=8)  # next bucket: 16
    traced(
        MODEL, PARAMS, wide_ids, wide_mask, jax.random.key(0), stop_token_ids=jnp.asarray([1]), pad_token_id=PAD, **kw
    )
    with pytest.raises(AssertionError, match="traced > 2"):
        traced(
            MODEL,
            PARAMS,
            wide_ids,
            wide_mask,
            jax.random.key(0),
            stop_token_ids=jnp.asarray([1]),
            pad_token_id=PAD,
            max_new_tokens=5,
            top_k=3,
        )


def test_library_rollout_jit_does_not_retrace_on_scalar_types_or_defaults():
    _run()
    before = R._rollout_compiled._cache_size()
    _run(temperature=np.float32(0.5), top_p=0.9, key=1)
    _run(temperature=jnp.float32(0.0), top_p=jnp.asarray(0.5), key=2)
    _run(temperature=1, top_k=0, key=3)
    R.rollout_jit(
        MODEL,
        PARAMS,
        PROMPT_IDS,
        PROMPT_MASK,
        jax.random.key(4),
        max_new_tokens=N,
        stop_token_ids=tuple(_stops(4)),
        pad_token_id=np.int64(3),
    )
    assert R._rollout_compiled._cache_size() == before


# ----------------------------------------------------------------------------------------------------------
# The sampler inside the loop, on a fixed-table fake model

TABLE = jnp.log(jnp.array([0.05, 0.3, 0.1, 0.25, 0.12, 0.18]))


def _table_rollout(**kw):
    ids = jnp.ones((2000, 2), jnp.int32)
    return rollout_jit(
        TableLM(),
        {"table": TABLE},
        ids,
        ids,
        jax.random.key(11),
        max_new_tokens=4,
        stop_token_ids=[],
        pad_token_id=PAD,
        **kw,
    )


def test_rollout_samples_follow_tempered_softmax():
    out = _table_rollout(temperature=0.8)
    probs = np.asarray(jax.nn.softmax(TABLE / 0.8))
    for col in range(4):  # each column is an independent draw from the same table
        assert chi_square_pvalue(out.response_ids[:, col], probs) > 1e-3
    np.testing.assert_allclose(out.logprobs, np.log(probs)[np.asarray(out.response_ids)], atol=1e-5)


def test_rollout_top_k_and_top_p_keep_the_right_tokens():
    top_k = _table_rollout(top_k=2)
    assert set(np.unique(top_k.response_ids)) == {1, 3}
    top_p = _table_rollout(top_p=0.6)  # 0.3 + 0.25 < 0.6 → add 0.18
    assert set(np.unique(top_p.response_ids)) == {1, 3, 5}


# ----------------------------------------------------------------------------------------------------------
# Scoring

SCORE_STATIC = ("policy_model", "critic_model", "reward_model")
SCORE_MODELS = dict(critic_model=MODEL, critic_params=PARAMS, reward_model=MODEL, reward_params=PARAMS)


def _stopping_rollout():
    """A sampled rollout (T 0.7) with a stop token that some rows emit and some do not."""
    stop = _mixed_stop_token(np.asarray(_run(temperature=0.7).response_ids))
    out = _run(temperature=0.7, stops=[stop])
    assert np.any(out.stopped) and not np.all(out.stopped), "test setup: want stopped and unstopped rows"
    return out


def _plain_pass(out):
    """Reference for the teacher-forced passes: each row's prompt + response without left padding
    (right-padded), through one plain forward."""
    width = PROMPT_IDS.shape[1] + N
    seq_ids, seq_mask = np.zeros((len(PROMPTS), width), np.int32), np.zeros((len(PROMPTS), width), np.int32)
    for row, prompt in enumerate(PROMPTS):
        tokens = list(prompt) + list(np.asarray(out.response_ids[row, : int(out.lengths[row])]))
        seq_ids[row, : len(tokens)], seq_mask[row, : len(tokens)] = tokens, 1
    return jit_for_tests(MODEL.apply)(PARAMS, seq_ids, seq_mask)


def test_score_bundles_policy_reference_critic_and_reward():
    out = _stopping_rollout()
    lora = {"bias": jnp.linspace(-1.0, 1.0, MODEL.vocab_size)}
    score_fn = jit_for_tests(R.score, static_argnames=SCORE_STATIC)
    batch = (PROMPT_IDS, PROMPT_MASK, out.response_ids, out.response_mask)
    got = score_fn(MODEL, PARAMS, *batch, temperature=0.7, **SCORE_MODELS, lora=lora)
    mask = np.asarray(out.response_mask) == 1

    np.testing.assert_allclose(got.logprobs, R.response_logprobs(MODEL, PARAMS, *batch, 0.7, lora=lora), atol=1e-6)
    np.testing.assert_allclose(got.ref_logprobs, out.logprobs, atol=1e-5)  # reference = adapters off
    assert np.max(np.abs(got.logprobs - got.ref_logprobs)) > 1e-2

    # Values: the value head at the column that predicts each response token; reward: the reward head at
    # the last real token.
    ref = _plain_pass(out)
    for row, prompt in enumerate(PROMPTS):
        length, start = int(out.lengths[row]), len(prompt) - 1
        np.testing.assert_allclose(got.values[row, :length], ref.values[row, start : start + length], atol=1e-5)
        np.testing.assert_allclose(got.scores[row], ref.scores[row, start + length], atol=1e-5)
    for field in (got.logprobs, got.ref_logprobs, got.values):
        assert field.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(field)[~mask], 0.0)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_score_takes_the_old_logprobs_from_the_rollout(jit):
    out = _stopping_rollout()
    # Behaviour log-probs with junk where masked: score must zero them, not pass them through.
    junk = jnp.where(out.response_mask > 0, out.logprobs, -7.0)
    kwargs = dict(temperature=0.7, **SCORE_MODELS, ref_params=PARAMS)
    fn = jit_for_tests(R.score, static_argnames=SCORE_STATIC) if jit else R.score
    batch = (PROMPT_IDS, PROMPT_MASK, out.response_ids, out.response_mask)
    got = fn(MODEL, PARAMS, *batch, old_logprobs=junk, **kwargs)
    recomputed = fn(MODEL, PARAMS, *batch, **kwargs)
    mask = np.asarray(out.response_mask) == 1
    np.testing.assert_array_equal(np.asarray(got.logprobs)[mask], np.asarray(out.logprobs)[mask])
    np.testing.assert_array_equal(np.asarray(got.logprobs)[~mask], 0.0)
    # The teacher-forced pass it replaces gives the same numbers within float32 rounding.
    np.testing.assert_allclose(got.logprobs, recomputed.logprobs, atol=1e-5, rtol=0)
    for name in ("ref_logprobs", "values", "scores"):
        np.testing.assert_array_equal(getattr(got, name), getattr(recomputed, name), err_msg=name)
    with pytest.raises(
        ValueError, match=r"score: old_logprobs has shape \(4, 5\); expected the response shape \(4, 6\)"
    ):
        R.score(MODEL, PARAMS, *batch, old_logprobs=out.logprobs[:, :5], **kwargs)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_score_keeps_the_values_on_the_value_mask(jit):
    """TRL's convention trains the value one slot past each stopped response: `score(value_mask=)` keeps the
    critic's value there (the head at the stop token's own column), which the default zeroes."""
    out = _stopping_rollout()
    lengths = np.asarray(out.lengths)
    assert np.any(lengths < N) and np.any(lengths == N), "test setup: want rows with and without a +1 slot"
    kwargs = dict(temperature=0.7, **SCORE_MODELS, ref_params=PARAMS)
    fn = jit_for_tests(R.score, static_argnames=SCORE_STATIC) if jit else R.score
    batch = (PROMPT_IDS, PROMPT_MASK, out.response_ids, out.response_mask)
    value_mask = ppojax.extend_mask(out.response_mask)
    got = fn(MODEL, PARAMS, *batch, value_mask=value_mask, **kwargs)
    default = fn(MODEL, PARAMS, *batch, **kwargs)
    # Reference: the value head of one plain pass over each row's prompt + response (+ the stop token's column).
    ref = _plain_pass(out)
    for row, prompt in enumerate(PROMPTS):
        start, kept = len(prompt) - 1, min(lengths[row] + 1, N)
        np.testing.assert_allclose(got.values[row, :kept], ref.values[row, start : start + kept], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got.values)[row, kept:], 0.0)
        np.testing.assert_array_equal(np.asarray(default.values)[row, lengths[row] :], 0.0)
    extra = np.asarray(value_mask) & (np.asarray(out.response_mask) == 0)
    assert extra.sum() == np.sum(lengths < N) and np.abs(np.asarray(got.values)[extra]).min() > 1e-3
    in_response = np.asarray(out.response_mask) > 0
    np.testing.assert_array_equal(np.asarray(got.values)[in_response], np.asarray(default.values)[in_response])
    for name in ("logprobs", "ref_logprobs", "scores"):
        np.testing.assert_array_equal(getattr(got, name), getattr(default, name), err_msg=name)
    with pytest.raises(ValueError, match=r"response_values: value_mask has shape \(4, 5\); expected the response"):
        R.score(MODEL, PARAMS, *batch, value_mask=value_mask[:, :5], **kwargs)


def test_input_guards():
    with pytest.raises(ValueError, match="max_new_tokens"):
        _run(max_new_tokens=0)
    with pytest.raises(AssertionError):
        _run(prompt_ids=PROMPT_IDS[0], prompt_mask=PROMPT_MASK[0])
    with pytest.raises(AssertionError):
        R.response_logprobs(MODEL, PARAMS, PROMPT_IDS, PROMPT_MASK, PROMPT_IDS, PROMPT_MASK[:, :3], 1.0)


def test_score_requires_a_reference():
    with pytest.raises(ValueError, match="ref_params"):
        R.score(
            MODEL,
            PARAMS,
            PROMPT_IDS,
            PROMPT_MASK,
            PROMPT_IDS,
            PROMPT_MASK,
            temperature=1.0,
            critic_model=MODEL,
            critic_params=PARAMS,
            reward_model=MODEL,
            reward_params=PARAMS,
        )


# ----------------------------------------------------------------------------------------------------------
# LoRA: the rollout samples from the merged weights (float32), the teacher-forced pass keeps the adapters apart


def _lora_setup(dtype=jnp.float32):
    config = ModelConfig(
        model_type="qwen2", vocab_size=48, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=8, max_position_embeddings=64, qkv_bias=True, tie_word_embeddings=True,
    )  # fmt: skip
    model = DecoderModel(config, dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), model.init_params(jax.random.key(0)))
    lora = init_lora(model, jax.random.key(1), rank=4, targets="all")
    # b = 0 would leave the model unchanged: give every adapter a real effect.
    b_keys = iter(jax.random.split(jax.random.key(2), 64))
    adapters = jax.tree_util.tree_map_with_path(
        lambda path, x: 0.3 * jax.random.normal(next(b_keys), x.shape) if path[-1].key == "b" else x, lora.adapters
    )
    return model, params, lora.replace(adapters=adapters)


def test_lora_rollout_samples_the_merged_weights_and_matches_the_teacher_forced_pass():
    model, params, lora = _lora_setup()
    prompts, mask = R.pad_prompts(((3, 4, 5), (6,), (7, 8, 9, 10), (11, 12)), 0, bucket=4)
    run = functools.partial(rollout_jit, max_new_tokens=N, temperature=0.8, stop_token_ids=[], pad_token_id=0)
    out = run(model, params, prompts, mask, jax.random.key(3), lora=lora)
    merged = run(model, merge_lora(model, params, lora), prompts, mask, jax.random.key(3))
    np.testing.assert_array_equal(out.response_ids, merged.response_ids)
    np.testing.assert_allclose(out.logprobs, merged.logprobs, atol=1e-6, rtol=0)
    batch = (prompts, mask, out.response_ids, out.response_mask)
    teacher = response_logprobs_jit(model, params, *batch, 0.8, lora=lora)  # adapters applied separately
    np.testing.assert_allclose(teacher, out.logprobs, atol=1e-5, rtol=0)
    base = response_logprobs_jit(model, params, *batch, 0.8)
    assert np.max(np.abs(np.asarray(base) - np.asarray(out.logprobs))) > 0.05  # the adapters matter


def test_lora_merges_only_float32_params():
    model, params, lora = _lora_setup()
    assert R._merge_adapters_for_sampling(params, lora)
    assert not R._merge_adapters_for_sampling(params, None)
    assert not R._merge_adapters_for_sampling(params, {"bias": jnp.zeros(3)})  # a fake model's own adapter tree
    _, params16, lora16 = _lora_setup(jnp.bfloat16)
    assert not R._merge_adapters_for_sampling(params16, lora16)
