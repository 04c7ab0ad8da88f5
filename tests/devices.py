"""The environment for a subprocess that fakes CPU devices (XLA reads the flag when jax starts)."""

from __future__ import annotations

import os


def fake_devices_env(devices: int) -> dict[str, str]:
    """``os.environ`` with ``--xla_force_host_platform_device_count=devices`` in ``XLA_FLAGS``.

    Other XLA flags (the tests' ``-O0``, a user's own) are kept; an earlier device count is
    neutralised so this one holds.
    """
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count", "--_x")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env
