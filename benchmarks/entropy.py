"""Benchmark of cem_jax.entropy: the per-step CEM loss and the per-epoch mixture fit.

    python -m benchmarks.entropy            # table
    python -m benchmarks.entropy --json     # one JSON object
    python -m benchmarks.entropy --quick    # smaller fit_mixture sizes (CPU smoke run)
    python -m benchmarks.entropy --fit      # only fit_mixture (N=50,000, D=512, C=10, K=5)

``cem_loss``: value-and-grad wall time (jitted, after warm-up, median of repeats) at B = 128 for several
(C, K, D), next to a per-class comparison (a ``vmap`` over all C classes, as the reference's loop over
classes: its cost grows with C). The ratio C=200 / C=10 at K=5, D=512 should stay ≤ 2×.
``fit_mixture``: as the training loop calls it once per epoch (``cem_jax.train.refresh_mixture``) on
features shaped like a trained client's (values in [0, 1], overlapping clusters in each class): the
first call (k-means++, including every compilation: target well under the epoch), then warm starts from
the previous epoch's state on features that moved a little (``--drift``, the per-value standard
deviation of the change), median of ``--fit-repeats`` epochs: the steady state, target ≤ 1 s at
N=50,000, D=512 (the paper's 8×8×8 features), C=10, K=5, 50 Lloyd iterations (the paper preset;
the loop stops once the assignment is stable: ~20 steps here). Also a compiled k-means++ call on the
same features and on unstructured (uniform) ones, where Lloyd does not settle within 50 steps (the
worst case: every step runs), and the first call of the leakage bounds; and N=100,000, D=2,048,
C=200, K=15 (iterations configurable: 50 is minutes on a 2-core CPU). Prints
``fit_mixture 50000x512: X s (steady), Y s (first call incl. compile)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
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
                "cem_loss_ms": 1e3 * timing.median_seconds(ours, z, labels, state, repeats=repeats),
                "per_class_ms": 1e3
                * timing.median_seconds(per_class, z, labels, state, repeats=repeats),
            }
        )
    return rows


def _client_like_features(rng, n, d, c, centres_per_class=8, spread=0.2):
    """``[N, D]`` float32 in [0, 1] (a sigmoid output, as the paper's cut) around a few overlapping
    centres per class, and labels ``[N]``. The clusters overlap enough that a warm start on features
    moved by 0.02 takes ~20 Lloyd steps to settle (well-separated ones settle in one)."""
    labels = rng.integers(0, c, n).astype(np.int32)
    centres = rng.uniform(0.45, 0.55, (c, centres_per_class, d))
    z = centres[labels, rng.integers(0, centres_per_class, n)] + spread * rng.normal(size=(n, d))
    return np.clip(z, 0, 1).astype(np.float32), labels


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kwargs))
    return out, time.perf_counter() - t0


def bench_fit(n, d, c, k, iterations, repeats=5, drift=0.02) -> dict:
    rng = np.random.default_rng(1)
    z, labels_np = _client_like_features(rng, n, d, c)
    labels = jnp.asarray(labels_np)
    kw = dict(num_classes=c, clusters_per_class=k, iterations=iterations)
    feats = jnp.asarray(z)
    # Epoch 1: k-means++ (compiles the seeding, the Lloyd steps and the statistics).
    state, first = _timed(entropy.fit_mixture, feats, labels, key=jax.random.key(1), **kw)
    warm = []
    for _ in range(repeats + 1):  # later epochs: warm starts on features that moved a little
        z = np.clip(z + drift * rng.normal(size=z.shape), 0, 1).astype(np.float32)
        feats = jnp.asarray(z)
        state, seconds = _timed(entropy.fit_mixture, feats, labels, key=None, previous=state, **kw)
        warm.append(seconds)
    kpp = [
        _timed(entropy.fit_mixture, feats, labels, key=jax.random.key(2 + i), **kw)[1]
        for i in range(max(1, repeats // 2))
    ]
    noise = jnp.asarray(rng.uniform(size=(n, d)), jnp.float32)
    kpp_noise = [
        _timed(entropy.fit_mixture, noise, labels, key=jax.random.key(9 + i), **kw)[1]
        for i in range(max(1, repeats // 2))
    ]
    _, diag = _timed(entropy.leakage_upper_bound, feats, labels, state, sigma=0.1)
    full = full_error = None
    if d <= 512:  # one Cholesky per cluster; the D = 2048 case is minutes on a small CPU
        try:
            _, full = _timed(
                entropy.leakage_upper_bound, feats, labels, state, sigma=0.1, covariance="full"
            )
        except jax.errors.JaxRuntimeError as e:  # reported, so that the fit timings still print
            full_error = str(e).splitlines()[0]
    return {
        "N": n,
        "D": d,
        "C": c,
        "K": k,
        "iterations": iterations,
        "drift": drift,
        "fit_first_s": first,
        "fit_first_warm_s": warm[0],
        "fit_s": statistics.median(warm[1:]),
        "fit_kmeanspp_s": statistics.median(kpp),
        "fit_kmeanspp_uniform_s": statistics.median(kpp_noise),
        "leakage_diag_first_s": diag,
        "leakage_full_first_s": full,
        "leakage_full_error": full_error,
    }


def fit_line(r: dict) -> str:
    return (
        f"fit_mixture {r['N']}x{r['D']}: {r['fit_s']:.3f} s (steady), "
        f"{r['fit_first_s']:.2f} s (first call incl. compile)"
    )


def main() -> None:
    from cem_jax import xla_cpu

    xla_cpu.tune_malloc()  # as the cem-* programs run (cem_jax.xla_cpu; CEM_JAX_MALLOC=0: off)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smaller fit_mixture sizes")
    parser.add_argument(
        "--fit", action="store_true", help="only fit_mixture at N=50,000, D=512, C=10, K=5"
    )
    parser.add_argument(
        "--fit-repeats", type=int, default=5, help="warm-started epochs timed (the median)"
    )
    parser.add_argument(
        "--drift", type=float, default=0.02, help="per-value std of the features' change per epoch"
    )
    parser.add_argument(
        "--large-iterations",
        type=int,
        default=None,
        help="iterations of the large fit (default 50 on an accelerator, 5 on CPU)",
    )
    args = parser.parse_args()
    backend = jax.default_backend()
    large_iters = args.large_iterations or (50 if backend != "cpu" else 5)
    fit = dict(repeats=args.fit_repeats, drift=args.drift)
    loss_rows, ratio, ratio_ref = [], None, None
    if not args.fit:
        loss_rows = bench_loss(args.repeats)
        by_shape = {(r["C"], r["K"], r["D"]): r for r in loss_rows}
        ratio = by_shape[(200, 5, 512)]["cem_loss_ms"] / by_shape[(10, 5, 512)]["cem_loss_ms"]
        ratio_ref = by_shape[(200, 5, 512)]["per_class_ms"] / by_shape[(10, 5, 512)]["per_class_ms"]
    if args.quick:
        fit_rows = [bench_fit(10_000, 512, 10, 5, 50, **fit)]
    elif args.fit:
        fit_rows = [bench_fit(50_000, 512, 10, 5, 50, **fit)]
    else:
        fit_rows = [
            bench_fit(50_000, 512, 10, 5, 50, **fit),
            bench_fit(100_000, 2048, 200, 15, large_iters, **fit),
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
    if loss_rows:
        print(f"\ncem_loss value+grad, B={BATCH}, jitted, median of {args.repeats}")
        print(f"{'C':>5} {'K':>3} {'D':>5} {'ours ms':>9} {'per-class ms':>13}")
        for r in loss_rows:
            print(
                f"{r['C']:>5} {r['K']:>3} {r['D']:>5} {r['cem_loss_ms']:>9.3f} "
                f"{r['per_class_ms']:>13.3f}"
            )
        print(
            f"ratio C=200/C=10 (K=5, D=512): ours {ratio:.2f}x (target <= 2x), "
            f"per-class {ratio_ref:.2f}x"
        )
    print(
        "\nfit_mixture (k-means + statistics), seconds: first call (k-means++, incl. compilation), "
        "first warm start,\nsteady state (warm start on the moved features, median of "
        f"{args.fit_repeats} epochs, drift {args.drift}), a compiled k-means++ call on the same "
        "features\nand on uniform noise; leakage_upper_bound: first call (incl. compilation)"
    )
    print(
        f"{'N':>7} {'D':>5} {'C':>4} {'K':>3} {'iters':>5} {'first':>6} {'1st warm':>8} "
        f"{'steady':>7} {'k-means++':>9} {'on noise':>8} {'leak diag':>9} {'leak full':>9}"
    )
    for r in fit_rows:
        full = r["leakage_full_first_s"]
        print(
            f"{r['N']:>7} {r['D']:>5} {r['C']:>4} {r['K']:>3} {r['iterations']:>5} "
            f"{r['fit_first_s']:>6.2f} {r['fit_first_warm_s']:>8.3f} {r['fit_s']:>7.3f} "
            f"{r['fit_kmeanspp_s']:>9.3f} {r['fit_kmeanspp_uniform_s']:>8.3f} "
            f"{r['leakage_diag_first_s']:>9.2f} "
            + (f"{full:>9.2f}" if full else f"{'error' if r['leakage_full_error'] else '-':>9}")
        )
    for r in fit_rows:
        if r["leakage_full_error"]:
            print(f"leakage_upper_bound(covariance='full') failed: {r['leakage_full_error']}")
    for r in fit_rows:
        print(fit_line(r))
        print(
            "  slow case (k-means++ on uniform noise: Lloyd does not settle in "
            f"{r['iterations']} steps): {r['fit_kmeanspp_uniform_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
