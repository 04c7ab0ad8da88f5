"""cem_jax.storage, and runs whose workdir is on Google Cloud Storage (``gs://``), against a local
GCS emulator (``tests/gcs.py``): files, the lease lock, orbax checkpoints, a killed run resumed, a
re-attack, a loaded client, a sweep's table."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import fsspec
import jax.numpy as jnp
import numpy as np
import pytest

from cem_jax import runner, storage
from cem_jax.checkpoint import Checkpointer
from tests import gcs
from tests.test_runner import ROOT, SMALL
from tests.test_sweep import _fake_results

_COUNT = iter(range(10**6))


@pytest.fixture
def bucket_dir(gcs_env):
    """A fresh prefix in the emulated bucket."""
    return f"gs://{gcs.BUCKET}/t{next(_COUNT)}"


def _other_client(env):
    """A second, independent GCS client (what another process or host sees)."""
    return fsspec.filesystem("gs", skip_instance_cache=True, use_listings_cache=False)


@pytest.fixture(params=["local", "gcs"])
def folder(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "f")
    return request.getfixturevalue("bucket_dir")


def test_files_round_trip_locally_and_on_gcs(folder):
    storage.makedirs(folder)
    a = storage.join(folder, "a.json")
    assert not storage.exists(a)
    storage.write_text(a, '{"x": 1}')
    assert storage.exists(a) and storage.read_text(a) == '{"x": 1}'
    storage.write_text(a, '{"x": 2}')  # replaced whole
    assert json.loads(storage.read_text(a)) == {"x": 2}
    storage.makedirs(storage.join(folder, "sub"))
    storage.write_bytes(storage.join(folder, "sub", "b.bin"), b"\x00\x01")
    assert storage.listdir(folder) == ["a.json", "sub"]
    assert storage.isdir(storage.join(folder, "sub")) and not storage.isdir(a)
    assert not storage.isdir(storage.join(folder, "missing"))
    with pytest.raises(FileNotFoundError):
        storage.read_text(storage.join(folder, "missing"))
    # exclusive creation: once
    lock = storage.join(folder, ".lock")
    assert storage.create_exclusive(lock, "first")
    assert not storage.create_exclusive(lock, "second")
    assert storage.read_text(lock) == "first"
    storage.remove(lock)
    storage.remove(lock)  # absent: nothing to do
    assert not storage.exists(lock)
    # a folder moved (a damaged checkpoint set aside)
    storage.move_tree(storage.join(folder, "sub"), storage.join(folder, "aside", "sub-1"))
    assert storage.read_bytes(storage.join(folder, "aside", "sub-1", "b.bin")) == b"\x00\x01"
    assert not storage.exists(storage.join(folder, "sub", "b.bin"))
    assert storage.basename(a) == "a.json" and storage.parent(a) == storage.absolute(folder)


def test_gcs_writes_are_seen_by_another_client_at_once(bucket_dir, gcs_env):
    other = _other_client(gcs_env)
    path = storage.join(bucket_dir, "results.json")
    assert not storage.exists(path)
    assert storage.listdir(bucket_dir) == []
    other.pipe_file(path.split("://")[1], b"{}")  # another host writes it
    assert storage.exists(path) and storage.listdir(bucket_dir) == ["results.json"]
    storage.write_text(path, '{"a": 1}')
    assert other.cat_file(path.split("://")[1]) == b'{"a": 1}'
    other.rm_file(path.split("://")[1])
    assert not storage.exists(path)


def test_gcs_exclusive_creation_holds_in_a_race(bucket_dir, gcs_env, monkeypatch):
    """Two creators that both saw no lock: the upload precondition (``ifGenerationMatch=0``) lets
    only the first one create it."""
    path = storage.join(bucket_dir, ".lock")
    assert storage.create_exclusive(path, "first")
    fs, _ = storage._fs(path)
    monkeypatch.setattr(fs, "exists", lambda *a, **k: False)  # the second saw nothing either
    assert not storage.create_exclusive(path, "second")
    assert storage.read_text(path) == "first"


@pytest.mark.parametrize(
    "path, message",
    [
        (
            "s3://bucket/run",
            "the s3:// scheme is not supported; accepted: a local or mounted folder",
        ),
        ("gs://", "name a bucket"),
    ],
)
def test_unsupported_urls_are_refused_naming_what_is_accepted(path, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match=message):
        storage.check(path, "--workdir")
    from cem_jax import config as config_lib

    cfg = config_lib.make_config("quick", dataset="synthetic", attacks=())
    with pytest.raises(runner.RunError, match=message):
        runner.run(cfg, workdir=path, stream=io.StringIO())
    import cem_jax

    with pytest.raises(storage.StorageError, match=message):
        cem_jax.load_client(path)
    assert os.listdir(tmp_path) == []  # no local "s3:" folder


def test_gcs_without_gcsfs_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # import gcsfs -> ImportError
    with pytest.raises(storage.StorageError, match=r'pip install -e "\.\[gcs\]"'):
        storage.check("gs://bucket/run", "--workdir")


# ------------------------------------------------------------------------------------ the lease lock
def test_remote_lock_is_exclusive_renewed_and_deleted(bucket_dir, monkeypatch):
    monkeypatch.setattr(runner, "LEASE_RENEW_S", 0.2)
    path = storage.join(bucket_dir, runner.LOCK_FILE)
    with runner.lock_workdir(bucket_dir) as me:
        held = json.loads(storage.read_text(path))
        assert held["token"] == me["token"] and held["pid"] == os.getpid()
        first = held["renewed"]
        with pytest.raises(runner.RunError, match=f"in use by another run: pid {os.getpid()}"):
            with runner.lock_workdir(bucket_dir):
                pass
        time.sleep(1.0)
        assert json.loads(storage.read_text(path))["renewed"] > first  # renewed by its thread
    assert not storage.exists(path)  # deleted on exit


def test_stale_remote_lock_is_taken_over_and_a_lost_one_is_not_deleted(bucket_dir, monkeypatch):
    monkeypatch.setattr(runner, "LEASE_RENEW_S", 0.2)
    path = storage.join(bucket_dir, runner.LOCK_FILE)
    stale = {"pid": 4242, "host": "preempted-vm", "started": "2026-01-01T00:00:00+00:00"}
    storage.write_text(path, json.dumps({**stale, "token": "old", "renewed": time.time() - 400}))
    buf = io.StringIO()
    with runner.lock_workdir(bucket_dir, stream=buf) as me:
        assert json.loads(storage.read_text(path))["token"] == me["token"]
        assert "taking over the stale lock" in buf.getvalue()
        assert "pid 4242 on host preempted-vm" in buf.getvalue()
        # a fresh lock of someone else (renewed just now) is respected
        thief = {**stale, "token": "thief", "renewed": time.time() + 3600}
        storage.write_text(path, json.dumps(thief))
        time.sleep(1.0)
    assert "was taken over by pid 4242" in buf.getvalue()
    assert json.loads(storage.read_text(path))["token"] == "thief"  # not deleted: not ours
    with pytest.raises(runner.RunError, match="lock renewed"):
        with runner.lock_workdir(bucket_dir):
            pass


def test_a_run_on_a_locked_remote_workdir_is_refused(bucket_dir, gcs_env):
    with runner.lock_workdir(bucket_dir) as me:
        proc = subprocess.run(
            [sys.executable, "-m", "experiments.run", *SMALL, f"--workdir={bucket_dir}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **gcs_env, "JAX_PLATFORMS": "cpu"},
        )
    assert proc.returncode != 0
    assert f"is in use by another run: pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
    assert f"started {me['started']}" in proc.stderr and "Traceback" not in proc.stderr
    assert storage.listdir(bucket_dir) == []  # it wrote nothing, and the lock is gone


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoints_on_gcs_save_restore_and_set_aside_a_damaged_step(bucket_dir, gcs_env):
    directory = storage.join(bucket_dir, "checkpoints")
    ckpt = Checkpointer(directory, max_to_keep=2, stream=io.StringIO())
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full((3,), float(step))}, {"epoch": step})
    assert ckpt.all_steps() == [2, 3]  # max_to_keep
    state, meta = ckpt.restore({"w": jnp.zeros(3)})
    assert meta["epoch"] == 3 and np.asarray(state["w"]).tolist() == [3.0, 3.0, 3.0]
    ckpt.close()
    # damage step 3: delete its array data; the newest restorable step is 2
    fs = _other_client(gcs_env)
    root = directory.split("://")[1]
    data = [p for p in fs.find(f"{root}/3/state") if "/d/" in p or p.endswith(".zarray")]
    assert data, fs.find(f"{root}/3")
    for p in data:
        fs.rm_file(p)
    ckpt = Checkpointer(directory, max_to_keep=2, stream=io.StringIO())
    state, meta = ckpt.restore({"w": jnp.zeros(3)})
    assert ckpt.restored_step == 2 and meta["epoch"] == 2
    assert [s for s, _ in ckpt.skipped] == [3]
    moved = ckpt.set_aside_skipped()
    assert len(moved) == 1 and moved[0].startswith(f"{directory}.damaged/3-")
    assert ckpt.all_steps() == [2] and storage.isdir(moved[0])
    ckpt.close()


# ------------------------------------------------------------------------------------- end to end
def _run(
    module: str, *args: str, env: dict, fault: str | None = None
) -> subprocess.CompletedProcess:
    extra = {"CEM_FAULT_POINT": fault} if fault else {}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **env, **extra, "JAX_PLATFORMS": "cpu"},
    )


@pytest.mark.slow
def test_run_on_gcs_killed_resumes_to_the_local_numbers_then_reattack(
    bucket_dir, gcs_env, small_full_run
):
    wd = storage.join(bucket_dir, "run")
    # killed right after its first checkpoint, before its metrics line
    proc = _run(
        "experiments.run", *SMALL, f"--workdir={wd}", env=gcs_env, fault="after_checkpoint:1"
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not storage.exists(storage.join(wd, "results.json"))
    proc = _run("experiments.run", *SMALL, f"--workdir={wd}", env=gcs_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed after epoch 1" in proc.stdout
    # the killed run's lease was taken over at once (its process on this host is gone)
    assert "taking over the stale lock" in proc.stdout and "is gone" in proc.stdout
    remote = json.loads(storage.read_text(storage.join(wd, "results.json")))
    lines = storage.read_text(storage.join(wd, "metrics.jsonl")).splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]
    assert not storage.exists(storage.join(wd, runner.LOCK_FILE))  # released

    # the same run, uninterrupted, on a local disk
    ref = json.loads((small_full_run / "results.json").read_text())
    for k, v in ref["final"].items():
        if isinstance(v, float) and not k.endswith("_s"):
            assert remote["final"][k] == pytest.approx(v, rel=1e-4, abs=1e-4), k
    assert remote["history"][-1]["loss"] == pytest.approx(ref["history"][-1]["loss"], rel=1e-4)

    # re-attack from the bucket: results.json and the figure are written there
    proc = _run(
        "experiments.attack",
        f"--workdir={wd}",
        "--attacks=decoder",
        "--attack_steps=2",
        "--attack_eval_every=2",
        "--attack_batch_size=32",
        env=gcs_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(storage.read_text(storage.join(wd, "results.json")))
    assert set(res["attacks"]) == {"decoder"} and res["history"] == remote["history"]
    png = storage.read_bytes(storage.join(wd, "reconstructions.png"))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # (load_client reads the run through the same client.read_run as this re-attack)


def test_sweep_collects_and_pages_from_a_gcs_root(bucket_dir, gcs_env, tmp_path):
    from cem_jax.cli import collect

    rng = np.random.default_rng(0)
    grid = collect.grid(["noise", "cem_noise"], [0.1, 0.2], [1.0], [1, 2])
    for point in grid:
        res = _fake_results(point["defense"], point["sigma"], point["lambd"], point["seed"], rng)
        wd = collect.workdir_of(bucket_dir, "synthetic", "quick", point)
        res["workdir"] = wd
        storage.write_text(storage.join(wd, "results.json"), json.dumps(res))
    flags = [
        f"--root={bucket_dir}",
        "--dataset=synthetic",
        "--preset=quick",
        "--defenses=noise,cem_noise",
        "--sigmas=0.1,0.2",
        "--lambdas=1",
        "--seeds=1,2",
    ]
    proc = _run("experiments.sweep", *flags, "--collect_only", env=gcs_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8/8 runs finished (4 grid points)" in proc.stdout
    table = json.loads(storage.read_text(storage.join(bucket_dir, collect.TABLE_JSON)))
    assert len(table["rows"]) == 4 and all(r["n"] == 2 for r in table["rows"])
    assert storage.read_bytes(storage.join(bucket_dir, collect.PLOT_PNG))[:4] == b"\x89PNG"
    out = tmp_path / "docs" / "results.md"
    proc = _run("experiments.results_page", f"--root={bucket_dir}", f"--out={out}", env=gcs_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "noise" in out.read_text()
    assert (tmp_path / "docs" / "results_privacy_utility.png").read_bytes()[:4] == b"\x89PNG"


def test_lock_threads_end_with_the_block(bucket_dir, monkeypatch):
    monkeypatch.setattr(runner, "LEASE_RENEW_S", 0.05)
    before = {t.name for t in threading.enumerate()}
    with runner.lock_workdir(bucket_dir):
        assert "cem_jax-lease" in {t.name for t in threading.enumerate()}
    assert "cem_jax-lease" not in {t.name for t in threading.enumerate()} - before
