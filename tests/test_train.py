"""PPO training (ppojax.train) on a tiny real decoder (ppojax.models, 2 layers, hidden 32, vocab 64).

Compilation dominates the runtime on the 2-core CPU (a whole jitted iteration compiles in ~25 s and then
runs in ~30 ms), so each distinct program is built once per module and shared by the tests that need it.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppojax import train as T
from ppojax.generation import pad_prompts, response_logprobs, response_values, rollout_jit
from ppojax.models import DecoderModel, ModelConfig, init_lora
from ppojax.models.lora import Lora
from ppojax.optim import OptimizerConfig
from ppojax.presets import assemble_advantages, get_preset, masks_for, ppo_losses

VOCAB, PAD, TARGET, N = 64, 63, 7, 8
CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)
POLICY = DecoderModel(CONFIG)
POLICY_PARAMS = POLICY.init_params(jax.random.key(0))
REWARD = DecoderModel(CONFIG, head="reward")
REWARD_PARAMS = REWARD.init_params(jax.random.key(1))
BATCH = 32


def target_rate(prompt_ids, response_ids, response_mask):
    """Programmatic reward: the fraction of the N response slots holding TARGET. A uniform policy scores
    1/64; the KL-regularised optimum at β = 0.05 puts p(TARGET) ≈ e^{2.5}/(63 + e^{2.5}) ≈ 0.16 per token."""
    del prompt_ids
    return jnp.sum((response_ids == TARGET) & (response_mask > 0), axis=1).astype(jnp.float32) / N


def _prompts(seed=0, rows=BATCH):
    rng = np.random.default_rng(seed)
    return pad_prompts([list(rng.integers(0, 60, size=rng.integers(2, 5))) for _ in range(rows)], PAD, bucket=4)


PROMPTS = _prompts()


def _config(mode="separate", **changes):
    base = dict(
        convention=get_preset("ppojax"),
        batch_size=BATCH,
        minibatch_size=16,
        micro_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=N,
        pad_token_id=PAD,
        critic_mode=mode,
        policy_optimizer=OptimizerConfig(learning_rate=3e-3),
        critic_optimizer=OptimizerConfig(learning_rate=3e-3),
    )
    base.update(changes)
    return T.PPOConfig(**base)


def _traced_once(fn, name):
    """jit with a trace counter: a second trace (a recompilation) fails the test. chex keys its counter by
    the source and the name, so each program gets its own name."""
    fn.__name__ = name
    return jax.jit(chex.assert_max_traces(fn, n=1))


@functools.lru_cache(maxsize=None)
def _iteration(mode):
    """(state, models, iteration) for one mode; built once per module. Separate mode: the timed two-phase
    `make_ppo_iteration` with exact old log-probs; shared mode: `ppo_iteration` as one jitted program."""
    config = _config(mode, exact_old_logprobs=mode == "separate")
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy"
    )
    if mode == "separate":
        return state, models, T.make_ppo_iteration(config, models)

    def iteration(state, prompts, ref_params, reward_params):
        return T.ppo_iteration(state, prompts, ref_params, reward_params, config=config, models=models)

    return state, models, _traced_once(iteration, f"iteration_{mode}")


def _run(mode, iterations, *, key=None):
    state, _, iteration = _iteration(mode)
    if key is not None:
        state = state.replace(key=key)
    history = []
    for _ in range(iterations):
        state, metrics, experience = iteration(state, PROMPTS, POLICY_PARAMS, None)
        history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
    if mode == "separate":  # the phases compiled once: collect by jit, train ahead of time in the background
        assert [phase._cache_size() for phase in iteration.phases] == [1, 0]
        assert iteration.train_ahead.ahead_of_time
    return state, history, experience


# ----------------------------------------------------------------------------------------------------------
# The learning tests (separate critic, shared trunk), plus the first-minibatch ratio and bookkeeping.


@pytest.mark.parametrize("mode", ["separate", "shared"])
def test_reward_rises_with_bounded_kl(mode):
    state, history, experience = _run(mode, 30)
    scores = np.array([h["objective/scores"] for h in history])
    kls = np.array([h["objective/kl"] for h in history])
    assert scores[:3].mean() < 0.04, scores  # ~1/64 at the start
    assert scores[-5:].mean() > 0.09, scores  # most of the way to the regularised optimum (~0.16)
    assert np.all(np.abs(kls) < 5.0), kls  # the optimum's KL is ~1.9 nats per sequence
    # On the first minibatch of every iteration the policy is the behaviour policy and nothing is clipped.
    # With `exact_old_logprobs` (separate mode here) the old log-probs come from the training program itself
    # and every ratio is exactly 1: approx-KL = mean ½ (log ρ)² is 0.0 only if every log ρ is 0.0. Without it
    # (shared mode here) the ratio is 1 up to the rounding of a gradient program's differently fused forward
    # (a few float32 ulps; a temperature or dropout bug gives 1e-2 and more).
    assert all(h["policy/first_clipfrac"] == 0.0 for h in history)
    if mode == "separate":
        assert all(h["policy/first_ratio_max"] == 1.0 and h["policy/first_approxkl"] == 0.0 for h in history)
        # The collection pass and the training pass differ by rounding only.
        assert all(0.0 <= h["policy/old_pass_gap_max"] < 2e-6 for h in history)
        assert all(h["grad/old_pass_norm"] > 0.0 for h in history)
    else:
        assert all(
            abs(h["policy/first_ratio_max"] - 1.0) < 2e-6 and h["policy/first_approxkl"] < 1e-12 for h in history
        )
        assert "policy/old_pass_gap_max" not in history[0]
    assert all(h["train/updates"] == 4 and h["train/skipped_updates"] == 0 for h in history)
    assert all(np.isfinite(list(h.values())).all() for h in history)
    assert int(state.step) == 4 * 30 and int(state.iteration) == 30
    # The teacher-forced pass reproduces the sampler's log-probs (same function, same temperature).
    assert max(h["policy/logprob_gap_max"] for h in history) < 1e-5
    if mode == "separate":  # the timed phases: throughput from the tokens actually processed
        response_tokens = float(np.sum(np.asarray(experience.response_mask)))
        tokens = response_tokens + float(np.sum(np.asarray(experience.prompt_mask)))
        last = history[-1]
        assert last["perf/rollout_s"] > 0 and last["perf/update_s"] > 0
        np.testing.assert_allclose(last["perf/rollout_tokens_per_s"] * last["perf/rollout_s"], response_tokens, 1e-5)
        np.testing.assert_allclose(last["perf/update_tokens_per_s"] * last["perf/update_s"], tokens * 4 / 2, 1e-5)
    else:
        assert not any(name.startswith("perf/") for name in history[0])


def test_same_seed_is_bit_identical_and_seeds_differ():
    runs = [_run("separate", 3, key=jax.random.key(seed))[0] for seed in (11, 11, 12)]
    leaves = [jax.tree.leaves((s.policy, s.critic, s.policy_opt_state, s.critic_opt_state)) for s in runs]
    assert all(np.array_equal(a, b) for a, b in zip(leaves[0], leaves[1]))
    assert not all(np.array_equal(a, c) for a, c in zip(leaves[0], leaves[2]))


def _decode(ids):
    return " ".join(str(i) for i in ids)


def _text_target_rate(prompt_texts, response_texts):
    """The host-side twin of `target_rate`, on decoded text."""
    assert len(prompt_texts) == len(response_texts) == BATCH
    return [text.split().count(str(TARGET)) / N for text in response_texts]


@pytest.mark.slow
def test_lora_with_phases_and_a_text_reward():
    """LoRA: only adapters are trained, the base (= reference) stays bit-identical. Run as two jitted phases
    with a host-side text reward summed with the programmatic one."""
    config = _config("separate")
    adapters = init_lora(POLICY, jax.random.key(5), rank=4, targets="all")
    initial, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy", lora=adapters
    )
    iteration = T.make_ppo_iteration(config, models, text_reward_fn=_text_target_rate, decode=_decode)
    base_before = jax.tree.map(np.array, POLICY_PARAMS)
    ref_logprobs = jax.jit(lambda params, batch: response_logprobs(POLICY, params, *batch, 1.0))
    state, history = initial, []
    for i in range(3):
        state, metrics, experience = iteration(state, PROMPTS, POLICY_PARAMS, None)
        history.append({name: float(value) for name, value in jax.device_get(metrics).items()})
        batch = (experience.prompt_ids, experience.prompt_mask, experience.response_ids, experience.response_mask)
        if i == 0:
            fixed_batch, ref_before = batch, np.asarray(ref_logprobs(POLICY_PARAMS, batch))
    # Both reward sources count: the programmatic one in jit, the text one between the phases.
    np.testing.assert_allclose(
        np.asarray(experience.scores), 2 * np.asarray(target_rate(batch[0], batch[2], batch[3])), rtol=1e-6
    )
    assert isinstance(state.policy, Lora)
    # Only the adapters (and the separate critic) are in the state: nothing of the base's size.
    n_adapter = sum(x.size for x in jax.tree.leaves(state.policy.adapters))
    n_base = sum(x.size for x in jax.tree.leaves(POLICY_PARAMS))
    assert sum(x.size for x in jax.tree.leaves(state.policy_opt_state)) <= 2 * n_adapter + 2 < n_base
    # The base params are untouched, bit for bit, and so are the reference log-probs of a fixed batch.
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(POLICY_PARAMS)))
    np.testing.assert_array_equal(np.asarray(ref_logprobs(POLICY_PARAMS, fixed_batch)), ref_before)
    # The iteration's reference is the base with the adapters off (another program: rounding only).
    np.testing.assert_allclose(
        np.asarray(experience.ref_logprobs), np.asarray(ref_logprobs(POLICY_PARAMS, batch)), rtol=0, atol=2e-6
    )
    # ...while the adapters moved and the adapted policy differs from the reference.
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(initial.policy), jax.tree.leaves(state.policy))]
    assert any(moved)
    adapted = response_logprobs(POLICY, POLICY_PARAMS, *batch, 1.0, lora=state.policy)
    assert np.abs(np.asarray(adapted) - np.asarray(experience.ref_logprobs)).max() > 1e-3
    assert all(abs(h["policy/first_ratio_max"] - 1.0) < 2e-6 and h["policy/first_approxkl"] < 1e-12 for h in history)
    assert all(h["train/skipped_updates"] == 0 for h in history)


# ----------------------------------------------------------------------------------------------------------
# update_step: gradient accumulation and the non-finite guard, on a synthetic minibatch.


def _synthetic_minibatch(rows=16, seed=0, value_mask_of=lambda mask: mask > 0):
    rng = np.random.default_rng(seed)
    prompt_ids, prompt_mask = _prompts(seed, rows)
    lengths = rng.integers(1, N + 1, size=rows)
    response_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    response_ids = np.where(response_mask > 0, rng.integers(0, 60, size=(rows, N)), PAD).astype(np.int32)
    true = np.asarray(
        response_logprobs(POLICY, POLICY_PARAMS, prompt_ids, prompt_mask, response_ids, response_mask, 1.0)
    )
    noisy = lambda scale: np.where(response_mask > 0, rng.normal(size=(rows, N)) * scale, 0.0).astype(np.float32)
    return T.Minibatch(
        prompt_ids=jnp.asarray(prompt_ids),
        prompt_mask=jnp.asarray(prompt_mask),
        response_ids=jnp.asarray(response_ids),
        response_mask=jnp.asarray(response_mask),
        old_logprobs=jnp.asarray(true + noisy(0.3)),  # ratios away from 1: both clip branches active
        old_values=jnp.asarray(noisy(0.5)),
        advantages=jnp.asarray(noisy(1.0)),
        returns=jnp.asarray(noisy(1.0)),
        policy_mask=jnp.asarray(response_mask > 0),
        value_mask=jnp.asarray(value_mask_of(response_mask)),
    )


def _reference_gradients(config, models, state, mb):
    """The full-minibatch loss in one pass, straight from `ppo_losses` (no accumulation machinery)."""
    conv = config.convention
    shared = config.critic_mode == "shared"

    def loss(trainable):
        policy, critic = trainable
        ids = jnp.concatenate([mb.prompt_ids, mb.response_ids], 1)
        mask = jnp.concatenate([mb.prompt_mask, mb.response_mask], 1)
        columns = slice(mb.prompt_ids.shape[1] - 1, ids.shape[1] - 1)  # the column before each response token
        out = POLICY.apply(policy, ids, mask)
        logits = out.logits[:, columns].astype(jnp.float32)
        logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), mb.response_ids[..., None], -1)[..., 0]
        # Values at every response column, unmasked: `ppo_losses` applies the value mask.
        if shared:
            values = (out.hidden[:, columns].astype(jnp.float32) @ critic["kernel"])[..., 0]
        else:
            plain_critic = DecoderModel(models.critic.config, head="value")  # never rematerialised
            values = plain_critic.apply(critic, ids, mask).values[:, columns].astype(jnp.float32)
        pg, vf, _ = ppo_losses(
            conv,
            logprobs=logprobs,
            old_logprobs=mb.old_logprobs,
            advantages=mb.advantages,
            values=values,
            old_values=mb.old_values,
            returns=mb.returns,
            policy_mask=mb.policy_mask,
            value_mask=mb.value_mask,
        )
        return pg + (1.0 if config.critic_mode == "separate" else conv.vf_coef) * vf

    return jax.value_and_grad(loss)((state.policy, state.critic))  # un-jitted: a different code path


@pytest.mark.parametrize(
    "mode,aggregation,micro,remat,preset",
    [
        ("separate", "token-mean", 4, False, "ppojax"),
        ("shared", "seq-mean-token-sum", 8, True, "ppojax"),
        ("joint", "token-mean", 8, False, "trl"),
    ],
)
def test_accumulated_gradient_equals_full_minibatch_gradient(mode, aggregation, micro, remat, preset):
    """Also the gradient-checkpointing switch: with `remat` the same gradient as the plain reference. With
    TRL's convention the value mask reaches one slot past each response, and the value trained there is the
    critic's (the head at the last response token's column), as in the reference's unmasked pass."""
    config = _config(
        mode,
        convention=get_preset(preset).replace(loss_aggregation=aggregation),
        micro_batch_size=micro,
        remat=remat,
    )
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(3), reward_model=REWARD, reward_params=REWARD_PARAMS
    )
    assert models.policy.remat == remat and models.reward.remat is False
    assert mode == "shared" or models.critic.remat == remat
    mb = _synthetic_minibatch(value_mask_of=lambda mask: masks_for(config.convention, mask)[1])
    assert preset != "trl" or int(jnp.sum(mb.value_mask)) > int(jnp.sum(mb.response_mask))
    grad_fn = functools.partial(T.minibatch_gradients, config=config, models=models)
    assert ("remat" in str(jax.make_jaxpr(grad_fn)(state, mb, POLICY_PARAMS))) == remat
    # Perturb the zero value head so the shared-trunk value gradient is not trivially zero.
    if mode == "shared":
        state = state.replace(
            critic={"kernel": jax.random.normal(jax.random.key(4), state.critic["kernel"].shape) * 0.3}
        )
    assert 16 // micro > 1
    loss, grads = jax.jit(grad_fn)(state, mb, POLICY_PARAMS)
    want_loss, want = _reference_gradients(config, models, state, mb)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for got_leaf, want_leaf in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
        scale = np.abs(np.asarray(want_leaf)).max() + 1e-12
        np.testing.assert_allclose(np.asarray(got_leaf), np.asarray(want_leaf), rtol=2e-4, atol=2e-5 * scale)
    assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(grads[1])) > 0  # the critic gets gradient


