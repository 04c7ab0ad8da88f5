"""Two processes on one machine run ``experiments.run`` as two hosts would (DESIGN §5).

Each process has two fake CPU devices and joins JAX's distributed runtime through the CLI's
``--coordinator_address`` / ``--num_processes`` / ``--process_id``; together they form the same
4-device mesh as one process with four fake devices. Their workdir is on (emulated) Google Cloud
Storage, as a TPU slice's would be. The test checks that both finish, that process 0 alone wrote
the outputs (one ``metrics.jsonl`` line per epoch, nothing else), and that accuracy, leakage and the
attack's MSE equal the one-process, 4-device run on a local folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.devices import fake_devices_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--dataset=synthetic",
    "--train_subset=128",
    "--test_subset=64",
    "--batch_size=32",
    "--epochs=1",
    "--defense=cem_noise",
    "--kmeans_iterations=3",
    "--attacks=decoder",
    "--attack_steps=4",
    "--attack_eval_every=2",
    "--attack_batch_size=32",
    "--cache_dir=",
    "--seed=3",
]
TIMEOUT_S = 420


def _env(devices: int) -> dict[str, str]:
    """Fake ``devices`` CPU devices, compiled at the suite's ``-O0`` (conftest). The two-process
    program rounds its cross-process sums differently from the one-process one; measured at
    ``-O0`` on 2026-12-08: 2e-6 relative in loss (2.303926 vs 2.303921), 2.4e-5 in the
    certificate, 0.0008 bits on the ~13-16-bit diagonal estimates, 7e-5 on the attacks' MSE, all
    far inside the tolerance below. (An earlier ``-O0`` build rounded further apart, 2e-4 in loss,
    so this test was compiled optimised: 528 s beside the study's sweep, 323 s at ``-O0``.)"""
    env = {
        k: v for k, v in fake_devices_env(devices).items() if not k.startswith("JAX_COORDINATOR")
    }
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _numbers(results: dict) -> dict[str, float]:
    fin = results["final"]
    out = {
        "clean_acc": fin["clean_acc"],
        "defended_acc": fin["defended_acc"],
        "leakage_bits": fin["leakage_bits"],
        "loss": results["history"][-1]["loss"],
    }
    for split in ("train", "test"):
        for k in ("certificate", "diagonal", "full_estimate"):
            out[f"leakage.{split}.{k}"] = fin["leakage"][split][k]
    for setting, m in results["attacks"]["decoder"].items():
        out[f"decoder.{setting}.mse"] = m["mse"]
        out[f"decoder.{setting}.baseline_mse"] = m["baseline"]["mse"]
    return out


@pytest.fixture(scope="module")
def one_process_reference(tmp_path_factory) -> dict:
    """``results.json`` of the same run in one process with four devices (run once)."""
    workdir = tmp_path_factory.mktemp("one") / "run"
    start = time.perf_counter()
    one = subprocess.run(
        [sys.executable, "-m", "experiments.run", *TINY, f"--workdir={workdir}"],
        cwd=ROOT,
        env=_env(4),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    print(f"one process x 4 devices: {time.perf_counter() - start:.1f} s")
    assert one.returncode == 0, one.stderr[-4000:]
    return json.loads((workdir / "results.json").read_text())


@pytest.mark.slow
def test_two_processes_equal_one_process_on_four_devices(gcs_env, one_process_reference):
    """The two processes share a ``gs://`` workdir (a local GCS emulator, ``tests/gcs.py``), as the
    hosts of a TPU slice do: the lease lock, orbax's multi-process checkpoints and process 0's
    writes, on GCS; the reference ran in one process on a local folder. (A shared local folder
    differs only in the lock, a ``flock``, tested in one process by ``tests/test_runner.py``; one
    two-process run is what the CI time allows.)"""
    from cem_jax import storage

    cmd = [sys.executable, "-m", "experiments.run", *TINY]
    where = "gcs"
    two = f"gs://cem-test/multihost-{os.getpid()}"
    port = _free_port()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                *cmd,
                f"--workdir={two}",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env={**_env(2), **gcs_env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    two_s = time.perf_counter() - start
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
    print(f"two processes x 2 devices ({where}): {two_s:.1f} s")

    # process 0 alone wrote: one metrics line per epoch, nothing else, the lease deleted at the end
    outputs = ["checkpoints", "metrics.jsonl", "reconstructions.png", "results.json"]
    assert storage.listdir(two) == outputs, storage.listdir(two)
    assert len(storage.read_text(storage.join(two, "metrics.jsonl")).splitlines()) == 1
    results = json.loads(storage.read_text(storage.join(two, "results.json")))
    reference = one_process_reference
    assert results["devices"] == reference["devices"] == "4 x cpu"
    got, want = _numbers(results), _numbers(reference)
    assert got.keys() == want.keys()
    for k, v in want.items():  # shown with -s: the figures of the comparison
        print(f"{k:<36} 2 proc x 2 dev {got[k]:.7g}   1 proc x 4 dev {v:.7g}")
    for k, v in want.items():  # the same program; only the order of float32 sums differs
        # Rounding, amplified by the certificate (~1100 bits from the variances of a few samples)
        # and by the attack's Adam steps: observed up to 1.2e-4 relative. Since 017de90 the
        # client's 16x16 conv is XLA:CPU's convolution, which (likely the cause) rounds an image's
        # output differently with the batch around it (2e-6 between per-device batches of 8 and
        # 16, where the im2col matmul gives identical rows), which the leakage
        # estimates of 128 images and the attacks amplify: observed 0.04-0.05 bits on the
        # ~13-16-bit diagonal estimates (3.7e-3 relative), 1.1e-3 relative on the inference-time
        # attack's MSE, 9e-5 on the loss. Hence 5e-3 relative and 0.25 bits: a lost or doubled
        # shard moves these figures by percents.
        tol = 0.25 if k.startswith("leakage") else 1e-6
        assert got[k] == pytest.approx(v, rel=5e-3, abs=tol), (k, got[k], v)
