"""A benchmark step run in a process of its own, timed there on request (benchmark only).

    from benchmarks import step_worker
    with step_worker.StepWorker("benchmarks.torch_decoder:make_step", batch=64) as worker:
        seconds = worker.time(10)   # runs 10 steps in the worker; their wall time there

Why: two frameworks' steps timed in one process share its allocator (one glibc arena once
:func:`cem_jax.xla_cpu.tune_malloc` has run), its heap and its CPU thread pools, and each perturbs
the other (docs/benchmarks.md: the decoder step in JAX lost its allocator gain beside PyTorch). A
worker gives the other step a process of its own, set up as the ``cem-*`` programs set theirs up
(the same allocator options, unless ``CEM_JAX_MALLOC=0``), while the two are still timed in
interleaved rounds by one benchmark run; the worker waits on its pipe, idle, while the parent times
its own step.

The worker is ``python -m benchmarks.step_worker <module:factory> <JSON keyword arguments>``:
it calls ``factory(**kwargs)`` for a zero-argument step, runs it twice (compilation, first
allocations), prints one JSON line ``{"ready": true, "pid": ..., "malloc": [...]}``, then for each
line ``<n>`` it reads, runs ``n`` steps and prints ``{"seconds": s, "steps": n}``; it exits at end of
input. A step's return value is waited on (``jax.block_until_ready``, which passes a torch tensor
through as it is: a PyTorch CPU step is synchronous).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])  # the checkout: `benchmarks` and `tests` import


class StepWorker:
    """A step built by ``factory`` (``"module:function"``) with ``kwargs`` in a child process."""

    def __init__(self, factory: str, timeout: float = 600.0, **kwargs: Any):
        if ":" not in factory:
            raise ValueError(f"factory must be 'module:function', got {factory!r}")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        self.factory, self.timeout = factory, timeout
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.step_worker", factory, json.dumps(kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._reply()
        self.pid: int = ready["pid"]
        self.malloc: list[str] = ready["malloc"]

    def _reply(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=self.timeout)
            err = self._proc.stderr.read().strip()
            raise RuntimeError(
                f"step worker for {self.factory} exited (code {self._proc.returncode}):\n{err}"
            )
        return json.loads(line)

    def time(self, steps: int) -> float:
        """Wall seconds of ``steps`` steps run back to back in the worker (the last one waited
        on)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self._proc.stdin.write(f"{steps}\n")
        self._proc.stdin.flush()
        reply = self._reply()
        if reply.get("steps") != steps:
            raise RuntimeError(f"step worker ran {reply.get('steps')} steps, asked for {steps}")
        return float(reply["seconds"])

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for f in (self._proc.stdout, self._proc.stderr):
            f.close()

    def __enter__(self) -> StepWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _serve(factory: str, kwargs: dict) -> None:
    from cem_jax import xla_cpu

    malloc = xla_cpu.tune_malloc()  # before any framework starts its threads, as the programs do
    import jax  # block_until_ready only: passes a non-JAX value (a torch tensor) through

    from benchmarks import timing

    module, name = factory.split(":", 1)
    step = getattr(importlib.import_module(module), name)(**kwargs)
    jax.block_until_ready(step())
    jax.block_until_ready(step())
    print(json.dumps({"ready": True, "pid": os.getpid(), "malloc": list(malloc)}), flush=True)
    for line in sys.stdin:
        n = int(line)
        print(json.dumps({"seconds": timing.block_seconds(step, calls=n), "steps": n}), flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], json.loads(sys.argv[2]))