@pytest.mark.parametrize("micro", [4, 8])
def test_llamafactory_preset_averages_micro_batch_losses_and_skips_high_ratio_micro_batches(micro):
    """TRL 0.x (LLaMA-Factory): each micro-batch's token-mean loss is back-propagated and the accumulation
    averages them; a micro-batch whose mean ratio exceeds 10 contributes nothing (it still counts)."""
    config = _config("shared", convention=get_preset("llamafactory"), micro_batch_size=micro)
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(3), reward_model=REWARD, reward_params=REWARD_PARAMS
    )
    mb = _synthetic_minibatch()
    # The first micro-batch's old log-probs 5 nats lower: ratio ≈ e^5 there, so that micro-batch is skipped.
    first = np.arange(16)[:, None] < micro
    mb = mb.replace(old_logprobs=jnp.where(first & np.asarray(mb.policy_mask), mb.old_logprobs - 5.0, mb.old_logprobs))
    loss, grads = jax.jit(functools.partial(T.minibatch_gradients, config=config, models=models))(state, mb, None)
    parts = [
        _reference_gradients(config, models, state, jax.tree.map(lambda x, s=start: x[s : s + micro], mb))
        for start in range(0, 16, micro)
    ]
    assert float(parts[0][0]) == 0.0 and all(float(p[0]) != 0.0 for p in parts[1:])
    want_loss = np.mean([float(p[0]) for p in parts])
    want_grads = jax.tree.map(lambda *g: sum(g) / len(g), *[p[1] for p in parts])
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(grads, want_grads, rtol=1e-4, atol=1e-6)
    # One call over the whole minibatch is its token mean (what TRL computes without accumulation).
    whole = _reference_gradients(
        config.replace(convention=get_preset("llamafactory").replace(ratio_threshold=None)), models, state, mb
    )
    assert abs(float(whole[0]) - want_loss) > 1e-3


