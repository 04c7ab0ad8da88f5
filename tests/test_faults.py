"""Fault injection: ``experiments.run`` SIGKILLed at chosen points, then re-run with the same command.

Each interrupted run, once re-run, must end with the same ``results.json`` numbers and the same
``metrics.jsonl`` (one line per epoch) as one uninterrupted run. The kill points are hit exactly through
the test-only hook ``CEM_FAULT_POINT=<name>:<index>`` (:func:`cem_jax.checkpoint.fault_point`). All runs
share one persistent XLA compilation cache, so only the reference run compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# 64 training images in batches of 32: 2 steps per epoch, 2 epochs.
ARGS = [
    "--dataset=synthetic",
    "--train_subset=64",
    "--test_subset=64",
    "--batch_size=32",
    "--epochs=2",
    "--attacks=",
    "--seed=5",
    "--cache_dir=",
]
STEPS_PER_EPOCH = 2


def _is_timing(key: str) -> bool:
    return key.endswith("_s") or "time" in key


def _untimed(obj: object) -> object:
    """``obj`` without wall-clock fields (they differ between any two runs)."""
    if isinstance(obj, dict):
        return {k: _untimed(v) for k, v in obj.items() if not _is_timing(k)}
    if isinstance(obj, list):
        return [_untimed(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("xla_cache")
    out = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    out.pop("CEM_FAULT_POINT", None)
    return out


def _run(
    workdir: Path, env: dict[str, str], fault: str | None = None, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    e = dict(env)
    if fault is not None:
        e["CEM_FAULT_POINT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *ARGS, *extra, f"--workdir={workdir}"],
        cwd=ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _outputs(workdir: Path) -> tuple[dict, list[dict]]:
    results = json.loads((workdir / "results.json").read_text())
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return results, [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    wd = tmp_path_factory.mktemp("faults") / "uninterrupted"
    proc = _run(wd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wd


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# (fault point, what the workdir looks like right after the kill)
CASES = {
    # mid-epoch 2: the first step of epoch 2 ran, nothing of epoch 2 is saved
    f"step:{STEPS_PER_EPOCH + 1}": lambda wd: (
        sorted(os.listdir(wd / "checkpoints")) == ["1"] and _lines(wd / "metrics.jsonl") == 1
    ),
    # inside the epoch-2 checkpoint write: only orbax's temporary folder of step 2 exists
    "checkpoint_write:2": lambda wd: (
        "2" not in os.listdir(wd / "checkpoints")
        and any(n.startswith("2.") for n in os.listdir(wd / "checkpoints"))
        and _lines(wd / "metrics.jsonl") == 1
    ),
    # checkpoint 1 complete, its metrics.jsonl line not yet written
    "after_checkpoint:1": lambda wd: (
        "1" in os.listdir(wd / "checkpoints") and _lines(wd / "metrics.jsonl") == 0
    ),
    # while results.json is written: training done, only the temporary file exists
    "results_write:0": lambda wd: (
        not (wd / "results.json").exists()
        and any(n.startswith(".results.json.") for n in os.listdir(wd))
        and _lines(wd / "metrics.jsonl") == 2
    ),
}


@pytest.mark.slow
def test_killed_anywhere_then_rerun_gives_the_uninterrupted_outputs(
    reference: Path, env: dict[str, str], tmp_path: Path
) -> None:
    t0 = time.perf_counter()
    ref_results, ref_metrics = _outputs(reference)
    assert [m["epoch"] for m in ref_metrics] == [1, 2]
    assert _untimed(ref_results["history"]) == _untimed(ref_metrics)
    for fault, killed_state in CASES.items():
        wd = tmp_path / fault.replace(":", "_")
        proc = _run(wd, env, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
        assert killed_state(wd), (fault, sorted(os.listdir(wd)), proc.stdout[-1500:])

        proc = _run(wd, env)  # the same command again
        assert proc.returncode == 0, (fault, proc.stderr[-3000:])
        assert "taking over the stale lock" in proc.stdout, fault
        results, metrics = _outputs(wd)
        assert [m["epoch"] for m in metrics] == [1, 2], fault  # one line per epoch
        assert _untimed(metrics) == _untimed(ref_metrics), fault
        for key in ("final", "history", "dataset", "fingerprint", "config", "attacks"):
            assert _untimed(results[key]) == _untimed(ref_results[key]), (fault, key)
        # no temporary file is left behind, and the workdir is unlocked
        assert not [n for n in os.listdir(wd) if n.endswith(".tmp")], fault
        assert (wd / ".lock").read_text() == ""
    print(f"\n{len(CASES)} kill points, killed + re-run in {time.perf_counter() - t0:.1f}s")


# the decoder attack: 6 steps, a validation (and possibly a checkpoint) every 2
ATTACK_ARGS = (
    "--attacks=decoder",
    "--attack_settings=train_time",
    "--attack_steps=6",
    "--attack_eval_every=2",
    "--attack_batch_size=16",
)


@pytest.mark.slow
def test_run_killed_during_its_attack_resumes_the_attack(env: dict[str, str], tmp_path: Path):
    ref = tmp_path / "uninterrupted"
    proc = _run(ref, env, extra=ATTACK_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref_results, _ = _outputs(ref)

    wd = tmp_path / "killed"
    # the first validation's checkpoint is always written; killed right after it
    proc = _run(wd, env, "attack_checkpoint:2", extra=ATTACK_ARGS)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert not (wd / "results.json").exists()
    assert (wd / "attack_checkpoints" / "train_time" / "decoder" / "2").is_dir()

    proc = _run(wd, env, extra=ATTACK_ARGS)  # the same command again
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "decoder attack resumed from its checkpoint at step 2/6" in proc.stdout
    assert "decoder [train_time] step 2/6" not in proc.stdout  # not trained again
    results, _ = _outputs(wd)
    got = results["attacks"]["decoder"]["train_time"]
    assert got.pop("resumed_at_step") == 2
    for key in ("final", "history", "attacks"):
        assert _untimed(results[key]) == _untimed(ref_results[key]), key
    # the attack checkpoints go once results.json holds the results
    assert not (wd / "attack_checkpoints").exists() and not (ref / "attack_checkpoints").exists()
    # ... also those a kill between the two left behind, when the finished run is run again
    (wd / "attack_checkpoints" / "train_time" / "decoder" / "4").mkdir(parents=True)
    proc = _run(wd, env, extra=ATTACK_ARGS)
    assert proc.returncode == 0 and "already holds a finished run" in proc.stdout, proc.stderr
    assert not (wd / "attack_checkpoints").exists()


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_and_its_epoch_retrained(
    reference: Path, env: dict[str, str], tmp_path: Path
) -> None:
    import glob
    import shutil

    ref_results, ref_metrics = _outputs(reference)
    assert len(ref_results["dataset"]["digest"]) == 64  # the data's identity is recorded
    for damage in ("truncated data file", "empty step folder"):
        wd = tmp_path / damage.replace(" ", "_")
        shutil.copytree(reference, wd)
        (wd / "results.json").unlink()  # as if killed after the last checkpoint
        step2 = wd / "checkpoints" / "2"
        if damage == "truncated data file":
            for f in glob.glob(f"{step2}/state/**/d/*", recursive=True):
                if os.path.isfile(f):
                    os.truncate(f, 10)
        else:
            shutil.rmtree(step2)
            step2.mkdir()
        proc = _run(wd, env)
        assert proc.returncode == 0, (damage, proc.stderr[-3000:])
        out = proc.stdout + proc.stderr
        assert f"skipping damaged checkpoint {step2}" in out, (damage, out[-3000:])
        assert "(resumed after epoch 1)" in proc.stdout
        assert "Traceback" not in out and "Event loop is closed" not in out
        assert os.listdir(wd / "checkpoints.damaged")[0].startswith("2-")
        results, metrics = _outputs(wd)
        assert _untimed(metrics) == _untimed(ref_metrics), damage
        assert _untimed(results["final"]) == _untimed(ref_results["final"]), damage
