"""Sharded entry points (ppojax.parallel) on 8 fake CPU devices equal the one-device programs.

Meshes (data, fsdp, tensor): (8,1,1) pure data parallel, (2,4,1) FSDP, (1,2,4) FSDP x tensor, (2,2,2) all three.

Tolerance: the sharded programs split the batch and, under fsdp / tensor, the contracted dimensions of the
matmuls over devices, so float32 sums are added in another order (partial sums, then an all-reduce). That moves
the last bits: measured here up to ~5e-7 on log-probs and ~1e-6 relative on gradients. The checks allow 1e-5
(log-probs, values, scores: values of size ~1-5) and 1e-5 of each leaf's scale for the train states after a step;
greedy tokens must be identical. A real sharding bug (a wrong slice, a missing all-reduce) moves results by
O(1) or by a factor of the device count.

Compilation dominates (one program per mesh and entry point): the model is one layer, programs compile at
XLA's backend optimization level 0 (as tests/test_rollout.py), and each one-device reference is built once.
Rollout and score run on all four meshes by default, the PPO update step on two and the SFT step on one (the
other meshes with -m slow).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import ppojax
from ppojax import generation as G
from ppojax import parallel as PL
from ppojax import train as T
from ppojax.models import DecoderModel, ModelConfig, init_lora
from ppojax.optim import OptimizerConfig, make_optimizer
from ppojax.presets import get_preset

VOCAB, PAD, N, ROWS = 64, 63, 6, 8
CONFIG = ModelConfig(
    model_type="qwen2",
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    qkv_bias=True,
)
POLICY = DecoderModel(CONFIG)
REWARD = DecoderModel(CONFIG, head="reward")
PARAMS = POLICY.init_params(jax.random.key(0))
REF_PARAMS = POLICY.init_params(jax.random.key(1))
REWARD_PARAMS = REWARD.init_params(jax.random.key(2))
CRITIC, CRITIC_PARAMS = T.critic_from_reward(REWARD, REWARD_PARAMS)
FAST = {"xla_backend_optimization_level": 0}
MESHES = [(8, 1, 1), (2, 4, 1), (1, 2, 4), (2, 2, 2)]
MESH_IDS = ["data8", "data2-fsdp4", "fsdp2-tensor4", "data2-fsdp2-tensor2"]
# The train steps compile the longest (~7-10 s of CPU each here): by default FSDP (2,4,1) and all three axes
# (2,2,2); pure data parallel and FSDP x tensor 4 run with -m slow.
TRAIN_MESHES = [
    pytest.param(mesh, id=name, marks=[pytest.mark.slow] if mesh in ((8, 1, 1), (1, 2, 4)) else [])
    for mesh, name in zip(MESHES, MESH_IDS)
]
# The SFT step (one model, no critic) by default on (2,2,2) only, to keep the default run near its budget.
SFT_MESHES = [
    pytest.param(mesh, id=name, marks=[] if mesh == (2, 2, 2) else [pytest.mark.slow])
    for mesh, name in zip(MESHES, MESH_IDS)
]


@functools.lru_cache(maxsize=None)
def layout(mesh):
    return PL.Layout(PL.MeshConfig(*mesh).make_mesh())


def _prompts(rows, seed):
    rng = np.random.default_rng(seed)
    return G.pad_prompts([list(rng.integers(0, 60, size=rng.integers(1, 5))) for _ in range(rows)], PAD, bucket=4)


def _responses(rows, seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, N + 1, size=rows)
    mask = (np.arange(N)[None] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, rng.integers(0, 60, size=(rows, N)), PAD).astype(np.int32), mask


PROMPT_IDS, PROMPT_MASK = _prompts(ROWS, 0)
RESPONSE_IDS, RESPONSE_MASK = _responses(ROWS, 1)


def _fresh(tree):
    """A copy in new buffers (a donated input must not alias the module's shared arrays)."""
    return jax.tree.map(jnp.copy, tree)


def _assert_close_to_scale(actual, expected, rel=1e-5, floor=1e-9, what=""):
    """Every leaf within `rel` of that leaf's largest magnitude (plus `floor`, for leaves that are float32
    rounding noise in both programs: the key bias's gradient is exactly 0 in real arithmetic, since adding b to
    every key shifts a query's logits by a constant that the softmax ignores)."""
    flat_a, flat_e = jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)
    assert len(flat_a) == len(flat_e)
    for (path, a), e in zip(flat_a, flat_e):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        bound = rel * np.max(np.abs(e)) + floor
        assert np.max(np.abs(a - e)) <= bound, (what, PL.path_string(path), np.max(np.abs(a - e)), bound)


