"""SFT and reward-model steps (ppojax.train) on a tiny real decoder, against numpy and hand-computed cases."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppojax import train as T
from ppojax.generation import pad_prompts
from ppojax.models import DecoderModel, ModelConfig
from ppojax.optim import OptimizerConfig, make_optimizer

VOCAB, PAD, TARGET, N = 64, 63, 7, 6
CONFIG = ModelConfig(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    max_position_embeddings=64,
)
POLICY = DecoderModel(CONFIG)
REWARD = DecoderModel(CONFIG, head="reward")


def _sequences(rows, seed, token_fn):
    rng = np.random.default_rng(seed)
    prompt_ids, prompt_mask = pad_prompts(
        [list(rng.integers(0, 60, size=rng.integers(1, 5))) for _ in range(rows)], PAD, bucket=4
    )
    lengths = rng.integers(1, N + 1, size=rows)
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask > 0, token_fn(rng, (rows, N)), PAD).astype(np.int32)
    return T.SequenceBatch(jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(ids), jnp.asarray(mask))


def _random_tokens(rng, shape):
    return rng.integers(8, 60, size=shape)  # never TARGET


def _numpy_sft_loss(params, batch):
    ids = np.concatenate([batch.prompt_ids, batch.response_ids], 1)
    mask = np.concatenate([batch.prompt_mask, batch.response_mask], 1)
    logits = np.asarray(POLICY.apply(params, ids, mask).logits, np.float64)
    P = batch.prompt_ids.shape[1]
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(N):
            if batch.response_mask[b, t]:
                row = logits[b, P - 1 + t]
                logz = row.max() + np.log(np.exp(row - row.max()).sum())
                total += logz - row[int(batch.response_ids[b, t])]
                count += 1
    return total / count


def test_sft_loss_is_response_only_cross_entropy():
    params = POLICY.init_params(jax.random.key(0))
    batch = _sequences(4, 0, _random_tokens)
    got = T.sft_loss(POLICY, params, batch).value()  # un-jitted here; the jitted step is checked below
    np.testing.assert_allclose(float(got), _numpy_sft_loss(params, batch), rtol=2e-6)


def test_sft_step_lowers_the_loss():
    params = POLICY.init_params(jax.random.key(1))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    batch = _sequences(8, 1, _random_tokens)
    step = jax.jit(functools.partial(T.sft_step, model=POLICY, optimizer=optimizer))
    state = T.init_train_state(params, optimizer)
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), _numpy_sft_loss(params, batch), rtol=2e-6)  # jitted loss
    losses = [float(metrics["loss"])]
    for _ in range(14):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0], losses
    assert int(state.step) == 15 and float(metrics["skipped"]) == 0.0


def test_reward_model_loss_hand_computed():
    chosen = jnp.asarray([1.0, 0.0, 2.0])
    rejected = jnp.asarray([0.0, 0.0, 3.0])
    margin = jnp.asarray([0.0, 1.0, 0.5])
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    want = -np.mean(np.log(sig(np.array([1.0, -1.0, -1.5]))))
    for fn in (T.reward_model_loss, jax.jit(T.reward_model_loss)):
        np.testing.assert_allclose(float(fn(chosen, rejected, margin)), want, rtol=1e-6)
    np.testing.assert_allclose(
        float(T.reward_model_loss(chosen, rejected)), -np.mean(np.log(sig(np.array([1.0, 0.0, -1.0])))), rtol=1e-6
    )


def _preferences(rows, seed):
    """Chosen responses start with TARGET and hold more of it; rejected ones hold none. Same prompts and lengths."""

    def with_target(rng, shape):
        tokens = np.where(rng.random(shape) < 0.5, TARGET, rng.integers(8, 60, size=shape))
        tokens[:, 0] = TARGET
        return tokens

    chosen = _sequences(rows, seed, with_target)
    rejected = _sequences(rows, seed, _random_tokens)
    return T.PreferenceBatch(
        chosen.prompt_ids,
        chosen.prompt_mask,
        chosen.response_ids,
        chosen.response_mask,
        rejected.response_ids,
        rejected.response_mask,
    )


def test_reward_model_accuracy_rises_on_synthetic_preferences():
    params = REWARD.init_params(jax.random.key(2))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    step = jax.jit(functools.partial(T.reward_model_step, model=REWARD, optimizer=optimizer))
    held_out = _preferences(64, seed=99)
    accuracy = jax.jit(lambda params: jnp.mean(jnp.greater(*T.preference_scores(REWARD, params, held_out))))
    before = float(accuracy(params))
    state = T.init_train_state(params, optimizer)
    train = [_preferences(16, seed) for seed in range(8)]
    for i in range(40):
        state, metrics = step(state, train[i % 8])
    after = float(accuracy(state.params))
    assert before < 0.7 and after > 0.9, (before, after)
    assert float(metrics["accuracy"]) > 0.9 and float(metrics["margin"]) > 0.0


def test_reward_normalisation_gives_mean_zero_std_one():
    params = REWARD.init_params(jax.random.key(3))
    reference = _sequences(32, 5, _random_tokens)
    gain, bias = T.fit_reward_normalisation(REWARD, params, reference)
    config = T.PPOConfig(batch_size=32, minibatch_size=32, reward_gain=gain, reward_bias=bias)
    models = T.PPOModels(policy=POLICY, reward=REWARD)
    scores = np.asarray(T._sequence_scores(config, models, params, *reference), np.float64)
    np.testing.assert_allclose(scores.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(scores.std(), 1.0, rtol=1e-5)


@pytest.mark.parametrize("jit", [False, True])
def test_guarded_step_applies_or_skips(jit):
    """The public building block on a custom loss: an SGD step on a quadratic, and a NaN loss that skips."""
    adam = make_optimizer(OptimizerConfig(learning_rate=0.1))
    sgd = optax.sgd(0.25)
    params = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray(3.0)}
    target = np.asarray([0.5, 0.5])

    def loss_fn(p):
        loss = jnp.sum((p["w"] - target) ** 2) + p["b"] ** 2
        return loss, {"b": p["b"]}

    step = jax.jit(T.guarded_step, static_argnums=(1, 2)) if jit else T.guarded_step
    state, metrics = step(T.init_train_state(params, sgd), loss_fn, sgd)
    # SGD by hand: w ← w − 0.25 · 2 (w − t), b ← b − 0.25 · 2 b.
    np.testing.assert_allclose(np.asarray(state.params["w"]), [0.75, -0.75], rtol=1e-6)
    np.testing.assert_allclose(float(state.params["b"]), 1.5, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["loss"]), 0.25 + 6.25 + 9.0, rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), np.sqrt(1 + 25 + 36), rtol=1e-6)
    assert float(metrics["b"]) == 3.0 and float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    bad = lambda p: (loss_fn(p)[0] * jnp.nan, {"b": p["b"]})
    initial = T.init_train_state(params, adam)
    skipped, metrics = step(initial, bad, adam)
    assert float(metrics["skipped"]) == 1.0 and int(skipped.step) == 0
    before, after = (
        jax.tree.leaves((initial.params, initial.opt_state)),
        jax.tree.leaves((skipped.params, skipped.opt_state)),
    )
    for a, b in zip(before, after):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
