"""Rollout and scoring on the real ppojax.models decoders, against transformers (torch CPU) as reference.

Tiny random checkpoints of each family are built with transformers (tests/models/hf_builders.py) and loaded
with `ppojax.models.load_pretrained`.
"""

import functools
import os
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "models"))
import hf_builders  # noqa: E402
from rollout_testing import jit_for_tests  # noqa: E402

from ppojax import generation as R
from ppojax.models import DecoderModel, load_pretrained  # noqa: E402

PAD = hf_builders.PAD_ID
PROMPT_LENGTHS = (5, 2, 7, 3)
N = 8

rollout_jit = jit_for_tests(R.rollout, static_argnames=R.ROLLOUT_STATIC_ARGNAMES)
response_logprobs_jit = jit_for_tests(R.response_logprobs, static_argnums=0)


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    built = {}

    def get(name, head="lm"):
        if (name, head) not in built:
            directory = str(tmp_path_factory.mktemp(f"{name}_{head}"))
            torch_model = hf_builders.build(name, directory, head=head, seed=3)
            built[name, head] = (torch_model, *load_pretrained(directory, head=head))
        return built[name, head]

    return get


def _prompts(vocab_size):
    ids, mask = hf_builders.padded_batch(PROMPT_LENGTHS, 8, vocab_size, side="left", seed=2)
    return ids.astype(np.int32), mask.astype(np.int32)


def _hf_greedy(torch_model, ids, mask, stop, **generation):
    """transformers greedy decoding; returns (new tokens [B, <=N], raw logits [B, <=N, V])."""
    config = transformers.GenerationConfig(
        do_sample=False,
        max_new_tokens=N,
        eos_token_id=stop,
        pad_token_id=PAD,
        bos_token_id=None,
        **generation,
    )
    with torch.no_grad():
        out = torch_model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            generation_config=config,
            return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences[:, ids.shape[1] :].numpy(), torch.stack(out.logits, 1).float().numpy()


