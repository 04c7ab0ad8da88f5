"""Roofline figures for the speed benchmarks: how many floating-point operations one call of a jitted
function does, by XLA's own count, and the dense-matmul rate XLA reaches on this machine.

    python -m benchmarks.roofline                    # the matmul peak (n = 2048, median of 5)
    python -m benchmarks.roofline --n 1024 --repeats 3

    from benchmarks import roofline
    gflop = roofline.compiled_gflop(step, state, batch)    # GFLOP of one call of a jax.jit-ed step
    peak = roofline.matmul_peak_gflops()                   # GFLOP/s of a float32 n x n jnp.dot

``benchmarks.train_step`` and ``benchmarks.attack_step`` report, beside images/s, the GFLOP per
image of their compiled step, the achieved GFLOP/s (images/s x GFLOP per image) and that rate as a
percentage of :func:`matmul_peak_gflops`, measured in the same process (same XLA flags, same load).

What the count is: XLA's cost analysis (``jitted.lower(...).compile().cost_analysis()["flops"]``)
counts a convolution or a dot as 2 x its multiply-adds (a convolution's taps on its zero padding
left out), an elementwise op as its number of elements (transcendentals such as ``exp`` or
``tanh`` go to a separate count, left out here), and copies, transposes, pads and slices (an
im2col) as 0. So "achieved GFLOP/s = images/s x GFLOP per image" is a figure relative to the
ceiling, of the arithmetic the program asks for, not a hardware counter: time spent moving data
shows as a lower percentage, not as operations. Measured on the 2-core CPU (AMD EPYC, AVX-512): a
matmul peak of ~170-194 GFLOP/s from JAX (~198 from numpy's OpenBLAS).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from benchmarks import timing


def _flops(cost: Any) -> float:
    """The ``"flops"`` entry of a ``cost_analysis()`` result: a dict, or a list of one dict (older
    jax versions). XLA leaves zero entries out, so a non-empty dict without ``"flops"`` (a program
    of copies and transposes only) is 0; ``None``, an empty result or no dict at all means the
    backend has no cost model, a ``RuntimeError``."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if len(cost) == 1 else None
    if not isinstance(cost, dict) or not cost:
        raise RuntimeError(
            f"XLA's cost analysis reported no 'flops' on this backend (got {cost!r}): the GFLOP "
            "count is not available here."
        )
    return float(cost.get("flops", 0.0))


def compiled_gflop(jitted: Callable, *args: Any, **kwargs: Any) -> float:
    """GFLOP (1e9 floating-point operations) of one call ``jitted(*args, **kwargs)`` of a
    ``jax.jit``-ed function, as XLA's cost analysis of the compiled program counts them.

    Nothing runs and no argument is consumed (donated buffers stay valid); the compilation is
    XLA's cached one when the function was already called with arguments of the same shapes.
    """
    compiled = jitted.lower(*args, **kwargs).compile()
    return _flops(compiled.cost_analysis()) / 1e9


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Median GFLOP/s (2·n³ per call) of a jitted float32 ``jnp.dot`` of two n×n matrices, after a
    warm-up, blocking on each result: the dense-matmul ceiling XLA reaches on this machine."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    return 2 * n**3 / timing.median_seconds(lambda: dot(a, b), repeats=max(1, repeats)) / 1e9


def percent_of_peak(gflops: float, peak_gflops: float) -> float:
    """``gflops`` as a percentage of ``peak_gflops``."""
    return 100.0 * gflops / peak_gflops


def main() -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="matrix side")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls (median reported)")
    args = ap.parse_args()
    import jax

    import cem_jax  # noqa: F401  (its XLA:CPU flags, as the benchmarks run with)

    peak = matmul_peak_gflops(args.n, args.repeats)
    print(
        f"float32 {args.n}x{args.n} jnp.dot on {jax.device_count()} x "
        f"{jax.devices()[0].platform}: {peak:.1f} GFLOP/s (median of {args.repeats})"
    )


if __name__ == "__main__":
    main()
