"""Checkpoints through one orbax ``CheckpointManager`` (save / restore / inspect a workdir).

A checkpoint step holds two items: ``state`` (any pytree of arrays: parameters, optimizer state, mixture
state, step counter) and ``meta`` (JSON: the run's config, the epoch it closes, the per-epoch history).
Saves are synchronous and atomic (orbax writes a temporary folder and renames it), so a run killed at any
moment leaves only complete checkpoints behind; the temporary folder of an interrupted save is removed
by the next writer.

A step that is damaged after the fact (a truncated data file, a missing ``_METADATA``, an empty step
folder) is skipped: :meth:`Checkpointer.restore` falls back to the newest step that restores, and
says which steps it skipped and why (:attr:`Checkpointer.skipped`, and a line on stderr).

>>> import tempfile, jax.numpy as jnp
>>> ckpt = Checkpointer(tempfile.mkdtemp())
>>> ckpt.save(1, {"w": jnp.ones(3)}, {"epoch": 1})
>>> state, meta = ckpt.restore({"w": jnp.zeros(3)})
>>> float(state["w"].sum()), meta["epoch"]
(3.0, 1)

Fault injection (tests only): with ``CEM_FAULT_POINT=<name>:<index>`` in the environment, the process
SIGKILLs itself when it reaches that point (:func:`fault_point`); ``tests/test_faults.py`` uses it to
kill a run mid-epoch (``step:<global step>``), during a checkpoint write (``checkpoint_write:<epoch>``),
between a checkpoint and its ``metrics.jsonl`` line (``after_checkpoint:<epoch>``) and while
``results.json`` is written (``results_write:0``). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

import jax
import orbax.checkpoint as ocp

from cem_jax import storage
from cem_jax.errors import CemError

CHECKPOINT_SUBDIR = "checkpoints"
FAULT_ENV = "CEM_FAULT_POINT"


def fault_point(name: str, index: int = 0) -> None:
    """Test hook: SIGKILL this process if ``$CEM_FAULT_POINT`` is ``f"{name}:{index}"``."""
    if os.environ.get(FAULT_ENV) == f"{name}:{index}":
        os.kill(os.getpid(), signal.SIGKILL)


def _kill_when_appears(directory: str, prefix: str) -> None:
    """Test hook: a thread that SIGKILLs the process once ``directory`` has an entry ``prefix*``."""

    def watch() -> None:
        while True:
            try:
                if any(n.startswith(prefix) for n in os.listdir(directory)):
                    os.kill(os.getpid(), signal.SIGKILL)
            except FileNotFoundError:
                pass
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


def _quiet_closed_loop_callbacks() -> None:
    """Silences TensorStore's late callbacks after a failed restore (one traceback per array).

    When one array of a step fails to read, orbax closes its event loop while the other reads are
    still in flight; each then reports ``RuntimeError('Event loop is closed')`` as an unraisable
    exception. Only that exception is dropped; every other one reaches the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_cem_quiet", False):
        return

    def hook(u: Any) -> None:
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        previous(u)

    hook._cem_quiet = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook
    # The other reads' tasks can also end with their own read error, which asyncio logs as "Task
    # exception was never retrieved" when they are collected: drop those of orbax's
    # async_deserialize only (the restore already diagnosed and reported the damage).
    logging.getLogger("asyncio").addFilter(_drop_orphaned_deserialize_errors)


def _drop_orphaned_deserialize_errors(record: logging.LogRecord) -> bool:
    try:
        text = record.getMessage()
    except Exception:  # noqa: BLE001 - a filter must never raise
        return True
    return not (
        text.startswith("Task exception was never retrieved") and "async_deserialize" in text
    )


class CheckpointError(CemError, RuntimeError):
    """No checkpoint of the directory restores (each step was skipped, see the message)."""


_DIAGNOSES = (
    (("Byte range", "OUT_OF_RANGE", "DATA_LOSS"), "a data file is truncated or corrupt"),
    (
        ("pytree structure", "_METADATA"),
        "its tree metadata (state/_METADATA) is missing or damaged",
    ),
    (("Available items: []",), "the step folder is empty"),
    (("not found in the checkpoint",), "an item of the step is missing"),
)


def _reason(e: BaseException) -> str:
    """One short line for an orbax / TensorStore error (their messages run to kilobytes)."""
    text = " ".join(str(e).split())
    diagnosis = next((d for keys, d in _DIAGNOSES if any(k in text for k in keys)), None)
    if len(text) > 160:
        text = text[:157] + "..."
    detail = f"{type(e).__name__}: {text}"
    return f"{diagnosis}; {detail}" if diagnosis else detail


