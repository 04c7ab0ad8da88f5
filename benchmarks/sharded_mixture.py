"""Per-device memory of the mixture refresh and the certificate: features all-gathered (the per-class
layout, as before) against features left sharded along the samples (``method="segments"``), and the
CPU cost of the two k-means methods on one device.

    python -m benchmarks.sharded_mixture            # table
    python -m benchmarks.sharded_mixture --json     # one JSON object

Memory: the k-means + mixture statistics program (``entropy.fit_mixture``: k-means++, 50 Lloyd
iterations) and the 95 % certificate (``_diagonal_bound``) are compiled, not run, for 8 fake CPU
devices (the script re-executes itself with ``--xla_force_host_platform_device_count=8``); XLA's
``memory_analysis()`` gives each device's arguments + temporaries + outputs. "gathered" compiles the
programs for features replicated on every device (what an all-gather leaves); "sharded" for features
split in 8 along ``N``. The largest collective of each program is read from its HLO.

Time: one ``fit_mixture`` on one device (the CPU here) per method, after a warm-up compile, median
of 3: ``segments`` does ``C``× the arithmetic of ``classes``, which is why one device keeps
``classes``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time

SHAPES = [  # (N, D, C, K): CIFAR-10 at the paper's cut (8×8×8 features), and a large case
    (50_000, 512, 10, 5),
    (100_000, 2048, 200, 15),
]
_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)


def _largest_collective(hlo: str) -> int:
    largest = 0
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1)):
                largest = max(largest, math.prod(int(x) for x in dims.split(",") if x))
    return largest


def _memory(devices: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from cem_jax import entropy, kmeans

    mesh = jax.make_mesh((devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    out = []
    for n, d, c, k in SHAPES:
        row = {"N": n, "D": d, "C": c, "K": k, "devices": devices}
        m = kmeans.max_class_size(jnp.arange(n) % c, c)
        for layout, sharding in (("gathered", rep), ("sharded", rows)):
            z = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=sharding)
            y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharding)
            cents = jax.ShapeDtypeStruct((c, k, d), jnp.float32, sharding=rep)
            key = jax.random.key(0)
            if layout == "gathered":
                kmeans_args = dict(num_classes=c, k=k, iterations=50, m=m, class_batch=c)
                fit = kmeans._kmeans_jit.lower(z, y, key, None, **kmeans_args)
            else:
                fit = kmeans._segments_jit.lower(z, y, key, None, num_classes=c, k=k, iterations=50)
            cert = entropy._diagonal_bound.lower(
                z, y, cents, jnp.float32(0.1), 0.95, layout == "sharded"
            )
            for name, lowered in (("kmeans", fit), ("certificate", cert)):
                compiled = lowered.compile()
                mem = compiled.memory_analysis()
                total = (
                    mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
                )
                row[f"{name}_{layout}_MB"] = round(total / 2**20, 1)
                row[f"{name}_{layout}_largest_collective"] = _largest_collective(compiled.as_text())
        out.append(row)
    return out


def _time(n: int, d: int, c: int, k: int, iterations: int) -> dict:
    import jax
    import numpy as np

    from cem_jax import kmeans

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((n, d)).astype(np.float32))
    y = jax.device_put(rng.integers(0, c, n).astype(np.int32))
    row = {"N": n, "D": d, "C": c, "K": k, "iterations": iterations}
    for method in ("classes", "segments"):

        def run(method=method):
            r = kmeans.kmeans_per_class(
                x, y, num_classes=c, clusters_per_class=k, key=jax.random.key(0),
                iterations=iterations, method=method,
            )  # fmt: skip
            r.inertia.block_until_ready()

        run()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        row[f"{method}_s"] = round(statistics.median(times), 3)
    row["segments_over_classes"] = round(row["segments_s"] / row["classes_s"], 2)
    return row


def main() -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--time_n", type=int, default=5000, help="N for the one-device timing")
    parser.add_argument("--memory_only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_only:
        print(json.dumps(_memory(8)))
        return
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.sharded_mixture", "--memory_only"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    memory = json.loads(proc.stdout.strip().splitlines()[-1])
    timing = [_time(args.time_n, 512, 10, 5, 50)]
    result = {"memory_per_device_8_devices": memory, "one_device_time": timing}
    if args.json:
        print(json.dumps(result))
        return
    print("Per-device memory (MB) on 8 devices, features gathered vs sharded; largest collective")
    print("(elements) in brackets:")
    for r in memory:
        print(
            f"  N={r['N']:>7,} D={r['D']:>5} C={r['C']:>3} K={r['K']:>2}: "
            f"k-means {r['kmeans_gathered_MB']:>8.1f} [{r['kmeans_gathered_largest_collective']:,}]"
            f" -> {r['kmeans_sharded_MB']:>7.1f} [{r['kmeans_sharded_largest_collective']:,}];"
            f"  certificate {r['certificate_gathered_MB']:>8.1f}"
            f" [{r['certificate_gathered_largest_collective']:,}]"
            f" -> {r['certificate_sharded_MB']:>7.1f}"
            f" [{r['certificate_sharded_largest_collective']:,}]"
        )
    for r in timing:
        print(
            f"One device, N={r['N']:,} D={r['D']} C={r['C']} K={r['K']}, {r['iterations']} "
            f"iterations: classes {r['classes_s']} s, segments {r['segments_s']} s "
            f"({r['segments_over_classes']}x)"
        )


if __name__ == "__main__":
    main()
