"""Checkpoints of the train state with orbax: save every `save_steps`, keep `max_to_keep`, resume, roll back.

One checkpoint is a step directory holding the state pytree (any pytree: dicts, flax struct dataclasses, optax
NamedTuples) and a JSON metadata dict (data position, iteration, config hash, whether the step is "good").

Facts about orbax-checkpoint 0.12.8 this module relies on (tests/test_checkpoint.py checks them):
- A step is written into a temporary directory and renamed when complete; a process killed at any moment leaves
  either a complete step or a temporary directory that `all_steps` ignores (and the next manager removes).
- Relative paths fail only in orbax's background thread: every path is made absolute here.
- Re-saving an existing step is silently skipped (`save` returns False), or raises `StepAlreadyExistsError`
  under `force=True`. Here it is an explicit choice: `overwrite=True` replaces the step, else `save` returns False.
- Restoring with an abstract target (`jax.ShapeDtypeStruct` leaves of the same tree) gives back the target's
  types: optax NamedTuples come back as NamedTuples, not lists.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ppojax.config import ConfigError


class CheckpointRestoreError(ConfigError):
    """No usable checkpoint; one line naming the directory."""


def abstract_like(tree: Any) -> Any:
    """The tree with every array leaf replaced by its `jax.ShapeDtypeStruct` (shardings kept)."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """Saves and restores `(state, metadata)` steps under one directory.

    Saves run in a background thread (the train loop goes on); `wait()` blocks until the last one is on disk.
    Use as a context manager, or call `close()`.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3, async_save: bool = True):
        self.directory = os.path.abspath(os.path.expanduser(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries -------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Complete steps on disk, ascending (a save in flight counts once it is finished)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    # ---- save / restore ------------------------------------------------------------------------------

    def save(self, step: int, state: Any, metadata: Optional[dict] = None, *, overwrite: bool = False) -> bool:
        """Starts saving `state` and `metadata` as `step`. Returns False (nothing written) if the step exists and
        `overwrite` is False. Metadata must be JSON-able (checked here, not in the background thread)."""
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
        step = int(step)
        if step in self._manager.all_steps():
            if not overwrite:
                return False
            self._manager.wait_until_finished()
            self._manager.delete(step)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata))
        return bool(self._manager.save(step, args=args, force=True))

    def restore(self, target: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """(state, metadata) of `step` (default: the latest). `target` is a state of the same structure, concrete
        or abstract (`abstract_like`); the result has its types, shapes, dtypes and shardings."""
        self._manager.wait_until_finished()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointRestoreError(f"{self.directory}: no complete checkpoint to restore")
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target)), metadata=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(int(step), args=args)
        return restored.state, dict(restored.metadata or {})

    def metadata(self, step: int) -> dict:
        """The metadata dict of `step` alone (cheap: the state is not read)."""
        self._manager.wait_until_finished()
        restored = self._manager.restore(int(step), args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
        return dict(restored.metadata or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def rollback(checkpointer: Checkpointer, target: Any, *, before: Optional[int] = None) -> tuple[int, Any, dict]:
    """Restores the last good checkpoint: the newest step (older than `before`, if given) whose metadata does
    not say `"good": false` and which restores without error. Returns (step, state, metadata)."""
    candidates = [s for s in reversed(checkpointer.all_steps()) if before is None or s < before]
    problems = []
    for step in candidates:
        try:
            if checkpointer.metadata(step).get("good", True) is False:
                continue
            state, metadata = checkpointer.restore(target, step)
            return step, state, metadata
        except CheckpointRestoreError:
            raise
        except Exception as e:  # a damaged step: try the one before
            problems.append(f"step {step}: {type(e).__name__}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    limit = f" before step {before}" if before is not None else ""
    raise CheckpointRestoreError(f"{checkpointer.directory}: no good checkpoint to roll back to{limit}{detail}")


def remove_checkpoints(directory: str) -> None:
    """Deletes a checkpoint directory (a fresh run with overwrite_output_dir)."""
    shutil.rmtree(os.path.abspath(directory), ignore_errors=True)