def test_non_finite_loss_skips_every_update_and_keeps_the_state():
    """A NaN in the critic makes values, advantages and the loss NaN: every update of the iteration is skipped
    and params and optimizer states stay bit-identical. Runs the separate-mode program already compiled."""
    state, _, iteration = _iteration("separate")
    kernel = state.critic["value_head"]["kernel"]
    poisoned = state.replace(critic={**state.critic, "value_head": {"kernel": kernel.at[0, 0].set(jnp.nan)}})
    after, metrics, _ = iteration(poisoned, PROMPTS, POLICY_PARAMS, None)
    assert float(metrics["train/skipped_updates"]) == 4.0 and float(metrics["train/updates"]) == 4.0
    assert int(after.step) == 0
    before = jax.tree.leaves((poisoned.policy, poisoned.critic, poisoned.policy_opt_state, poisoned.critic_opt_state))
    after_leaves = jax.tree.leaves((after.policy, after.critic, after.policy_opt_state, after.critic_opt_state))
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after_leaves))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_lora_with_a_reference_model_of_its_own(jit):
    """`LoraReference(base, reference)`: the adapters sit on `base` (sampling, old log-probs, training) and only the
    reference log-probs come from `reference`: everything else equals the run whose reference is the base."""
    config = _config("joint", stop_token_ids=(1, 2))
    adapters = init_lora(POLICY, jax.random.key(5), rank=4, targets="all")
    adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(6), x.shape), adapters)  # b != 0
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy", lora=adapters
    )
    other = POLICY.init_params(jax.random.key(9))  # the reference model
    wrap = jax.jit if jit else (lambda f: f)
    collect = wrap(functools.partial(T.collect, config=config, models=models))
    _, plain = collect(state, PROMPTS, POLICY_PARAMS, None)
    _, separate = collect(state, PROMPTS, T.LoraReference(base=POLICY_PARAMS, reference=other), None)
    for name in ("response_ids", "response_mask", "logprobs", "behaviour_logprobs", "values", "scores"):
        np.testing.assert_array_equal(getattr(separate, name), getattr(plain, name), err_msg=name)
    np.testing.assert_allclose(separate.ref_logprobs, _numpy_response_logprobs(other, separate, 1.0), atol=1e-5)
    assert np.abs(np.asarray(separate.ref_logprobs) - np.asarray(plain.ref_logprobs)).max() > 0.1
    if jit:  # training sees the reference only through the experience: the same experience trains the same
        train = jax.jit(functools.partial(T.train_on_batch, config=config, models=models))
        one, _ = train(state, plain, POLICY_PARAMS)
        two, _ = train(state, plain, T.LoraReference(base=POLICY_PARAMS, reference=other))
        for a, b in zip(jax.tree.leaves(one.policy), jax.tree.leaves(two.policy)):
            np.testing.assert_array_equal(a, b)


