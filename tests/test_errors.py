"""Expected failures end in one ``error:`` line and a non-zero exit code, never a traceback; a bug keeps
its traceback (cem_jax.errors, cem_jax.cli.config_flags.run_main).

Each expected kind is run as a user runs it: the real program in a subprocess. The failures come
before any training, so each takes seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cem_jax import errors
from cem_jax.cli import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OFFLINE_MIRROR = (
    "http://127.0.0.1:9/"  # the discard port: nothing listens, the connection is refused
)


def run_program(module: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180):
    base = {k: v for k, v in os.environ.items() if k != "CEM_DATA_DIR"}
    base.update(JAX_PLATFORMS="cpu", CEM_DATASET_MIRROR=OFFLINE_MIRROR)  # never the real host
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def assert_clean_failure(proc: subprocess.CompletedProcess, *expected: str, code: int) -> str:
    """Exit code ``code``, no traceback, and the last line of stderr is one ``error:`` message
    holding every ``expected`` text."""
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error"), err[-3000:]
    for text in expected:
        assert text in last, (text, last)
    return last


# ------------------------------------------------------------------------------- expected kinds
def test_no_network(tmp_path):
    proc = run_program(
        "experiments.run",
        "--preset=quick",
        "--attacks=",
        f"--workdir={tmp_path / 'run'}",
        "--cache_dir=",
        env={"CEM_DOWNLOAD_DIR": str(tmp_path / "downloads")},
    )
    assert_clean_failure(
        proc,
        f"download of {OFFLINE_MIRROR}cifar-10-python.tar.gz failed (",
        "Connection refused",
        "$CEM_DATASET_MIRROR",  # the remedies: a mirror, the data copied here, prepared elsewhere
        "--data_dir",
        "python -m cem_jax.download cifar10",
        code=1,
    )
    assert not (tmp_path / "downloads" / "cifar10.npz").exists()


def test_missing_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    proc = run_program(
        "experiments.run", f"--data_dir={missing}", f"--workdir={tmp_path / 'run'}", "--cache_dir="
    )
    assert_clean_failure(
        proc, f"data_dir='{missing}': found no such file or folder", "Accepted: a folder", code=1
    )
    assert not missing.exists()


def _not_a_zip(tmp_path):
    path = tmp_path / "data.zip"
    path.write_bytes(b"PK\x03\x04 the first bytes of a zip, then nothing")
    return path, [f"{path}: cannot open this zip", "Copy it again"]


def _damaged_npz(tmp_path):
    path = tmp_path / "cifar10.npz"
    np.savez(path, train_images=np.zeros((2, 32, 32, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:100])  # truncated
    return path, [f"{path}: not a readable prepared cifar10 file", "Delete it"]


def _damaged_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(b"\x1f\x8b not really gzip")
    return path, [f"{path}: not the official cifar10 archive", "cifar-10-batches-py"]


@pytest.mark.parametrize("make", [_not_a_zip, _damaged_npz, _damaged_archive])
def test_damaged_data_file(make, tmp_path):
    path, expected = make(tmp_path)
    proc = run_program(
        "experiments.run", f"--data_dir={path}", f"--workdir={tmp_path / 'run'}", "--cache_dir="
    )
    assert_clean_failure(proc, *expected, code=1)


def test_damaged_results_file_in_the_workdir(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "results.json").write_text('{"final": ')  # a copy cut short
    proc = run_program("experiments.run", "--dataset=synthetic", f"--workdir={wd}")
    assert_clean_failure(proc, f"{wd / 'results.json'} is unreadable", "Move it away", code=1)
    assert (wd / "results.json").read_text() == '{"final": '  # never overwritten


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--defense=bogus"], ["defense 'bogus' is unknown. Accepted: none, noise, cem_noise"]),
        (
            ["--defense=cem_noise", "--sigma=0"],
            ["sigma=0.0: CEM needs Gaussian noise", "sigma > 0"],
        ),
        (["--epochs=six"], ["--epochs=six: invalid literal", "--helpshort"]),  # absl's
        (["--cem_mode=hinge"], ["should be one of <gmm|reference>"]),  # absl's enum
        (["cem_noise"], ["unexpected arguments ['cem_noise']", "--name=value"]),
        # refused by the model after the data are loaded: still a usage error
        (
            ["--dataset=synthetic", "--train_subset=64", "--batch_size=128", "--attacks="],
            ["batch_size=128 is larger than the training set (64)"],
        ),
    ],
)
def test_bad_flag_value(args, expected, tmp_path):
    proc = run_program("experiments.run", *args, f"--workdir={tmp_path / 'run'}", "--cache_dir=")
    assert_clean_failure(proc, *expected, code=2)


def test_unknown_flag(tmp_path):
    proc = run_program("experiments.run", "--sigm=0.1", f"--workdir={tmp_path}")
    assert_clean_failure(
        proc, "Unknown command line flag 'sigm'", "Did you mean: sigma", "--helpshort", code=2
    )
    proc = run_program("experiments.attack")  # a required flag missing
    assert_clean_failure(proc, "--workdir must have a value", code=2)


def test_locked_workdir(tmp_path):
    from cem_jax import runner

    wd = tmp_path / "run"
    with runner.lock_workdir(str(wd)) as me:
        for module, args in (
            ("experiments.run", ["--dataset=synthetic"]),
            ("experiments.attack", []),
        ):
            proc = run_program(module, *args, f"--workdir={wd}", "--cache_dir=")
            assert_clean_failure(
                proc,
                f"{wd} is in use by another run: pid {os.getpid()}",
                f"started {me['started']}",
                "Wait for it to end (or stop it), or use another --workdir",
                code=1,
            )
    assert sorted(os.listdir(wd)) == [".lock"]  # nothing written


def test_attack_of_a_missing_workdir(tmp_path):
    wd = tmp_path / "not_a_run"
    proc = run_program("experiments.attack", f"--workdir={wd}")
    assert_clean_failure(
        proc, f"{wd}: no such folder; expected the --workdir of a run of experiments.run", code=1
    )
    assert not wd.exists()  # not created by the lock


def test_sweep_with_a_missing_or_damaged_study(tmp_path):
    missing = tmp_path / "nowhere.json"
    proc = run_program("experiments.sweep", f"--study={missing}", f"--root={tmp_path / 'sweep'}")
    assert_clean_failure(
        proc, f"--study={missing}: cannot read it (No such file or directory)", "JSON", code=1
    )
    damaged = tmp_path / "study.json"
    damaged.write_text('{"groups": [')
    proc = run_program("experiments.sweep", f"--study={damaged}", f"--root={tmp_path / 'sweep'}")
    assert_clean_failure(proc, f"--study={damaged}: not valid JSON", code=1)


def test_sweep_collect_with_a_damaged_results_file(tmp_path):
    wd = tmp_path / "sweep" / "cifar10_quick" / "none_seed1"
    wd.mkdir(parents=True)
    (wd / "results.json").write_text("{")
    proc = run_program(
        "experiments.sweep",
        "--defenses=none",
        "--seeds=1",
        "--preset=quick",
        f"--root={tmp_path / 'sweep'}",
        "--collect_only",
    )
    assert_clean_failure(proc, f"{wd / 'results.json'} is unreadable", "Restore it", code=1)


def test_results_page_without_or_with_a_damaged_table(tmp_path):
    out = f"--out={tmp_path / 'page.md'}"
    proc = run_program("experiments.results_page", out)
    assert_clean_failure(proc, "--root is required", code=2)
    proc = run_program("experiments.results_page", f"--root={tmp_path}", out)
    assert_clean_failure(proc, "table.json not found", "--collect_only", code=1)
    (tmp_path / "table.json").write_text(json.dumps([1, 2]))
    proc = run_program("experiments.results_page", f"--root={tmp_path}", out)
    assert_clean_failure(proc, "holds no table", "--collect_only", code=1)


# ------------------------------------------------------------------------------- unexpected errors
def test_an_unexpected_error_keeps_its_traceback():
    def buggy(argv):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        config_flags.run_main(buggy, ["prog"])
    # nor a plain ValueError: only the expected failures (CemError) are turned into a message
    with pytest.raises(ValueError, match="cannot reshape"):
        config_flags.run_main(lambda argv: np.zeros(3).reshape(2, 2), ["prog"])


def test_an_unexpected_error_in_a_program_prints_its_traceback():
    script = (
        "from cem_jax.cli import config_flags\n"
        "def main(argv):\n"
        "    raise KeyError('not an expected failure')\n"
        "config_flags.start('doc', [], main)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "KeyError: 'not an expected failure'" in proc.stderr


def test_a_library_value_error_while_loading_data_is_not_an_input_error(monkeypatch):
    """The data modules' own messages become :class:`InputError`; a ``ValueError`` raised inside
    numpy (a bug) stays what it is, traceback and all."""
    from cem_jax import config as config_lib
    from cem_jax import data, runner

    cfg = config_lib.make_config("quick", dataset="synthetic")

    def numpy_fails(*args, **kwargs):
        return np.zeros(3).reshape(2, 2)

    monkeypatch.setattr(data, "load_dataset", numpy_fails)
    with pytest.raises(ValueError, match="cannot reshape") as info:
        runner.load_data(cfg)
    assert not isinstance(info.value, errors.CemError)

    def refused(*args, **kwargs):
        return data.subset(data.synthetic_dataset(num_train=20), 1)  # data.py's own message

    monkeypatch.setattr(data, "load_dataset", refused)
    with pytest.raises(errors.InputError, match="train_subset=1: accepted"):
        runner.load_data(cfg)


def test_error_types_keep_the_builtins_callers_catch():
    from cem_jax import checkpoint, runner, storage

    assert issubclass(errors.DownloadError, OSError)
    assert issubclass(errors.InputError, ValueError)
    assert issubclass(errors.UsageError, ValueError) and errors.UsageError.exit_code == 2
    for cls in (runner.RunError, checkpoint.CheckpointError, storage.StorageError):
        assert issubclass(cls, errors.CemError) and cls.exit_code == 1
    assert issubclass(runner.RunError, RuntimeError) and issubclass(
        storage.StorageError, ValueError
    )


def _raise_in(module: str, error: BaseException):
    """A function whose ``raise`` runs in a frame of ``module`` (as a library's own raise would)."""
    ns: dict = {"__name__": module, "error": error}
    exec("def boom(argv):\n    raise error\n", ns)
    return ns["boom"]


def test_an_unreachable_remote_store_is_one_error_line(capsys):
    """gs:// with no network: the OSError comes from inside the network stack (aiohttp under gcsfs,
    measured: ClientConnectorDNSError while locking a gs:// workdir) and ends in one line."""
    boom = _raise_in(
        "aiohttp.connector", OSError("Cannot connect to host storage.googleapis.com:443")
    )
    with pytest.raises(SystemExit) as exit_:
        config_flags.run_main(boom, ["prog"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot reach the remote storage (OSError:")
    assert "storage.googleapis.com" in err[0] and "local --workdir" in err[0]
    # an OSError of the package's own code or of another library is not that: it keeps its traceback
    for module in ("cem_jax.train", "numpy.lib"):
        with pytest.raises(OSError):
            config_flags.run_main(_raise_in(module, OSError("disk full")), ["prog"])
