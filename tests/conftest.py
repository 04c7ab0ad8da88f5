"""Fixtures shared by several test modules, and the session's XLA compilation cache."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_CACHE_ENV = {
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def pytest_configure(config: pytest.Config) -> None:
    """One persistent XLA compilation cache per test process, shared with the programs it starts.

    Many tests start ``experiments.run`` (and its killed-and-resumed reruns) with the same small
    configuration; each new process would compile the same programs again. The cache serves them
    compiled: the same executables, so the same numbers. Under pytest-xdist every worker gets its
    own folder (the controller runs no tests), so no two test processes write one entry. A cache the
    user set (``JAX_COMPILATION_CACHE_DIR``) is kept as it is.
    """
    # Tests compile far more than they compute: XLA's backend at -O0 compiles the same programs
    # about 30 % faster (a small run with three attacks: 72 s against 101 s). Set in the
    # environment, so the programs the tests start inherit it; a user's own flags are kept.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_backend_optimization_level=0".strip()
    if "PYTEST_XDIST_WORKER" in os.environ:
        # Several test processes on one GPU must not each take most of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") and not os.environ.get("CEM_TEST_XLA_CACHE"):
        return
    if getattr(config.option, "numprocesses", None) and "PYTEST_XDIST_WORKER" not in os.environ:
        return  # the xdist controller
    folder = tempfile.mkdtemp(prefix="cem_jax_test_xla_cache_")
    config._cem_xla_cache = folder  # removed in pytest_unconfigure
    os.environ.update(_CACHE_ENV, JAX_COMPILATION_CACHE_DIR=folder, CEM_TEST_XLA_CACHE=folder)
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``pytest -n 2`` hands out whole files (as ``--dist loadfile``): a module's fixtures (a trained
    reference run, an emulator) are then built once, not once per worker."""
    if config.option.dist == "load":
        from xdist.scheduler import LoadFileScheduling

        return LoadFileScheduling(config, log)
    return None


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = getattr(config, "_cem_xla_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def small_full_run(tmp_path_factory):
    """The workdir of one uninterrupted small run (``tests.test_runner.SMALL``) on a local disk:
    the reference that killed-and-resumed runs (local, ``gs://``) must reproduce. Run once."""
    from tests.test_runner import SMALL, run_module

    full = tmp_path_factory.mktemp("small") / "full"
    proc = run_module("experiments.run", *SMALL, f"--workdir={full}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout  # the final summary
    return full


@pytest.fixture(scope="session")
def gcs_env(tmp_path_factory):
    """A local GCS emulator (``tests/gcs.py``) for the whole session; yields the environment
    variables that point ``gs://`` at it (also set in ``os.environ`` meanwhile)."""
    from tests import gcs

    log = tmp_path_factory.mktemp("gcs") / "emulator.log"
    with gcs.emulator(str(log)) as env, gcs.environment(env):
        yield env