def test_lora_update_step_trains_adapters_only():
    """The fast LoRA checks (jitted update_step; the full-iteration versions are slow-marked above): only the
    adapters train, the base and the reference stay bit-identical, and the adapters learn: on a minibatch
    whose advantage is +1 on TARGET tokens and −0.5 on the others, TARGET's log-probs rise and the others'
    fall."""
    config = _config("separate")
    adapters = init_lora(POLICY, jax.random.key(5), rank=4, targets=("q", "v"))
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(2), reward_fn=target_rate, critic_init="policy", lora=adapters
    )
    base_before = jax.tree.map(np.array, POLICY_PARAMS)
    mb = _synthetic_minibatch()
    valid = np.asarray(mb.response_mask) > 0
    response_ids = jnp.where(valid & (np.arange(N) % 3 == 0), TARGET, mb.response_ids)  # every third slot
    batch = (mb.prompt_ids, mb.prompt_mask, response_ids, mb.response_mask)
    logprobs = jax.jit(lambda params, lora: response_logprobs(POLICY, params, *batch, 1.0, lora=lora))
    ref_before = np.asarray(logprobs(POLICY_PARAMS, None))
    is_target = valid & (np.asarray(response_ids) == TARGET)
    others = valid & ~is_target
    mb = mb.replace(
        response_ids=response_ids,
        old_logprobs=jnp.asarray(ref_before),  # the adapters start at zero: the policy is the reference
        advantages=jnp.asarray(np.where(is_target, 1.0, np.where(others, -0.5, 0.0)), jnp.float32),
    )

    def update(state, minibatch, ref_params):
        return T.update_step(state, minibatch, ref_params, config=config, models=models)

    step = _traced_once(update, "update_step_lora")
    after = state
    for _ in range(4):
        after, metrics = step(after, mb, POLICY_PARAMS)
    assert float(metrics["train/skipped"]) == 0.0 and int(after.step) == 4
    assert isinstance(after.policy, Lora)
    n_adapter = sum(x.size for x in jax.tree.leaves(after.policy.adapters))
    assert (
        sum(x.size for x in jax.tree.leaves(after.policy_opt_state))
        <= 2 * n_adapter + 2
        < sum(x.size for x in jax.tree.leaves(POLICY_PARAMS))
    )
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(base_before), jax.tree.leaves(POLICY_PARAMS)))
    np.testing.assert_array_equal(np.asarray(logprobs(POLICY_PARAMS, None)), ref_before)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.policy), jax.tree.leaves(after.policy)))
    adapted = np.asarray(logprobs(POLICY_PARAMS, after.policy))
    gain = adapted - ref_before

    assert gain[is_target].mean() > 0.05 and gain[others].mean() < -0.01, (gain[is_target].mean(), gain[others].mean())


