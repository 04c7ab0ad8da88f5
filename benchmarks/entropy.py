"""Benchmark of cem_jax.entropy: the per-step CEM loss and the per-epoch mixture fit.

    python -m benchmarks.entropy            # table
    python -m benchmarks.entropy --json     # one JSON object
    python -m benchmarks.entropy --quick    # smaller fit_mixture sizes (CPU smoke run)

``cem_loss``: value-and-grad wall time (jitted, after warm-up, median of repeats) at B = 128 for several
(C, K, D), next to a per-class comparison (a ``vmap`` over all C classes, as the reference's loop over
classes: its cost grows with C). The ratio C=200 / C=10 at K=5, D=512 should stay ≤ 2×.
``fit_mixture``: wall time of one call (k-means + statistics; after a warm-up compile) for
N=50,000, D=512, C=10, K=5, 50 iterations (target < 2 s on an accelerator) and N=100,000, D=2,048,
C=200, K=15 (iterations configurable: 50 is minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from cem_jax import entropy

LOSS_SHAPES = [(10, 5, 512), (100, 5, 512), (200, 5, 512), (200, 15, 2048)]
BATCH = 128


def _per_class_loss(z, labels, state, sigma, kappa=10.0, max_blend=0.99):
    """GMM-mode CEM loss with per-class ``[C, K, D]`` statistics: the reference's structure.

    Every class's centroids are compared with every sample and the group sums are ``[C, K, D]``
    arrays, so the cost grows linearly with C (as the reference's loop over the classes present).
    """
    sg = jax.lax.stop_gradient
    num_classes, k, _ = state.centroids.shape
    cents = state.centroids
    member = jax.nn.one_hot(labels, num_classes, dtype=z.dtype).T  # [C, B]
    zs = sg(z)
    dist = jnp.sum(cents**2, -1)[:, None, :] - 2 * jnp.einsum("bd,ckd->cbk", zs, cents)  # [C, B, K]
    onehot = jax.nn.one_hot(jnp.argmin(dist, axis=-1), k, dtype=z.dtype) * member[..., None]
    n = jnp.sum(onehot, axis=1)  # [C, K]
    sum_z = jnp.einsum("cbk,bd->ckd", onehot, z)
    sum_z2 = jnp.einsum("cbk,bd->ckd", onehot, z * z)
    sq = sum_z2 - 2 * cents * sum_z + n[..., None] * cents**2  # Σ (z − c)² per group
    v_b = sq / jnp.maximum(n, 1.0)[..., None]
    pi, n_class = state.weights, state.counts.astype(z.dtype)[:, None]
    valid = (n > 0) & (pi > 0) & (n_class > 0)
    mu = jnp.minimum(kappa * n / jnp.where(valid, pi * n_class, 1.0), max_blend)[..., None]
    v = mu * v_b + (1 - mu) * state.variances
    term = jnp.where(valid, pi * 0.5 * jnp.mean(jnp.log1p(v / sigma**2), axis=-1), 0.0)
    return jnp.sum(term) / jnp.sum(jnp.any(member > 0, axis=1))


def _random_state(rng, c, k, d):
    return entropy.MixtureState(
        centroids=jnp.asarray(rng.uniform(size=(c, k, d)), jnp.float32),
        weights=jnp.asarray(rng.dirichlet(np.ones(k), size=c), jnp.float32),
        variances=jnp.asarray(rng.uniform(0.01, 0.05, size=(c, k, d)), jnp.float32),
        counts=jnp.full((c,), 50_000 // c, jnp.int32),
    )


def _median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_loss(repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for c, k, d in LOSS_SHAPES:
        state = _random_state(rng, c, k, d)
        z = jnp.asarray(rng.uniform(size=(BATCH, d)), jnp.float32)
        labels = jnp.asarray(rng.integers(0, c, size=BATCH), jnp.int32)
        ours = jax.jit(jax.value_and_grad(lambda f, y, s: entropy.cem_loss(f, y, s, sigma=0.1)))
        per_class = jax.jit(jax.value_and_grad(lambda f, y, s: _per_class_loss(f, y, s, 0.1)))
        a, b = ours(z, labels, state)[0], per_class(z, labels, state)[0]
        np.testing.assert_allclose(float(a), float(b), rtol=1e-4)  # same quantity
        rows.append(
            {
                "C": c,
                "K": k,
                "D": d,
                "B": BATCH,
                "cem_loss_ms": 1e3 * _median_time(ours, z, labels, state, repeats=repeats),
                "per_class_ms": 1e3 * _median_time(per_class, z, labels, state, repeats=repeats),
            }
        )
    return rows


def bench_fit(n, d, c, k, iterations) -> dict:
    rng = np.random.default_rng(1)
    labels = jnp.asarray(np.arange(n) % c, jnp.int32)
    feats = jax.random.uniform(jax.random.key(0), (n, d))
    kw = dict(num_classes=c, clusters_per_class=k, iterations=iterations)
    t0 = time.perf_counter()
    state = entropy.fit_mixture(feats, labels, key=jax.random.key(1), **kw)
    jax.block_until_ready(state)
    first = time.perf_counter() - t0  # includes compilation
    feats = feats + jnp.asarray(rng.normal(size=(1, d)) * 0.01, jnp.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(entropy.fit_mixture(feats, labels, key=jax.random.key(2), **kw))
    second = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(entropy.leakage_upper_bound(feats, labels, state, sigma=0.1))
    diag = time.perf_counter() - t0
    full = None
    if d <= 512:  # one Cholesky per cluster; the D = 2048 case is minutes on a small CPU
        t0 = time.perf_counter()
        jax.block_until_ready(
            entropy.leakage_upper_bound(feats, labels, state, sigma=0.1, covariance="full")
        )
        full = time.perf_counter() - t0
    return {
        "N": n,
        "D": d,
        "C": c,
        "K": k,
        "iterations": iterations,
        "fit_first_s": first,
        "fit_s": second,
        "leakage_diag_first_s": diag,
        "leakage_full_first_s": full,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smaller fit_mixture sizes")
    parser.add_argument(
        "--large-iterations",
        type=int,
        default=None,
        help="iterations of the large fit (default 50 on an accelerator, 5 on CPU)",
    )
    args = parser.parse_args()
    backend = jax.default_backend()
    large_iters = args.large_iterations or (50 if backend != "cpu" else 5)
    loss_rows = bench_loss(args.repeats)
    by_shape = {(r["C"], r["K"], r["D"]): r for r in loss_rows}
    ratio = by_shape[(200, 5, 512)]["cem_loss_ms"] / by_shape[(10, 5, 512)]["cem_loss_ms"]
    ratio_ref = by_shape[(200, 5, 512)]["per_class_ms"] / by_shape[(10, 5, 512)]["per_class_ms"]
    if args.quick:
        fit_rows = [bench_fit(10_000, 512, 10, 5, 50)]
    else:
        fit_rows = [
            bench_fit(50_000, 512, 10, 5, 50),
            bench_fit(100_000, 2048, 200, 15, large_iters),
        ]
    result = {
        "backend": backend,
        "devices": [str(x) for x in jax.devices()],
        "cem_loss": loss_rows,
        "ratio_C200_over_C10": ratio,
        "ratio_C200_over_C10_per_class": ratio_ref,
        "fit_mixture": fit_rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"backend: {backend}  ({len(jax.devices())} device(s))")
    print(f"\ncem_loss value+grad, B={BATCH}, jitted, median of {args.repeats}")
    print(f"{'C':>5} {'K':>3} {'D':>5} {'ours ms':>9} {'per-class ms':>13}")
    for r in loss_rows:
        print(
            f"{r['C']:>5} {r['K']:>3} {r['D']:>5} {r['cem_loss_ms']:>9.3f} {r['per_class_ms']:>13.3f}"
        )
    print(
        f"ratio C=200/C=10 (K=5, D=512): ours {ratio:.2f}x (target <= 2x), per-class {ratio_ref:.2f}x"
    )
    print("\nfit_mixture (k-means + statistics): first call (compiles), then one timed call;")
    print("leakage_upper_bound: first call (includes compilation)")
    print(
        f"{'N':>7} {'D':>5} {'C':>4} {'K':>3} {'iters':>5} {'first s':>8} {'fit s':>7} {'leak diag s':>11} {'leak full s':>11}"
    )
    for r in fit_rows:
        print(
            f"{r['N']:>7} {r['D']:>5} {r['C']:>4} {r['K']:>3} {r['iterations']:>5} "
            f"{r['fit_first_s']:>8.2f} {r['fit_s']:>7.2f} {r['leakage_diag_first_s']:>11.2f} "
            + (f"{r['leakage_full_first_s']:>11.2f}" if r["leakage_full_first_s"] else f"{'-':>11}")
        )


if __name__ == "__main__":
    main()