class Checkpointer:
    """Keeps the last ``max_to_keep`` checkpoints of a run under ``directory``.

    ``writable=False`` only reads: it creates nothing and never cleans up (a read-only workdir).
    """

    def __init__(
        self,
        directory: str,
        *,
        max_to_keep: int = 3,
        writable: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.directory = storage.absolute(directory)
        self.writable = writable
        self._stream = stream
        self.skipped: list[tuple[int, str]] = []  # (step, why) of damaged steps passed over
        self.restored_step: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=writable,
            enable_async_checkpointing=False,
            cleanup_tmp_directories=writable,
        )
        self._manager = ocp.CheckpointManager(
            storage.orbax_path(self.directory), options=options, item_names=("state", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        if os.environ.get(FAULT_ENV) == f"checkpoint_write:{step}" and not storage.is_remote(
            self.directory
        ):
            _kill_when_appears(self.directory, f"{step}.")  # orbax's temporary step folder
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def _read_meta_of(self, step: int) -> dict[str, Any]:
        out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = out["meta"]
        if not isinstance(meta, dict):
            raise ValueError(f"meta item is a {type(meta).__name__}, not a JSON object")
        return dict(meta)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON item of ``step`` (default: the newest whose JSON item reads) without the arrays."""
        if step is not None:
            return self._read_meta_of(step)
        for _step, meta in self._readable_metas():
            return meta
        raise self._nothing_restores()

    def _readable_metas(self) -> Any:
        """Yields ``(step, meta)`` newest first, recording the steps whose JSON item is unreadable."""
        for step in reversed(self.all_steps()):
            try:
                meta = self._read_meta_of(step)
            except Exception as e:  # orbax / TensorStore / JSON errors of a damaged step
                self._skip(step, f"its metadata does not read ({_reason(e)})")
                continue
            yield step, meta

    def restore(
        self,
        target: Any,
        step: int | None = None,
        *,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> tuple[Any, dict[str, Any]]:
        """Restores ``state`` into the structure, shapes, dtypes and shardings of ``target``.

        Without ``step``, the newest step that restores: damaged steps are skipped (listed in
        :attr:`skipped`, reported on stderr) and :attr:`restored_step` says which one was used.
        ``check(meta)`` runs before a step's arrays are read; what it raises propagates (e.g. a
        checkpoint of another configuration is refused, never skipped).
        """
        abstract = jax.tree.map(_abstract, target)
        _quiet_closed_loop_callbacks()

        def read(s: int) -> tuple[Any, dict[str, Any]]:
            out = self._manager.restore(
                s,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
                ),
            )
            return out["state"], dict(out["meta"])

        if step is not None:
            if check is not None:
                check(self._read_meta_of(step))
            self.restored_step = step
            return read(step)
        for s, meta in self._readable_metas():
            if check is not None:
                check(meta)
            try:
                state, meta = read(s)
            except Exception as e:  # a truncated or missing array file, a bad _METADATA, ...
                self._skip(s, f"its arrays do not restore ({_reason(e)})")
                continue
            self.restored_step = s
            return state, meta
        raise self._nothing_restores()

    def _skip(self, step: int, why: str) -> None:
        if any(s == step for s, _ in self.skipped):
            return
        self.skipped.append((step, why))
        print(
            f"warning: skipping damaged checkpoint {storage.join(self.directory, str(step))}: {why}",
            file=self._stream if self._stream is not None else sys.stderr,
            flush=True,
        )

    def _nothing_restores(self) -> Exception:
        if not self.all_steps():
            return FileNotFoundError(f"no checkpoint in {self.directory}")
        steps = "; ".join(f"step {s}: {why}" for s, why in self.skipped)
        return CheckpointError(f"no checkpoint in {self.directory} restores ({steps}).")

    def set_aside_skipped(self) -> list[str]:
        """Moves the skipped (damaged) steps to ``<directory>.damaged/`` so training can rewrite them.

        Returns the new paths. Only steps newer than :attr:`restored_step` are in the way of a
        resumed run, but every damaged step is moved: none of them can ever be restored.
        """
        if not self.writable:
            raise PermissionError(f"{self.directory} was opened read-only")
        moved = []
        for step, _ in self.skipped:
            src = storage.join(self.directory, str(step))
            if not storage.exists(src):
                continue
            dst = storage.join(
                f"{self.directory}.damaged", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
            )
            n = 1
            while storage.exists(dst):
                dst = f"{dst.rsplit('~', 1)[0]}~{n}"
                n += 1
            storage.move_tree(src, dst)
            moved.append(dst)
            print(
                f"note: moved the damaged checkpoint {src} to {dst}",
                file=self._stream if self._stream is not None else sys.stderr,
                flush=True,
            )
        self._manager.reload()
        return moved

    def close(self) -> None:
        self._manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