@pytest.mark.parametrize(
    "name, phase_steps",
    [("llama3", None), ("qwen2", None), ("qwen3", None), ("gpt2", None), ("qwen2", 2), ("gpt2", 2)],
    ids=["llama3", "qwen2", "qwen3", "gpt2", "qwen2-phases", "gpt2-phases"],
)
def test_greedy_rollout_equals_transformers_generate_and_logprobs_equal_teacher_forced(
    build, name, phase_steps, monkeypatch
):
    """`phase_steps` 2: the decode loop in four phases whose caches grow (rope and learned positions)."""
    run = rollout_jit
    if phase_steps:
        monkeypatch.setattr(R, "DECODE_PHASE_STEPS", phase_steps)
        assert R.decode_phase_ends(N) == (2, 4, 6, 8)
        # A new function object: the phases are read while tracing, so trace the rollout again.
        run = jit_for_tests(functools.partial(R.rollout), static_argnames=R.ROLLOUT_STATIC_ARGNAMES)
    torch_model, model, params = build(name)
    ids, mask = _prompts(model.config.vocab_size)
    full, _ = _hf_greedy(torch_model, ids, mask, stop=None)
    assert full.shape == (len(ids), N)
    # A stop token that some rows emit (the earliest in row 0 that not every row emits).
    stop = next(int(t) for t in full[0] if not all(t in row for row in full))
    expected, hf_logits = _hf_greedy(torch_model, ids, mask, stop=stop)
    stopped_rows = np.array([stop in row for row in full])
    assert stopped_rows.any() and not stopped_rows.all()

    out = run(
        model,
        params,
        ids,
        mask,
        jax.random.key(0),
        max_new_tokens=N,
        temperature=0.0,
        top_p=1.0,
        stop_token_ids=[stop],
        pad_token_id=PAD,
    )
    width = expected.shape[1]
    np.testing.assert_array_equal(out.response_ids[:, :width], expected)
    np.testing.assert_array_equal(out.response_ids[:, width:], PAD)
    np.testing.assert_array_equal(out.stopped, stopped_rows)
    lengths = [list(row).index(stop) + 1 if stop in row else N for row in full]
    np.testing.assert_array_equal(out.lengths, lengths)

    # Behaviour log-probs: transformers' raw logits, and ppojax's own teacher-forced pass.
    valid = np.asarray(out.response_mask[:, :width]) == 1
    hf_logprobs = np.take_along_axis(np.asarray(jax.nn.log_softmax(hf_logits)), expected[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs[:, :width])[valid], hf_logprobs[valid], atol=1e-4)
    teacher = response_logprobs_jit(model, params, ids, mask, out.response_ids, out.response_mask, 0.0)
    np.testing.assert_allclose(teacher, out.logprobs, atol=1e-5, rtol=0)

    # Sampled (same compiled programs: temperature and top_p are traced): behaviour = teacher-forced.
    sampled = run(
        model,
        params,
        ids,
        mask,
        jax.random.key(1),
        max_new_tokens=N,
        temperature=0.7,
        top_p=0.9,
        stop_token_ids=[stop],
        pad_token_id=PAD,
    )
    teacher = response_logprobs_jit(model, params, ids, mask, sampled.response_ids, sampled.response_mask, 0.7)
    np.testing.assert_allclose(teacher, sampled.logprobs, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(sampled.logprobs)[np.asarray(sampled.response_mask) == 0], 0.0)


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_greedy_rollout_with_a_repetition_penalty_equals_transformers_generate(build, name):
    """transformers counts every id of `input_ids` as seen, left-padding included, so each row is generated
    alone without padding there; ppojax's left-padded batch counts only real tokens and must equal those rows."""
    torch_model, model, params = build(name)
    penalty = 1.5

    def hf_rows(prompts, stop, **generation):
        rows = []
        for prompt in prompts:
            new, _ = _hf_greedy(torch_model, prompt[None], np.ones_like(prompt[None]), stop, **generation)
            rows.append(np.pad(new[0], (0, N - new.shape[1]), constant_values=PAD))
        return np.stack(rows)

    # Prompts that end with the start of their own greedy continuation, so that the tokens greedy decoding
    # would pick next are often already in the prompt: the penalty on prompt tokens is exercised.
    ids, mask = _prompts(model.config.vocab_size)
    prompts = [ids[row][mask[row] == 1] for row in range(len(ids))]
    prompts = [np.concatenate([p, c[:3]]) for p, c in zip(prompts, hf_rows(prompts, None))]
    width = max(len(p) for p in prompts)
    ids = np.stack([np.pad(p, (width - len(p), 0), constant_values=PAD) for p in prompts]).astype(np.int32)
    mask = np.stack([np.pad(np.ones_like(p), (width - len(p), 0)) for p in prompts]).astype(np.int32)
    unpenalised = hf_rows(prompts, None)
    assert any(set(row) & set(prompt) for row, prompt in zip(unpenalised, prompts))
    full = hf_rows(prompts, None, repetition_penalty=penalty)
    assert not np.array_equal(full, unpenalised)  # the penalty changes what greedy decoding picks here
    stop = next(int(t) for t in full[0] if not all(t in row for row in full))
    expected = hf_rows(prompts, stop, repetition_penalty=penalty)
    out = rollout_jit(
        model,
        params,
        ids,
        mask,
        jax.random.key(0),
        max_new_tokens=N,
        temperature=0.0,
        stop_token_ids=[stop],
        pad_token_id=PAD,
        repetition_penalty=penalty,
    )
    np.testing.assert_array_equal(out.response_ids, expected)
    np.testing.assert_array_equal(out.stopped, [stop in row for row in full])
    # The log-probs are the model's own distribution (the teacher-forced pass knows nothing of the penalty).
    teacher = response_logprobs_jit(model, params, ids, mask, out.response_ids, out.response_mask, 0.0)
    np.testing.assert_allclose(teacher, out.logprobs, atol=1e-5, rtol=0)
    # Un-jitted, sampled: the same tokens as the compiled program.
    options = dict(max_new_tokens=N, temperature=0.9, top_p=0.95, stop_token_ids=[stop], pad_token_id=PAD)
    jitted = R.rollout_jit(model, params, ids, mask, jax.random.key(3), repetition_penalty=penalty, **options)
    eager = R.rollout(model, params, ids, mask, jax.random.key(3), repetition_penalty=penalty, **options)
    np.testing.assert_array_equal(eager.response_ids, jitted.response_ids)
    np.testing.assert_allclose(eager.logprobs, jitted.logprobs, atol=1e-5)
    # A penalty of 1 is no penalty (and no seen-token state).
    plain = R.rollout_jit(model, params, ids, mask, jax.random.key(3), **options)
    same = R.rollout_jit(model, params, ids, mask, jax.random.key(3), repetition_penalty=1.0, **options)
    np.testing.assert_array_equal(plain.response_ids, same.response_ids)
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number > 0"):
        R.rollout_jit(model, params, ids, mask, jax.random.key(3), repetition_penalty=0.0, **options)


