"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest


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
