"""Checkpoints: round trip with typed optax states, max_to_keep, existing steps, rollback, SIGKILL mid-save."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from ppojax.checkpoint import Checkpointer, CheckpointRestoreError, abstract_like, rollback


@struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object
    key: jax.Array


def make_state(value: float):
    params = {"w": jnp.full((4, 3), value), "b": jnp.zeros(3)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    return State(jnp.int32(value), params, tx.init(params), jax.random.key_data(jax.random.PRNGKey(int(value))))


def test_round_trip_typed_and_metadata(tmp_path):
    state = make_state(2.0)
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(5, state, {"iteration": 5, "data_position": [1, 8], "config_hash": "abc"})
        ckpt.wait()
        restored, meta = ckpt.restore(abstract_like(make_state(0.0)))
    assert meta == {"iteration": 5, "data_position": [1, 8], "config_hash": "abc"}
    assert isinstance(restored, State)
    adam = restored.opt_state[1][0]
    assert type(adam).__name__ == "ScaleByAdamState"  # the NamedTuple comes back typed
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(got, want)
    with Checkpointer(str(tmp_path / "ckpt")) as again:  # a new process sees the same steps
        assert again.all_steps() == [5] and again.restore(make_state(0.0))[1]["iteration"] == 5


def test_max_to_keep_existing_step_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with Checkpointer("rel/ckpt", max_to_keep=2) as ckpt:  # made absolute: orbax fails on relative paths
        assert os.path.isabs(ckpt.directory)
        for step in (1, 2, 3):
            assert ckpt.save(step, make_state(step), {"iteration": step})
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3]
        assert ckpt.save(3, make_state(9.0)) is False  # exists: nothing written
        ckpt.wait()
        assert float(ckpt.restore(make_state(0.0))[0].params["w"][0, 0]) == 3.0
        assert ckpt.save(3, make_state(9.0), {"iteration": 3}, overwrite=True)
        ckpt.wait()
        assert float(ckpt.restore(make_state(0.0), 3)[0].params["w"][0, 0]) == 9.0
        with pytest.raises(TypeError, match="JSON"):
            ckpt.save(4, make_state(4.0), {"bad": object()})


def test_rollback_to_last_good(tmp_path):
    with Checkpointer(str(tmp_path / "ckpt"), max_to_keep=None) as ckpt:
        with pytest.raises(CheckpointRestoreError, match="no complete checkpoint"):
            ckpt.restore(make_state(0.0))
        ckpt.save(1, make_state(1.0), {"good": True})
        ckpt.save(2, make_state(2.0), {"good": True})
        ckpt.save(3, make_state(3.0), {"good": False})  # saved after the KL blew up
        ckpt.wait()
        step, state, meta = rollback(ckpt, make_state(0.0))
        assert step == 2 and float(state.params["w"][0, 0]) == 2.0
        assert rollback(ckpt, make_state(0.0), before=2)[0] == 1
        with pytest.raises(CheckpointRestoreError, match="no good checkpoint"):
            rollback(ckpt, make_state(0.0), before=1)


CHILD = textwrap.dedent("""
    import sys, jax.numpy as jnp
    from ppojax.checkpoint import Checkpointer
    ckpt = Checkpointer(sys.argv[1], max_to_keep=2)
    for step in range(1, 1000):
        state = {"a": jnp.full((1024, 1024), float(step)), "b": jnp.full((2048, 512), float(step))}
        print("saving", step, flush=True)
        ckpt.save(step, state, {"iteration": step})
        if step < 3:
            ckpt.wait()
""")


def _in_flight(directory):
    """True while a step is being written (orbax's temporary directory exists)."""
    return os.path.isdir(directory) and any("orbax-checkpoint-tmp" in name for name in os.listdir(directory))


@pytest.mark.parametrize("when", ["while_writing", "just_before"])
def test_sigkill_mid_save_leaves_a_restorable_latest(tmp_path, when):
    directory = str(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", CHILD, directory], stdout=subprocess.PIPE, text=True, env=env)
    caught_writing = False
    try:
        for line in child.stdout:
            if line.strip() == "saving 3":
                break
        if when == "while_writing":  # kill the moment a temporary step directory is seen
            deadline = time.time() + 30
            while not (caught_writing := _in_flight(directory)) and time.time() < deadline:
                time.sleep(0.001)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert caught_writing or when == "just_before"
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        latest = ckpt.latest_step()
        assert latest is not None and latest >= 2
        target = {
            "a": jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
            "b": jax.ShapeDtypeStruct((2048, 512), jnp.float32),
        }
        state, meta = ckpt.restore(target)
        assert meta == {"iteration": latest}
        assert float(state["a"][0, 0]) == latest and float(state["b"][-1, -1]) == latest
        # The next save still works beside the debris of the killed one.
        assert ckpt.save(latest + 10, state, {"iteration": latest + 10})
        ckpt.wait()
        assert ckpt.latest_step() == latest + 10
