"""Checkpointer: damaged steps are skipped (with one line saying why), never fatal while a good one exists."""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np
import pytest

from cem_jax.checkpoint import Checkpointer, CheckpointError


@flax.struct.dataclass
class State:  # shaped like train.TrainState: a struct with a nested dict and a None entry
    w: Any
    opt: Any
    adv: Any = None


def _state(v: float) -> State:
    return State(w=jnp.full((1000,), v), opt={"m": jnp.arange(5.0) * v})


def _three_steps(directory: Path) -> None:
    ckpt = Checkpointer(str(directory))
    for step in (1, 2, 3):
        ckpt.save(step, _state(float(step)), {"epoch": step})
    ckpt.close()


def _truncate_data(step_dir: Path) -> None:
    files = [f for f in glob.glob(f"{step_dir}/state/**/d/*", recursive=True) if os.path.isfile(f)]
    assert files
    for f in files:
        os.truncate(f, 10)


def _remove_metadata(step_dir: Path) -> None:
    os.remove(step_dir / "state" / "_METADATA")


def _empty_folder(step_dir: Path) -> None:
    shutil.rmtree(step_dir)
    step_dir.mkdir()


DAMAGES = {
    "truncated data file": (_truncate_data, "a data file is truncated"),
    "missing _METADATA": (_remove_metadata, "state/_METADATA) is missing"),
    "empty step folder": (_empty_folder, "the step folder is empty"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd, damage):
    _three_steps(tmp_path)
    damage_fn, why = DAMAGES[damage]
    damage_fn(tmp_path / "3")

    ckpt = Checkpointer(str(tmp_path))
    state, meta = ckpt.restore(_state(0.0))
    assert meta == {"epoch": 2} and ckpt.restored_step == 2
    np.testing.assert_array_equal(state.w, np.full(1000, 2.0))
    assert [s for s, _ in ckpt.skipped] == [3]
    assert why in ckpt.skipped[0][1]
    err = capfd.readouterr().err
    # one short line naming the skipped step and why; no TensorStore dumps or late tracebacks
    lines = [line for line in err.splitlines() if "skipping damaged checkpoint" in line]
    assert len(lines) == 1 and f"{tmp_path}/3" in lines[0] and why in lines[0], err
    assert all(len(line) < 500 for line in err.splitlines()), err
    assert "Traceback" not in err and "Event loop is closed" not in err, err

    # a writer sets the damaged step aside and can save that epoch again
    moved = ckpt.set_aside_skipped()
    assert (
        len(moved) == 1 and os.path.isdir(moved[0]) and moved[0].startswith(f"{tmp_path}.damaged")
    )
    assert ckpt.all_steps() == [1, 2]
    ckpt.save(3, _state(30.0), {"epoch": 3})
    ckpt.close()
    state, meta = Checkpointer(str(tmp_path)).restore(_state(0.0))
    assert meta == {"epoch": 3} and float(state.w[0]) == 30.0


def test_no_step_restores_is_one_clear_error(tmp_path):
    _three_steps(tmp_path)
    for step in (1, 2, 3):
        _truncate_data(tmp_path / str(step))
    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* restores \(step 3: .*step 1: "):
        ckpt.restore(_state(0.0))


def test_check_refuses_before_reading_arrays_and_is_not_a_skip(tmp_path):
    _three_steps(tmp_path)

    def refuse(meta: dict) -> None:
        raise ValueError(f"another configuration at epoch {meta['epoch']}")

    ckpt = Checkpointer(str(tmp_path))
    with pytest.raises(ValueError, match="another configuration at epoch 3"):
        ckpt.restore(_state(0.0), check=refuse)
    assert ckpt.skipped == []


def test_read_only_checkpointer_creates_nothing(tmp_path):
    missing = tmp_path / "nothing_here"
    ckpt = Checkpointer(str(missing), writable=False)
    assert ckpt.all_steps() == []
    assert not missing.exists()


def test_orphaned_deserialize_errors_are_not_logged_but_others_are(caplog):
    import logging

    from cem_jax import checkpoint

    checkpoint._quiet_closed_loop_callbacks()
    log = logging.getLogger("asyncio")
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        log.error(
            "Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() "
            "done> exception=ValueError('OUT_OF_RANGE')>"
        )
        log.error("Task exception was never retrieved\nfuture: <Task finished coro=<mine()>>")
    assert [r.getMessage().split("<")[-1] for r in caplog.records] == ["mine()>>"]