@pytest.mark.parametrize("mode, jit", [("joint", True), ("shared", True), ("joint", False)])
def test_old_logprobs_from_the_rollout(mode, jit):
    configs = {source: _config(mode, old_logprobs=source, stop_token_ids=(1, 2, 3)) for source in ("score", "rollout")}
    state, models = T.init_ppo_state(
        configs["score"], POLICY, POLICY_PARAMS, jax.random.key(3), reward_fn=target_rate, critic_init="policy"
    )
    wrap = jax.jit if jit else (lambda f: f)
    collected = {
        source: wrap(functools.partial(T.collect, config=config, models=models))(state, PROMPTS, POLICY_PARAMS, None)[1]
        for source, config in configs.items()
    }
    got, recomputed = collected["rollout"], collected["score"]
    np.testing.assert_array_equal(got.response_ids, recomputed.response_ids)  # same key, same samples
    mask = np.asarray(got.response_mask) > 0
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(got.logprobs, got.behaviour_logprobs)
    np.testing.assert_array_equal(np.asarray(got.logprobs)[~mask], 0.0)
    teacher = response_logprobs(
        POLICY, POLICY_PARAMS, got.prompt_ids, got.prompt_mask, got.response_ids, got.response_mask, 1.0
    )
    np.testing.assert_allclose(got.logprobs, teacher, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.logprobs, recomputed.logprobs, atol=1e-5, rtol=0)
    for name in ("ref_logprobs", "values", "scores"):
        np.testing.assert_allclose(getattr(got, name), getattr(recomputed, name), atol=1e-6, rtol=0, err_msg=name)
    if mode == "joint" and jit:  # training on it: the first minibatch's ratio is 1 within float32 rounding
        train = jax.jit(functools.partial(T.train_on_batch, config=configs["rollout"], models=models))
        _, metrics = train(state, got, POLICY_PARAMS)
        assert abs(float(metrics["policy/first_ratio_max"]) - 1.0) < 1e-4
        assert float(metrics["policy/logprob_gap_max"]) == 0.0