# ----------------------------------------------------------------------------------------------------------
# Mesh config, rules, specs


def test_mesh_config_sizes_and_errors():
    assert PL.MeshConfig(-1, 4, 1).sizes(8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert PL.MeshConfig(1, -1, 2).sizes(8) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert PL.MeshConfig.from_dict({"fsdp": 4}).sizes(8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert PL.MeshConfig.from_dict({"fsdp": -1, "tensor": 2}).sizes(8) == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="mesh: at most one axis may be -1"):
        PL.MeshConfig.from_dict({"fsdp": -1, "tensor": -1})
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        PL.MeshConfig(-1, -1, 1).sizes(8)
    with pytest.raises(ValueError, match="multiply to 6, but there are 8 devices"):
        PL.MeshConfig(2, 3, 1).sizes(8)
    with pytest.raises(ValueError, match="not a multiple of the fixed axes' 3"):
        PL.MeshConfig(-1, 3, 1).sizes(8)
    with pytest.raises(ValueError, match="mesh: unknown mesh axis 'model'"):
        PL.MeshConfig.from_dict({"data": 2, "model": 4})
    with pytest.raises(ValueError, match=r"mesh.tensor: expected a positive integer or -1, found 0"):
        PL.MeshConfig.from_dict({"tensor": 0})
    mesh = PL.MeshConfig(2, 2, 2).make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def _expected_spec(path, shape, sizes):
    """The rules written out by hand for this model: (kernel rows, kernel columns) per tensor kind."""
    fsdp, tensor = sizes["fsdp"], sizes["tensor"]

    def axis(name, dim):
        size = {"fsdp": fsdp, "tensor": tensor}[name]
        return name if size > 1 and dim % size == 0 else None

    if path.endswith(("norm/scale", "o/bias")) or len(shape) == 0:
        return P()
    if path == "embed/embedding":
        return P(axis("tensor", shape[0]), axis("fsdp", shape[1]))
    if path.endswith(("attn/q/kernel", "attn/k/kernel", "attn/v/kernel", "gate/kernel", "up/kernel", "lm_head/kernel")):
        return P(axis("fsdp", shape[0]), axis("tensor", shape[1]))
    if path.endswith(("attn/o/kernel", "down/kernel")):
        return P(axis("tensor", shape[0]), axis("fsdp", shape[1]))
    if path.endswith(("q/bias", "k/bias", "v/bias")):
        return P(axis("tensor", shape[0]))
    if path.endswith(("score/kernel", "value_head/kernel")):
        return P(axis("fsdp", shape[0]))
    raise AssertionError(f"no expectation for {path}")


def _normalise(spec):
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_params_are_sharded_as_the_rules_say(mesh):
    lay = layout(mesh)
    for model, params in ((POLICY, PARAMS), (REWARD, REWARD_PARAMS), (CRITIC, CRITIC_PARAMS)):
        placed = PL.place(params, lay.params(params))
        for path, leaf in jax.tree_util.tree_leaves_with_path(placed):
            name = PL.path_string(path)
            expected = _expected_spec(name, leaf.shape, lay.sizes)
            assert _normalise(leaf.sharding.spec) == _normalise(expected), (mesh, name, leaf.sharding.spec, expected)
            # Each device really holds only its block.
            block = tuple(
                d // np.prod([lay.sizes[a] for a in ((e,) if isinstance(e, str) else (e or ()))])
                for d, e in zip(leaf.shape, tuple(expected) + (None,) * leaf.ndim)
            )
            assert {s.data.shape for s in leaf.addressable_shards} == {block}, (name, block)
        np.testing.assert_array_equal(placed["embed"]["embedding"], params["embed"]["embedding"])


def test_unmatched_parameter_is_an_error_naming_it():
    tree = {"layers_0": {"attn": {"rotary": {"kernel": jnp.zeros((4, 4))}}}}
    with pytest.raises(PL.ShardingRuleError, match="parameter 'layers_0/attn/rotary/kernel' \\(rank 2\\): no entry"):
        layout((2, 2, 2)).params(tree)
    with pytest.raises(PL.ShardingRuleError, match="logical axis 'experts' has no rule"):
        PL.fit_spec((4,), ("experts",), {"data": 1, "fsdp": 1, "tensor": 1})


def test_every_family_head_and_lora_adapter_has_a_rule():
    """Shapes only (no compilation): every parameter of every supported layout maps to a spec."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    configs = [
        ModelConfig(model_type="llama", head_dim=8, max_position_embeddings=64, **base),
        ModelConfig(model_type="qwen2", head_dim=8, max_position_embeddings=64, qkv_bias=True, **base),
        ModelConfig(model_type="qwen3", head_dim=8, max_position_embeddings=64, qk_norm=True, **base),
        ModelConfig(
            model_type="gpt2",
            **{**base, "num_kv_heads": 4},
            head_dim=8,
            max_position_embeddings=64,
            norm="layer",
            activation="gelu_new",
            gated_mlp=False,
            position="learned",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            fused_qkv=True,
            tie_word_embeddings=True,
        ),
    ]
    lay = layout((1, 2, 4))
    for config in configs:
        for head in ("lm", "value", "reward"):
            model = DecoderModel(config, head=head)
            specs = jax.tree.map(lambda s: _normalise(s.spec), lay.params(model.param_shapes()))
            assert all(isinstance(s, P) for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
        lora = init_lora(DecoderModel(config), jax.random.key(0), rank=4, targets="all")
        lora_specs = lay.params(lora)
        adapters = lora_specs.adapters["layers_1"]
        if config.fused_qkv:
            assert _normalise(adapters["attn"]["qkv"]["b"].spec) == P(None, "tensor")  # [rank, 3H]: heads
            assert _normalise(lay.params(model.param_shapes())["pos_embed"]["embedding"].spec) == P(None, "fsdp")
        else:
            assert _normalise(adapters["attn"]["q"]["a"].spec) == P("fsdp")  # [H, rank]
            assert _normalise(adapters["attn"]["k"]["b"].spec) == P(None, "tensor")  # [rank, kv]
            assert _normalise(adapters["mlp"]["down"]["a"].spec) == P("tensor")  # [I, rank]
            assert _normalise(adapters["attn"]["o"]["b"].spec) == P(None, "fsdp")  # [rank, H]
        # A LoRA run's reference of its own (`train.LoraReference`): both halves placed as the params are.
        shapes = DecoderModel(config).param_shapes()
        pair = lay.params(T.LoraReference(base=shapes, reference=shapes))
        plain = jax.tree.leaves(lay.params(shapes))
        for half in (pair.base, pair.reference):
            assert [s.spec for s in jax.tree.leaves(half)] == [s.spec for s in plain]


def test_optimizer_state_and_ppo_state_follow_the_params():
    lay = layout((1, 2, 4))
    config = _ppo_config()
    state, _ = _ppo_state()
    shardings = lay.ppo_state(state, config)
    q = shardings.policy["layers_0"]["attn"]["q"]["kernel"].spec
    assert _normalise(q) == P("fsdp", "tensor")
    adam = shardings.policy_opt_state[1]  # (no clipping state, ScaleByAdamState, schedule count)
    assert _normalise(adam.mu["layers_0"]["attn"]["q"]["kernel"].spec) == P("fsdp", "tensor")
    assert _normalise(adam.nu["lm_head"]["kernel"].spec) == P("fsdp", "tensor")
    assert adam.count.spec == P() and shardings.step.spec == P() and shardings.key.spec == P()
    critic_adam = shardings.critic_opt_state[1]
    assert _normalise(critic_adam.mu["value_head"]["kernel"].spec) == P("fsdp")


# ----------------------------------------------------------------------------------------------------------
# Rollout and score


@functools.lru_cache(maxsize=None)
def _single_rollout():
    run = jax.jit(G.rollout, static_argnames=G.ROLLOUT_STATIC_ARGNAMES, compiler_options=FAST)
    out = run(
        POLICY,
        PARAMS,
        PROMPT_IDS,
        PROMPT_MASK,
        jax.random.key(3),
        max_new_tokens=N,
        temperature=jnp.float32(0.0),
        top_p=jnp.float32(1.0),
        stop_token_ids=jnp.asarray([5], jnp.int32),
        pad_token_id=jnp.int32(PAD),
    )
    return jax.device_get(out)


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_greedy_rollout_equals_one_device(mesh):
    lay = layout(mesh)
    rollout = PL.sharded_rollout(POLICY, lay, max_new_tokens=N, compiler_options=FAST)
    params = PL.place(PARAMS, lay.params(PARAMS))
    out = rollout(
        params, PROMPT_IDS, PROMPT_MASK, jax.random.key(3), temperature=0.0, stop_token_ids=[5], pad_token_id=PAD
    )
    single = _single_rollout()
    assert out.response_ids.sharding.spec == lay.batch.spec and out.logprobs.sharding.spec == lay.batch.spec
    for name in ("response_ids", "response_mask", "lengths", "stopped"):
        np.testing.assert_array_equal(getattr(out, name), getattr(single, name), err_msg=name)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5, rtol=0)
    assert np.all(single.logprobs[single.response_mask > 0] < 0)


@pytest.mark.parametrize("penalty", [None, 1.3], ids=["plain", "repetition_penalty"])
def test_sampled_top_k_top_p_rollout_is_row_local(penalty):
    # top-k / top-p find their thresholds with row-wise ops only: a batch split over devices samples the same
    # tokens as one device, and no device gathers the others' logits (lax.top_k made the partitioner all-gather
    # them at every decode step). The repetition penalty's seen-token table is row-local too.
    lay = layout((8, 1, 1))
    settings = dict(temperature=0.9, top_p=0.8, stop_token_ids=[5], pad_token_id=PAD, repetition_penalty=penalty)
    rollout = PL.sharded_rollout(POLICY, lay, max_new_tokens=N, top_k=7, compiler_options=FAST)
    params = PL.place(PARAMS, lay.params(PARAMS))
    out = rollout(params, PROMPT_IDS, PROMPT_MASK, jax.random.key(4), **settings)
    run = jax.jit(G.rollout, static_argnames=G.ROLLOUT_STATIC_ARGNAMES, compiler_options=FAST)
    scalars = (jnp.float32(0.9), jnp.float32(0.8), jnp.asarray([5], jnp.int32), jnp.int32(PAD))
    single = run(
        POLICY,
        PARAMS,
        PROMPT_IDS,
        PROMPT_MASK,
        jax.random.key(4),
        max_new_tokens=N,
        top_k=7,
        repetition_penalty=penalty,
        **dict(zip(("temperature", "top_p", "stop_token_ids", "pad_token_id"), scalars)),
    )
    np.testing.assert_array_equal(out.response_ids, single.response_ids)
    np.testing.assert_allclose(out.logprobs, single.logprobs, atol=1e-5, rtol=0)
    if penalty is not None:  # the penalty changes the samples
        plain = rollout(params, PROMPT_IDS, PROMPT_MASK, jax.random.key(4), **{**settings, "repetition_penalty": None})
        assert not np.array_equal(plain.response_ids, out.response_ids)
    penalty = None if penalty is None else jnp.float32(penalty)
    args = (params, PROMPT_IDS, PROMPT_MASK, jax.random.key(4), *scalars, None, penalty)
    with PL.activation_sharding(lay):
        program = rollout.sharded.jitted(*args).lower(*args).compile().as_text()
    assert "all-gather" not in program and "all-to-all" not in program


@functools.lru_cache(maxsize=None)
def _single_score():
    def run(policy, ref, critic, reward, *batch):
        return G.score(
            POLICY,
            policy,
            *batch,
            temperature=0.7,
            critic_model=CRITIC,
            critic_params=critic,
            reward_model=REWARD,
            reward_params=reward,
            ref_params=ref,
        )

    batch = (PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK)
    return jax.device_get(jax.jit(run, compiler_options=FAST)(PARAMS, REF_PARAMS, CRITIC_PARAMS, REWARD_PARAMS, *batch))


def _sharded_score(lay, **extra):
    score = PL.sharded_score(POLICY, CRITIC, REWARD, lay, compiler_options=FAST)
    batch = (PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK)
    kwargs = dict(critic_params=CRITIC_PARAMS, reward_params=REWARD_PARAMS, ref_params=REF_PARAMS)
    return score(PARAMS, *batch, temperature=0.7, **kwargs, **extra)


@pytest.mark.parametrize("mesh", MESHES, ids=MESH_IDS)
def test_score_equals_one_device(mesh):
    lay = layout(mesh)
    out = _sharded_score(lay)
    single = _single_score()
    assert out.scores.sharding.spec == lay.batch.spec
    for name in ("logprobs", "ref_logprobs", "values", "scores"):
        np.testing.assert_allclose(getattr(out, name), getattr(single, name), atol=1e-5, rtol=0, err_msg=name)
    assert np.abs(single.logprobs - single.ref_logprobs).max() > 0.1  # the two models really differ


def test_score_with_the_rollout_logprobs_and_a_value_mask_equals_one_device():
    lay = layout((2, 2, 2))
    behaviour = jax.random.normal(jax.random.key(5), RESPONSE_IDS.shape) - 3.0  # stands in for a rollout's
    value_mask = ppojax.extend_mask(RESPONSE_MASK)  # TRL's: one slot past each response
    out = _sharded_score(lay, old_logprobs=behaviour, value_mask=value_mask)
    single = _single_score()
    assert out.logprobs.sharding.spec == lay.batch.spec
    np.testing.assert_array_equal(out.logprobs, np.where(np.asarray(RESPONSE_MASK) > 0, behaviour, 0.0))
    for name in ("ref_logprobs", "scores"):
        np.testing.assert_allclose(getattr(out, name), getattr(single, name), atol=1e-5, rtol=0, err_msg=name)
    batch = (PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK)
    want = jax.jit(G.response_values, static_argnums=0)(CRITIC, CRITIC_PARAMS, *batch, value_mask=value_mask)
    np.testing.assert_allclose(out.values, want, atol=1e-5, rtol=0)
    extra = np.asarray(value_mask) & (np.asarray(RESPONSE_MASK) == 0)
    assert extra.any() and np.abs(np.asarray(out.values)[extra]).min() > 0  # the +1 slots hold real values


# ----------------------------------------------------------------------------------------------------------
# One PPO update step, one SFT step


# Adam's first step is lr * g / (|g| + eps): with the default eps 1e-8 it turns float32 noise in a near-zero
# gradient into a full ±lr step (its sign set by summation order). eps 1e-3 keeps the step a smooth function of
# the gradient, so comparing states after a step compares the gradients the two programs computed.
ADAM = OptimizerConfig(learning_rate=1e-3, eps=1e-3)


def _ppo_config():
    return T.PPOConfig(
        convention=get_preset("ppojax"),
        batch_size=2 * ROWS,
        minibatch_size=2 * ROWS,
        micro_batch_size=ROWS,
        ppo_epochs=1,
        max_new_tokens=N,
        pad_token_id=PAD,
        critic_mode="separate",
        policy_optimizer=ADAM,
        critic_optimizer=ADAM,
    )


@functools.lru_cache(maxsize=None)
def _ppo_state():
    return T.init_ppo_state(
        _ppo_config(), POLICY, PARAMS, jax.random.key(4), reward_model=REWARD, reward_params=REWARD_PARAMS
    )


@functools.lru_cache(maxsize=None)
def _minibatch():
    rows = 2 * ROWS
    prompt_ids, prompt_mask = _prompts(rows, 5)
    response_ids, response_mask = _responses(rows, 6)
    rng = np.random.default_rng(7)
    old = G.response_logprobs(POLICY, PARAMS, prompt_ids, prompt_mask, response_ids, response_mask, 1.0)
    noise = lambda scale: (scale * rng.standard_normal((rows, N))).astype(np.float32) * response_mask
    return T.Minibatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        old_logprobs=np.asarray(old) + noise(0.3),  # some ratios outside the clip range
        old_values=noise(1.0),
        advantages=noise(1.0),
        returns=noise(1.0),
        policy_mask=response_mask,
        value_mask=response_mask,
    )


@functools.lru_cache(maxsize=None)
def _single_update():
    state, models = _ppo_state()
    step = functools.partial(T.update_step, config=_ppo_config(), models=models)
    return jax.device_get(jax.jit(step, compiler_options=FAST)(state, _minibatch(), PARAMS))


@pytest.mark.parametrize("mesh", TRAIN_MESHES)
def test_update_step_equals_one_device(mesh):
    lay = layout(mesh)
    state, models = _ppo_state()
    config = _ppo_config()
    step = PL.sharded_update_step(config, models, lay, compiler_options=FAST)
    placed = PL.place(_fresh(state), lay.ppo_state(state, config))
    new_state, metrics = step(placed, _minibatch(), PARAMS)
    single_state, single_metrics = _single_update()
    assert placed.policy["lm_head"]["kernel"].is_deleted()  # donated: its buffer now holds the new state
    assert float(metrics["policy/clipfrac"]) > 0 and float(single_metrics["train/skipped"]) == 0
    for name, value in single_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    _assert_close_to_scale(
        (new_state.policy, new_state.critic, new_state.policy_opt_state, new_state.critic_opt_state),
        (single_state.policy, single_state.critic, single_state.policy_opt_state, single_state.critic_opt_state),
        what="state",
    )
    assert int(new_state.step) == 1
    expected = lay.ppo_state(state, config)
    got = jax.tree.map(lambda x: _normalise(x.sharding.spec), new_state)
    assert got == jax.tree.map(lambda s: _normalise(s.spec), expected)
    moved = np.abs(np.asarray(single_state.policy["lm_head"]["kernel"]) - np.asarray(PARAMS["lm_head"]["kernel"]))
    assert moved.max() > 1e-4  # the step did move the params (so the comparison is not of two copies of init)


SFT_OPTIMIZER = make_optimizer(ADAM)


@functools.lru_cache(maxsize=None)
def _single_sft():
    state = T.init_train_state(PARAMS, SFT_OPTIMIZER)
    step = functools.partial(T.sft_step, model=POLICY, optimizer=SFT_OPTIMIZER)
    batch = T.SequenceBatch(PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK)
    return jax.device_get(jax.jit(step, compiler_options=FAST)(state, batch, None))


@pytest.mark.parametrize("mesh", SFT_MESHES)
def test_sft_step_equals_one_device(mesh):
    lay = layout(mesh)
    state = T.init_train_state(_fresh(PARAMS), SFT_OPTIMIZER)
    step = PL.sharded_sft_step(POLICY, SFT_OPTIMIZER, lay, compiler_options=FAST)
    batch = T.SequenceBatch(PROMPT_IDS, PROMPT_MASK, RESPONSE_IDS, RESPONSE_MASK)
    new_state, metrics = step(PL.place(state, lay.train_state(state, SFT_OPTIMIZER)), batch, None)
    single_state, single_metrics = _single_sft()
    for name, value in single_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    _assert_close_to_scale((new_state.params, new_state.opt_state), (single_state.params, single_state.opt_state))
    spec = new_state.params["layers_0"]["mlp"]["down"]["kernel"].sharding.spec
    assert _normalise(spec) == _normalise(_expected_spec("layers_0/mlp/down/kernel", (64, 32), lay.sizes))


def test_batch_rows_must_divide_over_the_batch_shards():
    lay = layout((2, 4, 1))
    rollout = PL.sharded_rollout(POLICY, lay, max_new_tokens=N, compiler_options=FAST)
    with pytest.raises(ValueError, match="batch: 6 rows are not a multiple of the 8 batch shards"):
        rollout(PARAMS, PROMPT_IDS[:6], PROMPT_MASK[:6], jax.random.key(0), stop_token_ids=[5], pad_token_id=PAD)


@pytest.mark.slow  # one more pair of train-step compilations
def test_reward_model_step_equals_one_device():
    lay = layout((2, 2, 2))
    chosen_ids, chosen_mask = _responses(ROWS, 9)
    batch = T.PreferenceBatch(PROMPT_IDS, PROMPT_MASK, chosen_ids, chosen_mask, RESPONSE_IDS, RESPONSE_MASK)
    state = T.init_train_state(REWARD_PARAMS, SFT_OPTIMIZER)
    step = functools.partial(T.reward_model_step, model=REWARD, optimizer=SFT_OPTIMIZER)
    single_state, single_metrics = jax.device_get(jax.jit(step, compiler_options=FAST)(state, batch, None))
    sharded = PL.sharded_reward_model_step(REWARD, SFT_OPTIMIZER, lay, compiler_options=FAST)
    fresh = T.init_train_state(_fresh(REWARD_PARAMS), SFT_OPTIMIZER)
    new_state, metrics = sharded(PL.place(fresh, lay.train_state(fresh, SFT_OPTIMIZER)), batch, None)
    for name, value in single_metrics.items():
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
    _assert_close_to_scale((new_state.params, new_state.opt_state), (single_state.params, single_state.opt_state))
    assert _normalise(new_state.params["score"]["kernel"].sharding.spec) == P("fsdp")
