"""The `mesh` and `distributed` config keys of `ppojax train` (stage ppo), and a sharded CLI run."""

import csv
import os

import numpy as np
import pytest

from ppojax.config import ConfigError, config_from_dict


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for d in ("model", "saves/reward"):
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            f.write("{}")
    with open("prompts.json", "w") as f:
        f.write('[{"instruction": "hi", "input": ""}]')
    return tmp_path


def _config(**changes):
    raw = {
        "model_name_or_path": "model",
        "stage": "ppo",
        "dataset": "prompts.json",
        "output_dir": "out",
        "reward_model": "saves/reward",
    }
    raw.update(changes)
    raw = {k: v for k, v in raw.items() if v is not None}
    return config_from_dict(raw, source="run.yaml")


def _error(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        _config(**changes)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_mesh_and_distributed_keys(workdir):
    config = _config(mesh={"data": 2, "fsdp": 4})
    assert config.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and config.distributed is None
    assert _config(mesh={"fsdp": -1}).mesh == {"data": 1, "fsdp": -1, "tensor": 1}
    assert _config(distributed="auto").distributed == "auto"
    keys = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
    assert _config(distributed=keys).distributed == keys
    assert config.hash() == _config().hash()  # a run may resume on another mesh
    assert (
        _error(mesh={"data": 2, "model": 4})
        == "run.yaml: mesh: unknown mesh axis 'model'; the axes are ('data', 'fsdp', 'tensor')"
    )
    assert "run.yaml: mesh.tensor: expected a positive integer or -1, found 0" in _error(mesh={"tensor": 0})
    assert "distributed.coordinator is not a key" in _error(distributed={"coordinator": "h:1"})
    sft = _config(stage="sft", reward_model=None, mesh={"data": 2, "fsdp": 4}, distributed="auto")
    assert sft.mesh == {"data": 2, "fsdp": 4, "tensor": 1} and sft.distributed == "auto"  # every stage