def _numpy_response_logprobs(params, experience, temperature):
    """log softmax(logits / T) of each response token from a plain forward pass (numpy; the column before it)."""
    ids = np.concatenate([experience.prompt_ids, experience.response_ids], 1)
    mask = np.concatenate([experience.prompt_mask, experience.response_mask], 1)
    logits = np.asarray(POLICY.apply(params, ids, mask).logits, np.float64) / temperature
    width = experience.prompt_ids.shape[1]
    logits = logits[:, width - 1 : -1]
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(experience.response_ids)[..., None], -1)[..., 0]
    return np.where(np.asarray(experience.response_mask) > 0, picked, 0.0)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_llamafactory_scores_log_probs_untempered(jit):
    """TRL 0.9.6 (LLaMA-Factory) samples at the generation temperature but computes the old, new and reference
    log-probs from the untempered logits: the ratio and the KL are at T = 1."""
    temperature = 0.5
    config = _config("shared", convention=get_preset("llamafactory"), temperature=temperature, stop_token_ids=(1, 2))
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(3), reward_fn=target_rate, critic_init="policy"
    )
    ref_params = POLICY.init_params(jax.random.key(9))
    wrap = jax.jit if jit else (lambda f: f)
    _, experience = wrap(functools.partial(T.collect, config=config, models=models))(state, PROMPTS, ref_params, None)
    untempered = _numpy_response_logprobs(POLICY_PARAMS, experience, 1.0)
    tempered = _numpy_response_logprobs(POLICY_PARAMS, experience, temperature)
    np.testing.assert_allclose(experience.logprobs, untempered, atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        experience.ref_logprobs, _numpy_response_logprobs(ref_params, experience, 1.0), atol=1e-5
    )
    np.testing.assert_allclose(experience.behaviour_logprobs, tempered, atol=1e-5, rtol=0)  # sampled at T
    assert np.abs(untempered - tempered).max() > 0.1
    if not jit:
        return
    train = functools.partial(T.train_on_batch, models=models)
    _, metrics = jax.jit(functools.partial(train, config=config))(state, experience, POLICY_PARAMS)
    assert abs(float(metrics["policy/first_ratio_max"]) - 1.0) < 1e-4  # new and old both at T = 1
    assert float(metrics["policy/logprob_gap_max"]) > 0.1  # the sampler's log-probs are at T = 0.5
    # Control: the same experience trained with new log-probs at the sampling temperature is far from ratio 1.
    tempered_config = config.replace(convention=config.convention.replace(logprob_temperature=None))
    _, metrics = jax.jit(functools.partial(train, config=tempered_config))(state, experience, POLICY_PARAMS)
    assert float(metrics["policy/first_ratio_max"]) > 1.2
    with pytest.raises(ValueError, match="old_logprobs 'rollout' are log-probs at the sampling temperature 0.5"):
        config.replace(old_logprobs="rollout")


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_collect_samples_with_the_repetition_penalty_and_keeps_the_models_logprobs(jit):
    """PPOConfig.repetition_penalty reaches the rollout (the same samples as `rollout` with it, other samples than
    without it); the old log-probs stay the model's, so the first ratio is 1 (as with top-k / top-p)."""
    config = _config("joint", temperature=0.8, repetition_penalty=1.6, stop_token_ids=(1, 2))
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(3), reward_fn=target_rate, critic_init="policy"
    )
    wrap = jax.jit if jit else (lambda f: f)
    _, experience = wrap(functools.partial(T.collect, config=config, models=models))(
        state, PROMPTS, POLICY_PARAMS, None
    )
    _, rollout_key = jax.random.split(state.key)  # the key `collect` samples with
    options = dict(max_new_tokens=N, temperature=0.8, stop_token_ids=(1, 2), pad_token_id=PAD)
    direct = rollout_jit(POLICY, POLICY_PARAMS, *PROMPTS, rollout_key, repetition_penalty=1.6, **options)
    np.testing.assert_array_equal(experience.response_ids, direct.response_ids)
    plain = rollout_jit(POLICY, POLICY_PARAMS, *PROMPTS, rollout_key, **options)
    assert not np.array_equal(plain.response_ids, direct.response_ids)
    np.testing.assert_allclose(experience.logprobs, _numpy_response_logprobs(POLICY_PARAMS, experience, 0.8), atol=1e-5)
    if jit:
        train = jax.jit(functools.partial(T.train_on_batch, config=config, models=models))
        _, metrics = train(state, experience, POLICY_PARAMS)
        assert abs(float(metrics["policy/first_ratio_max"]) - 1.0) < 1e-4
    with pytest.raises(ValueError, match="repetition_penalty must be a finite number > 0"):
        config.replace(repetition_penalty=0.0)


