"""The one timing helper of the benchmark scripts: the median wall time of a jax call.

    from benchmarks import timing
    seconds = timing.median_seconds(step, x, repeats=5)             # one call of step(x) per round
    per_step = timing.median_seconds(step, x, repeats=3, calls=10)  # the mean of 10 calls per round

Each round times ``calls`` calls of ``fn(*args)`` back to back and blocks on the last one's output
(XLA runs a jitted call asynchronously, so an unblocked call times only its dispatch); the figure is
the median over ``repeats`` rounds of the round's time divided by ``calls``. One untimed call first
compiles and warms up ``fn`` unless ``warmup=False`` (for a caller that already ran it, or whose call
changes state that the warm-up should not advance).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(
    fn: Callable[..., Any], *args: Any, repeats: int, calls: int = 1, warmup: bool = True
) -> float:
    """Median seconds per call of ``fn(*args)`` over ``repeats`` rounds of ``calls`` calls each."""
    import jax

    if repeats < 1 or calls < 1:
        raise ValueError(f"repeats and calls must be >= 1, got repeats={repeats}, calls={calls}")
    if warmup:
        jax.block_until_ready(fn(*args))
    return statistics.median(block_seconds(fn, *args, calls=calls) / calls for _ in range(repeats))


def block_seconds(fn: Callable[..., Any], *args: Any, calls: int) -> float:
    """Wall seconds of ``calls`` calls of ``fn(*args)`` back to back, the last one's output waited
    on (``jax.block_until_ready``, which passes a non-JAX value such as a torch tensor through)."""
    import jax

    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - t0
