"""Slower PPO training checks (each compiles its own iteration program, ~25 s on the 2-core CPU):
mixed precision, early stop on approx-KL, the joint critic mode, phases against the one-program iteration.
Run with `-m slow`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ppojax import train as T
from ppojax.generation import response_logprobs
from ppojax.models import DecoderModel, init_lora
from ppojax.models.lora import Lora
from ppojax.optim import OptimizerConfig

from test_train import BATCH, CONFIG, POLICY, POLICY_PARAMS, PROMPTS, _config, target_rate

pytestmark = pytest.mark.slow


def _iterate(config, state, models, iterations, params=POLICY_PARAMS):
    iteration = T.make_ppo_iteration(config, models)
    history = []
    for _ in range(iterations):
        state, metrics, experience = iteration(state, PROMPTS, params, None)
        history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
    return state, history, experience


@pytest.mark.parametrize("master", [None, "float32"])
def test_bf16_model_with_and_without_fp32_master_weights(master):
    model = DecoderModel(CONFIG, dtype="bfloat16")
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), POLICY_PARAMS)
    config = _config("shared", master_dtype=master)
    state, models = T.init_ppo_state(config, model, params, jax.random.key(2), reward_fn=target_rate)
    want = jnp.float32 if master else jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(state.policy)} == {jnp.dtype(want)}
    initial = jax.tree.map(np.asarray, state.policy)
    state, history, experience = _iterate(config, state, models, 3, params)
    assert {x.dtype for x in jax.tree.leaves(state.policy)} == {jnp.dtype(want)}
    # Log-probs, values and losses are float32 whatever the compute dtype.
    assert experience.logprobs.dtype == experience.values.dtype == jnp.float32
    assert all(np.isfinite(list(h.values())).all() and h["train/skipped_updates"] == 0 for h in history)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(state.policy)))
    # bf16 rounding of the differently fused gradient-program forward: the first ratio is near 1, not exactly.
    assert all(abs(h["policy/first_ratio_max"] - 1.0) < 0.1 for h in history)


def test_early_stop_on_approx_kl_skips_the_remaining_updates():
    # The first minibatch has approx-KL ~0 (< threshold); after one update the second one exceeds it.
    config = _config("separate", early_stop_kl=1e-9)
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy"
    )
    state, history, _ = _iterate(config, state, models, 2)
    for h in history:
        assert h["train/early_stopped"] == 1.0 and h["train/updates"] == 2.0 and h["train/skipped_updates"] == 0.0
    assert int(state.step) == 4  # 2 updates per iteration instead of 4


def test_joint_mode_trains_both_models_with_one_optimizer():
    config = _config("joint")
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy"
    )
    assert isinstance(state.critic_opt_state, optax.EmptyState)
    initial = state
    state, history, _ = _iterate(config, state, models, 3)
    assert all(np.isfinite(list(h.values())).all() for h in history)
    for before, after in ((initial.policy, state.policy), (initial.critic, state.critic)):
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_phases_match_the_one_program_iteration():
    config = _config("separate")
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy"
    )
    one = T.make_ppo_iteration(config, models, timing=False)
    collect, train = T.make_ppo_phases(config, models)
    s1, m1, e1 = one(state, PROMPTS, POLICY_PARAMS, None)
    s2, e2 = collect(state, PROMPTS, POLICY_PARAMS, None)
    s2, m2 = train(s2, e2, POLICY_PARAMS)
    np.testing.assert_array_equal(np.asarray(e1.response_ids), np.asarray(e2.response_ids))
    np.testing.assert_array_equal(np.asarray(e1.scores), np.asarray(e2.scores))
    # Two different programs: equal up to float32 rounding.
    for a, b in zip(jax.tree.leaves(s1.policy), jax.tree.leaves(s2.policy)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(jax.random.key_data(s1.key)), np.asarray(jax.random.key_data(s2.key)))
    assert BATCH == e1.response_ids.shape[0]


# LoRA learning: the adapters sit on attention and MLP projections, while the final norm and the LM head stay
# frozen. The test model's random LM head (std 0.02, so |w_TARGET| ≈ 0.11) against the RMS-normalised last
# hidden state (norm √32 ≈ 5.7) caps TARGET's logit near 0.64, so no adapter can push p(TARGET) much past
# e^0.64 / (e^0.64 + 63) ≈ 0.03 (measured: scores stay at ~0.027 whatever the learning rate). The base here
# has its LM head scaled up (×5), nearer a trained model's logit scale.
LORA_GAIN, LORA_LR, LORA_ITERATIONS = 5.0, 1e-2, 40


def test_lora_learning_trains_adapters_only():
    """The learning test under LoRA: reward rises with only the adapters trained; the base (= the reference)
    stays bit-identical and so do its log-probs."""
    base = {**POLICY_PARAMS, "lm_head": {"kernel": POLICY_PARAMS["lm_head"]["kernel"] * LORA_GAIN}}
    config = _config("separate", policy_optimizer=OptimizerConfig(learning_rate=LORA_LR))
    adapters = init_lora(POLICY, jax.random.key(5), rank=8, targets="all")
    state, models = T.init_ppo_state(
        config, POLICY, base, jax.random.key(2), reward_fn=target_rate, critic_init="policy", lora=adapters
    )
    base_before = jax.tree.map(np.array, base)
    ref_logprobs = jax.jit(lambda params, batch: response_logprobs(POLICY, params, *batch, 1.0))
    fixed = None
    iteration = T.make_ppo_iteration(config, models, timing=False)
    history = []
    for _ in range(LORA_ITERATIONS):
        state, metrics, experience = iteration(state, PROMPTS, base, None)
        history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
        if fixed is None:
            fixed = (experience.prompt_ids, experience.prompt_mask, experience.response_ids, experience.response_mask)
            ref_before = np.asarray(ref_logprobs(base, fixed))
    scores = np.array([h["objective/scores"] for h in history])
    kls = np.array([h["objective/kl"] for h in history])
    assert scores[:3].mean() < 0.05 and scores[-10:].mean() > 0.08, scores  # measured: 0.036 -> 0.10
    assert np.all(np.abs(kls) < 5.0), kls  # measured: at most 3.4
    assert isinstance(state.policy, Lora) and all(h["train/skipped_updates"] == 0 for h in history)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(base)))
    np.testing.assert_array_equal(np.asarray(ref_logprobs(base, fixed)), ref_before)