def test_reward_and_values_on_real_heads(build):
    _, policy, policy_params = build("qwen2")
    torch_reward, reward_model, reward_params = build("qwen2", head="reward")
    # A critic that is the reward network read at every token: the same trunk, `score` as its value head.
    critic = DecoderModel(reward_model.config, "value")
    critic_params = {k: v for k, v in reward_params.items() if k != "score"} | {"value_head": reward_params["score"]}
    ids, mask = _prompts(policy.config.vocab_size)
    out = rollout_jit(
        policy,
        policy_params,
        ids,
        mask,
        jax.random.key(4),
        max_new_tokens=N,
        stop_token_ids=[5, 6, 7, 8, 9],
        pad_token_id=PAD,
    )
    # transformers reads the score at the rightmost non-pad token, ppojax at the last real one (from the
    # masks): they agree when no row's last response token is a sampled pad id; the key is chosen for that.
    last = np.asarray(out.response_ids)[np.arange(len(ids)), np.asarray(out.lengths) - 1]
    assert np.all(last != PAD), "test setup: a row ends in a sampled pad id; pick another key"
    batch = (ids, mask, out.response_ids, out.response_mask)
    reward = jit_for_tests(R.sequence_reward, static_argnums=0)(reward_model, reward_params, *batch)
    values = jit_for_tests(R.response_values, static_argnums=0)(critic, critic_params, *batch)

    full_ids = np.concatenate([ids, np.asarray(out.response_ids)], 1).astype(np.int64)
    full_mask = np.concatenate([mask, np.asarray(out.response_mask)], 1).astype(np.int64)
    torch_scores = hf_builders.torch_forward(torch_reward, full_ids, full_mask)[:, 0]
    np.testing.assert_allclose(reward, torch_scores, atol=1e-4)
    # values[t] = the per-token score at column P - 1 + t, the state before response token t.
    with torch.no_grad():
        per_token = torch_reward.model(
            input_ids=torch.from_numpy(full_ids),
            attention_mask=torch.from_numpy(full_mask),
            position_ids=torch.from_numpy(hf_builders.mask_positions(full_mask)),
        ).last_hidden_state
        per_token = torch_reward.score(per_token)[..., 0].numpy()
    response_mask = np.asarray(out.response_mask) == 1
    want = per_token[:, ids.shape[1] - 1 : -1]
    np.testing.assert_allclose(np.asarray(values)[response_mask], want[response_mask], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(values)[~response_mask], 0.0)
    with pytest.raises(ValueError, match="head='reward'"):
        jax.eval_shape(lambda p: R.sequence_reward(critic, p, *batch), critic_params)  # traced only