@pytest.mark.parametrize("mode", ["joint", "shared"])
def test_collect_keeps_the_values_on_the_conventions_value_mask(mode):
    """TRL's convention: the experience's values reach one slot past each stopped response (its value mask),
    where the critic's value is the head at the stop token's column; the rest of the slots stay 0."""
    config = _config(mode, convention=get_preset("trl"), stop_token_ids=(1, 2, 3))
    state, models = T.init_ppo_state(
        config, POLICY, POLICY_PARAMS, jax.random.key(3), reward_fn=target_rate, critic_init="policy"
    )
    # The value heads start at zero: make them real so the kept slots hold something.
    heads = jax.random.normal(jax.random.key(5), (CONFIG.hidden_size, 1)) * 0.3
    critic = {"kernel": heads} if mode == "shared" else {**state.critic, "value_head": {"kernel": heads}}
    state = state.replace(critic=critic)
    _, experience = jax.jit(functools.partial(T.collect, config=config, models=models))(
        state, PROMPTS, POLICY_PARAMS, None
    )
    batch = (experience.prompt_ids, experience.prompt_mask, experience.response_ids, experience.response_mask)
    value_mask = np.asarray(masks_for(config.convention, experience.response_mask)[1])
    extra = value_mask & (np.asarray(experience.response_mask) == 0)
    assert extra.any() and (np.asarray(experience.response_mask) > 0).any()
    if mode == "shared":  # the head on the policy trunk's last hidden state, at the response columns
        out = POLICY.apply(POLICY_PARAMS, jnp.concatenate(batch[::2], 1), jnp.concatenate(batch[1::2], 1))
        full = (out.hidden[:, batch[0].shape[1] - 1 : -1] @ heads)[..., 0]
    else:
        full = response_values(models.critic, critic, *batch, value_mask=jnp.ones(value_mask.shape, bool))
    np.testing.assert_allclose(experience.values, np.where(value_mask, full, 0.0), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(experience.values)[extra]).min() > 0


def test_compiled_ahead_runs_the_background_program_and_falls_back_on_other_shapes():
    traces = []

    def make_f():  # a new function each time: JAX caches traces per function
        def f(x, y):
            traces.append(x.shape)
            return x * 2.0 + jnp.sum(y)

        return f

    x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones(4)
    plain = T.CompiledAhead(jax.jit(make_f()))  # never started: the jitted function
    np.testing.assert_allclose(plain(x, y), np.asarray(x) * 2 + 4)
    assert not plain.ahead_of_time and traces == [(2, 3)]
    traces.clear()
    ahead = T.CompiledAhead(jax.jit(make_f()))
    ahead.start(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(y.shape, y.dtype))
    ahead.start(x, y)  # a second start is a no-op
    for shift in (0.0, 1.0):
        np.testing.assert_allclose(ahead(x + shift, y), (np.asarray(x) + shift) * 2 + 4)
    assert traces == [(2, 3)] and ahead.ahead_of_time  # traced once (in the background), then the compiled program
    z = jnp.ones((3, 3))
    np.testing.assert_allclose(ahead(z, y), 6.0)  # other shapes: the jitted function compiles its own
    assert traces == [(2, 3), (3, 3)] and not ahead.ahead_of_time
    np.testing.assert_allclose(ahead(x, y), np.asarray(x) * 2 + 4)


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_shuffle_minibatches_and_training_batch(jit):
    wrap = jax.jit if jit else (lambda f: f)
    config = _config(batch_size=16, minibatch_size=4, micro_batch_size=4, ppo_epochs=3)
    key, rows = wrap(functools.partial(T.shuffle_minibatches, config=config))(jax.random.key(7))
    rows = np.asarray(rows)
    assert rows.shape == (3, 4, 4) and not np.array_equal(
        jax.random.key_data(key), jax.random.key_data(jax.random.key(7))
    )
    for epoch in rows:  # every epoch a permutation of the batch, cut into minibatches; epochs differ
        np.testing.assert_array_equal(np.sort(epoch.reshape(-1)), np.arange(16))
    assert not np.array_equal(rows[0], rows[1]) and not np.array_equal(rows[1], rows[2])
    # The batch a convention trains on: the experience's rows with the advantages `assemble_advantages` gives.
    mb = _synthetic_minibatch()
    experience = T.Experience(
        prompt_ids=mb.prompt_ids,
        prompt_mask=mb.prompt_mask,
        response_ids=mb.response_ids,
        response_mask=mb.response_mask,
        behaviour_logprobs=mb.old_logprobs,
        logprobs=mb.old_logprobs,
        ref_logprobs=mb.old_logprobs - 0.1,
        values=mb.old_values,
        scores=jnp.linspace(-1.0, 1.0, 16),
        stopped=jnp.ones((16,), bool),
        lengths=jnp.sum(mb.response_mask, axis=1),
    )
    conv = get_preset("trl")
    adv, data = wrap(functools.partial(T.training_batch, conv))(experience, 0.05)
    want = assemble_advantages(
        conv,
        scores=experience.scores,
        logprobs=experience.logprobs,
        ref_logprobs=experience.ref_logprobs,
        values=experience.values,
        response_mask=experience.response_mask,
        kl_coef=0.05,
        stopped=experience.stopped,
    )
    for name in ("advantages", "returns", "policy_mask", "value_mask"):
        np.testing.assert_allclose(getattr(data, name), getattr(want, name), atol=1e-6, err_msg=name)
    np.testing.assert_allclose(adv.rewards, want.rewards, atol=1e-6)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
        np.testing.assert_array_equal(getattr(data, name), getattr(experience, name), err_msg=name)
    np.testing.assert_array_equal(data.old_logprobs, experience.logprobs)
    np.testing.assert_array_equal(data.old_values, experience.values)


