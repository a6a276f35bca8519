"""Shared fixtures: tiny random HF checkpoints, built once per session into a temp dir."""

from __future__ import annotations

import pytest

import hf_builders


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, head="lm", dtype=torch.float32, **config_overrides) -> (directory, torch_model)."""
    built = {}

    def get(name, head="lm", **kwargs):
        key = (name, head, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"{name}_{head}")
            built[key] = (str(directory), hf_builders.build(name, directory, head=head, **kwargs))
        return built[key]

    return get
