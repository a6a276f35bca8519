"""ppojax.parallel: loading into shardings, sharded checkpoints onto another mesh, the memory estimate, the
multi-host helpers, and two processes on loopback (jax.distributed, gloo CPU collectives) against one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ppojax import parallel as PL
from ppojax.checkpoint import Checkpointer
from ppojax.models import DecoderModel, ModelConfig, load_pretrained, save_pretrained

import parallel_testing as S

HERE = os.path.dirname(os.path.abspath(__file__))


def _layout(data, fsdp, tensor, devices=None):
    return PL.Layout(PL.MeshConfig(data, fsdp, tensor).make_mesh(devices))


def _spec(x):
    entries = list(x.sharding.spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


# ----------------------------------------------------------------------------------------------------------
# Loading


def test_load_sharded_places_each_tensor_in_its_sharding(tmp_path):
    config = ModelConfig(**{**S.CONFIG.__dict__, "qkv_bias": True, "o_bias": True})  # Llama attention_bias
    model = DecoderModel(config)
    params = model.init_params(jax.random.key(5))
    save_pretrained(str(tmp_path), model, params)
    layout = _layout(1, 2, 4)
    loaded_model, loaded = PL.load_sharded(str(tmp_path), layout)
    _, plain = load_pretrained(str(tmp_path))
    assert loaded_model.config.hidden_size == 32 and loaded_model.head == "lm"
    for (path, leaf), reference in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(leaf, reference, err_msg=PL.path_string(path))
    # q is stored transposed in HF ([out, in]); each device read only its block of it, already transposed.
    q = loaded["layers_0"]["attn"]["q"]["kernel"]
    assert _spec(q) == P("fsdp", "tensor") and {s.data.shape for s in q.addressable_shards} == {(16, 8)}
    assert _spec(loaded["embed"]["embedding"]) == P("tensor", "fsdp")
    assert _spec(loaded["layers_0"]["attn"]["k"]["bias"]) == P("tensor")
    # A critic from a causal LM: its zero value head is placed too.
    _, critic = PL.load_sharded(str(tmp_path), layout, head="value")
    head = critic["value_head"]["kernel"]
    assert _spec(head) == P("fsdp") and not np.any(np.asarray(head))


# ----------------------------------------------------------------------------------------------------------
# Checkpoints


def test_sharded_checkpoint_restores_onto_another_mesh(tmp_path):
    config, models, state, *_ = S.ppo_setup()
    old = _layout(2, 4, 1)
    saved = PL.place(state, old.ppo_state(state, config))
    assert _spec(saved.policy["layers_0"]["mlp"]["up"]["kernel"]) == P("fsdp")
    with Checkpointer(str(tmp_path / "ckpt")) as checkpointer:
        checkpointer.save(3, saved, {"iteration": 3})
    new = _layout(1, 2, 4)
    target = PL.abstract_state(state, new.ppo_state(state, config))
    with Checkpointer(str(tmp_path / "ckpt")) as checkpointer:
        restored, metadata = checkpointer.restore(target)
    assert metadata == {"iteration": 3}
    up = restored.policy["layers_0"]["mlp"]["up"]["kernel"]
    assert _spec(up) == P("fsdp", "tensor") and up.sharding.mesh.shape == new.mesh.shape
    assert _spec(restored.policy_opt_state[1].mu["lm_head"]["kernel"]) == P("fsdp", "tensor")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(state)):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b, err_msg=PL.path_string(path))


# ----------------------------------------------------------------------------------------------------------
# Memory estimate


def test_memory_estimate_matches_a_hand_computed_case():
    config = ModelConfig(
        model_type="llama",
        vocab_size=32,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=4,
        max_position_embeddings=32,
    )
    policy = DecoderModel(config)
    estimate = PL.estimate_memory(
        {"data": 1, "fsdp": 2, "tensor": 2},
        models={"policy": (policy, True), "reference": (policy, False)},
        batch_size=8,
        micro_batch_size=4,
        prompt_length=4,
        max_new_tokens=4,
    )
    rows = {row.name: row.bytes_per_device for row in estimate.rows}
    # Elements per device: embed [32, 8] / (tensor 2 x fsdp 2) = 64; three norms 24 (replicated);
    # q [8, 8] / 4 = 16; k, v [8, 4] / 4 = 8 each; o [8, 8] / 4 = 16; gate, up, down 128 / 4 = 32 each;
    # lm_head [8, 32] / 4 = 64. Sum 296 float32.
    params = (64 + 24 + 16 + 8 + 8 + 16 + 3 * 32 + 64) * 4
    assert rows["params policy"] == params and rows["params reference"] == params
    assert rows["optimizer state"] == 2 * params and rows["gradients"] == params
    # KV cache: 8 rows over data x fsdp = 4 per device, 8 slots, 1 KV head (not divisible by tensor 2: whole),
    # head_dim 4, K and V, 1 layer, float32.
    assert rows["KV cache"] == 2 * 1 * 4 * 8 * 1 * 4 * 4
    # Activations: micro-batch 4 / 2 = 2 rows x 8 tokens; per token and layer 4 H = 32, q and attention output
    # 2 x 8 / 2, k and v 2 x 4 / 2, gate/up/product 3 x 16 / 2 -> 68 float32, plus attention logits and
    # probabilities 2 x (2 heads / 2) x 8 slots float32; LM head 2 rows x 8 positions x 32 / 2 vocab x 2 float32.
    per_token = 68 * 4 + 2 * 1 * 8 * 4
    assert rows["activations"] == 2 * 8 * per_token + 2 * 8 * 16 * 4 * 2
    assert estimate.total == sum(rows.values())
    text = estimate.format()
    assert "mesh data=1, fsdp=2, tensor=2" in text and "KV cache" in text and "total" in text


def test_memory_estimate_remat_and_master_weights():
    policy = DecoderModel(S.CONFIG, remat=True, dtype="bfloat16")
    mesh = {"data": 8, "fsdp": 1, "tensor": 1}
    kwargs = dict(batch_size=8, micro_batch_size=8, prompt_length=4, max_new_tokens=4)
    bf16 = PL.estimate_memory(mesh, models={"policy": (policy, True)}, **kwargs)
    fp32 = PL.estimate_memory(mesh, models={"policy": (policy, True)}, master_dtype="float32", **kwargs)
    get = lambda e, name: next(r.bytes_per_device for r in e.rows if r.name == name)
    assert get(fp32, "params policy") == 2 * get(bf16, "params policy")
    assert get(fp32, "optimizer state") == 2 * get(bf16, "optimizer state")
    assert get(fp32, "gradients") == get(bf16, "gradients")  # float32 accumulation either way
    no_remat = PL.estimate_memory(mesh, models={"policy": (DecoderModel(S.CONFIG, dtype="bfloat16"), True)}, **kwargs)
    assert get(bf16, "activations") >= get(no_remat, "activations")  # one layer: remat keeps its input too


def test_ppo_memory_estimate_counts_the_four_models():
    config, models, *_ = S.ppo_setup()
    sizes = {"data": 2, "fsdp": 4, "tensor": 1}
    estimate = PL.estimate_ppo_memory(config, models, sizes, prompt_length=4)
    explicit = PL.estimate_memory(
        sizes,
        models={
            "policy": (models.policy, True),
            "reference": (models.policy, False),
            "critic": (models.critic, True),
            "reward": (models.reward, False),
        },
        batch_size=config.batch_size,
        micro_batch_size=config.micro_size,
        prompt_length=4,
        max_new_tokens=config.max_new_tokens,
    )
    assert estimate == explicit
    lora = {r.name for r in PL.estimate_ppo_memory(config, models, sizes, prompt_length=4, lora=True).rows}
    assert "params reference" not in lora and "params policy" in lora


# ----------------------------------------------------------------------------------------------------------
# Multi-host helpers in one process


def test_single_process_feeds_every_row_and_distributed_start_is_optional():
    layout = _layout(2, 2, 2)
    assert PL.process_batch_rows(layout, 16) == slice(0, 16)
    ids = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    batch = PL.batch_from_process_data(layout, {"ids": ids}, 16)
    assert batch["ids"].sharding.spec == layout.batch.spec
    np.testing.assert_array_equal(batch["ids"], ids)
    with pytest.raises(ValueError, match="local batch has 8 rows, expected rows 0:16"):
        PL.batch_from_process_data(layout, {"ids": ids[:8]}, 16)
    fed = PL.feed_batch(layout, (ids, ids + 1))  # the whole host batch in, this process's rows fed
    assert all(a.sharding.spec == layout.batch.spec for a in fed)
    np.testing.assert_array_equal(fed[1], ids + 1)
    # No settings: a single-process run, nothing started.
    assert PL.initialize_distributed(env={}) == (0, 1, 8, 8)
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="num_processes, process_id not set"):
        PL.initialize_distributed(env={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ValueError, match="coordinator_address: expected host:port, found 'node0'"):
        PL.initialize_distributed("node0", 2, 0, env={})
    with pytest.raises(ValueError, match="process_id: expected 0 <= process_id < 2, found 2"):
        PL.initialize_distributed(
            env={"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}
        )
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES: expected an integer, found 'two'"):
        PL.initialize_distributed(env={"JAX_NUM_PROCESSES": "two"})
    # The config-level entry: mesh keys, distributed keys.
    layout, info = PL.setup({"fsdp": 4})
    assert layout.sizes == {"data": 2, "fsdp": 4, "tensor": 1} and info.process_count == 1
    with pytest.raises(ValueError, match="config: distributed.coordinator is not a key"):
        PL.setup(None, {"coordinator": "h:1"})
    with pytest.raises(ValueError, match="config: mesh: unknown mesh axis 'pipeline'"):
        PL.setup({"pipeline": 2})


# ----------------------------------------------------------------------------------------------------------
# Two processes on loopback

_WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, numpy as np
from jax.experimental import multihost_utils
from ppojax import parallel as PL
from ppojax.checkpoint import Checkpointer
import parallel_testing as S

port, process_id, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = PL.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
assert tuple(info) == (process_id, 2, 2, 4), info
config, models, state, (ids, mask), ref_params, reward_params = S.ppo_setup()
host_params = jax.device_get(ref_params)
layout = PL.Layout(PL.MeshConfig(2, 2, 1).make_mesh())
state = PL.place(state, layout.ppo_state(state, config))
ref_params = PL.place(ref_params, layout.params(ref_params))
reward_params = PL.place(reward_params, layout.params(reward_params))
rows = PL.process_batch_rows(layout, S.BATCH)
assert rows == slice(8 * process_id, 8 * process_id + 8), rows
prompts = PL.batch_from_process_data(layout, (ids[rows], mask[rows]), S.BATCH)  # this process's rows only
iteration = PL.sharded_ppo_iteration(config, models, layout, compiler_options=S.FAST)
state, metrics, experience = iteration(state, prompts, ref_params, reward_params)
# Loading into shardings across processes: each process reads only its own devices' blocks of the file.
_, loaded = PL.load_sharded(os.path.join(out, "hf"), layout)
for (path, leaf), expected in zip(jax.tree_util.tree_leaves_with_path(loaded), jax.tree.leaves(host_params)):
    for shard in leaf.addressable_shards:
        np.testing.assert_array_equal(shard.data, expected[shard.index], err_msg=PL.path_string(path))
with Checkpointer(os.path.join(out, "ckpt")) as checkpointer:
    checkpointer.save(1, state, {"processes": 2})
gathered = multihost_utils.process_allgather(
    {"policy": state.policy, "critic": state.critic, "response_ids": experience.response_ids}, tiled=True
)
if process_id == 0:
    flat = {PL.path_string(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(gathered)}
    flat.update({"metric/" + k: np.asarray(v) for k, v in metrics.items()})
    np.savez(os.path.join(out, "result.npz"), **flat)
print("OK", process_id)
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # three PPO-iteration compilations (two processes + the reference): ~1-2 min on 2 cores
def test_two_processes_run_a_ppo_iteration_like_one_process(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    config, models, state, prompts, ref_params, reward_params = S.ppo_setup()
    save_pretrained(str(tmp_path / "hf"), models.policy, ref_params)  # the workers load it into their shards
    port = str(_free_port())
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, port, str(i), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    # The single-process reference meanwhile: the same mesh shape over 4 of this process's 8 devices.
    layout = _layout(2, 2, 1, jax.devices()[:4])
    iteration = PL.sharded_ppo_iteration(config, models, layout, compiler_options=S.FAST)
    placed = PL.place(jax.tree.map(jnp.copy, state), layout.ppo_state(state, config))
    ref_state, ref_metrics, ref_experience = iteration(placed, prompts, ref_params, reward_params)
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for i, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0 and f"OK {i}" in output, output[-3000:]

    result = np.load(tmp_path / "result.npz")
    np.testing.assert_array_equal(result["response_ids"], ref_experience.response_ids)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(result["metric/" + name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    for prefix, tree in (("policy", ref_state.policy), ("critic", ref_state.critic)):
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            name = f"{prefix}/{PL.path_string(path)}"
            np.testing.assert_allclose(result[name], leaf, rtol=0, atol=1e-5 * np.abs(leaf).max(), err_msg=name)
    assert float(ref_metrics["train/updates"]) == 2 and float(ref_metrics["train/skipped_updates"]) == 0

    # The two processes' sharded checkpoint restores in this one process onto a different mesh.
    target = PL.abstract_state(state, _layout(1, 2, 4).ppo_state(state, config))
    with Checkpointer(str(tmp_path / "ckpt")) as checkpointer:
        restored, metadata = checkpointer.restore(target)
    assert metadata == {"processes": 2}
    assert _spec(restored.policy["lm_head"]["kernel"]) == P("fsdp", "tensor")
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored.policy):
        name = "policy/" + PL.path_string(path)
        np.testing.assert_array_equal(leaf, result[name], err_msg=name)
    assert int(restored.step) == 2 and int(restored.iteration) == 1