@pytest.mark.parametrize("jit", [True, False])
def test_policy_outputs_and_critic_from_policy(jit):
    """`policy_outputs` against plain forwards of each row's unpadded prompt + response; the critic that
    `critic_from_policy` builds shares the trunk and starts with a zero value head."""
    rng = np.random.default_rng(5)
    rows, temperature = 4, 0.7
    prompt_ids, prompt_mask = _prompts(5, rows)
    lengths = np.array([N, 3, 1, 5])
    response_mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    response_ids = np.where(response_mask > 0, rng.integers(0, 60, size=(rows, N)), PAD).astype(np.int32)

    critic, critic_params = T.critic_from_policy(POLICY, POLICY_PARAMS)
    assert critic.head == "value" and critic.config == POLICY.config and "lm_head" not in critic_params
    assert all(critic_params[name] is POLICY_PARAMS[name] for name in POLICY_PARAMS if name != "lm_head")
    assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(critic_params["value_head"]))
    head = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), critic_params["value_head"])
    value_mask = np.asarray(masks_for(get_preset("trl"), response_mask)[1])  # one slot past each stopped row

    fn = jax.jit(T.policy_outputs, static_argnums=0) if jit else T.policy_outputs
    args = (POLICY, POLICY_PARAMS, None, prompt_ids, prompt_mask, response_ids, response_mask, temperature)
    logprobs, logits, values = fn(*args, head, value_mask)
    no_values = fn(*args)[2]
    assert no_values is None

    for row in range(rows):
        prompt = np.asarray(prompt_ids[row])[np.asarray(prompt_mask[row]) > 0]
        n, p = lengths[row], len(prompt)
        seq = jnp.asarray(np.concatenate([prompt, response_ids[row, :n]])[None], jnp.int32)
        want_logits = np.asarray(POLICY.apply(POLICY_PARAMS, seq).logits[0, p - 1 : p - 1 + n]) / temperature
        want_logprobs = jax.nn.log_softmax(want_logits)[np.arange(n), response_ids[row, :n]]
        want_values = np.asarray(critic.apply({**critic_params, "value_head": head}, seq).values[0, p - 1 :])
        np.testing.assert_allclose(logits[row, :n], want_logits, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logprobs[row, :n], want_logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(logprobs[row, n:], 0.0)
        kept = int(value_mask[row].sum())  # n, or n + 1 when the row stopped before the width
        np.testing.assert_allclose(values[row, :kept], want_values[:kept], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(values[row, kept:], 0.0)
    assert np.abs(np.asarray(values)).max() > 0.1  # the random head is really read

    with pytest.raises(ValueError, match="value_mask"):
        T.policy_outputs(*args, head, value_mask[:, :-1])


def test_config_validation():
    with pytest.raises(ValueError, match="minibatch_size"):
        T.PPOConfig(batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError, match="micro_batch_size"):
        T.PPOConfig(batch_size=16, minibatch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="critic_mode"):
        T.PPOConfig(critic_mode="both")
    with pytest.raises(ValueError, match=r"old_logprobs must be one of \('score', 'rollout'\), got 'behaviour'"):
        T.PPOConfig(old_logprobs="behaviour")
    with pytest.raises(ValueError, match="reward_model"):
        T.init_ppo_state(
            _config(), POLICY, POLICY_PARAMS, jax.random.key(0), reward_fn=target_rate
        )  # critic_init='reward'
