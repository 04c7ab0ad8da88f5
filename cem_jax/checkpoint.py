"""Checkpoints through one orbax ``CheckpointManager`` (save / restore / inspect a workdir).

A checkpoint step holds two items: ``state`` (any pytree of arrays: parameters, optimizer state, mixture
state, step counter) and ``meta`` (JSON: the run's config, the epoch it closes, the per-epoch history).
Saves are synchronous and atomic (orbax writes a temporary folder and renames it), so a run killed at any
moment leaves only complete checkpoints behind.

>>> import tempfile, jax.numpy as jnp
>>> ckpt = Checkpointer(tempfile.mkdtemp())
>>> ckpt.save(1, {"w": jnp.ones(3)}, {"epoch": 1})
>>> state, meta = ckpt.restore({"w": jnp.zeros(3)})
>>> float(state["w"].sum()), meta["epoch"]
(3.0, 1)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_SUBDIR = "checkpoints"


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a run under ``directory``."""

    def __init__(self, directory: str, *, max_to_keep: int = 3) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON item of ``step`` (default: the latest) without touching the arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores ``state`` into the structure, shapes, dtypes and shardings of ``target``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
