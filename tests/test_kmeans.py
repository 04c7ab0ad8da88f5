"""Tests for cem_jax.kmeans: against NumPy references written with explicit loops, and closed forms."""

import json
import os
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from cem_jax import kmeans
from cem_jax.kmeans import group_by_class, kmeans_per_class, max_class_size
from tests.devices import fake_devices_env

METHODS = ("classes", "segments")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _np_assign(x, centroids):
    """Nearest centroid by explicit loops, ties → lowest id; float64."""
    assign = np.zeros(len(x), np.int64)
    d2 = np.zeros(len(x))
    for i, xi in enumerate(x):
        best, best_d = 0, np.inf
        for j, cj in enumerate(centroids):
            d = float(np.sum((xi - cj) ** 2))
            if d < best_d:
                best, best_d = j, d
        assign[i], d2[i] = best, best_d
    return assign, d2


def _np_lloyd(x, labels, init, iterations):
    """Independent per-class Lloyd reference; empty clusters keep their centroid."""
    x = np.asarray(x, np.float64)
    centroids = np.array(init, np.float64)
    assignments = np.zeros(len(x), np.int64)
    inertia = 0.0
    for c in range(centroids.shape[0]):
        members = np.flatnonzero(labels == c)
        xc = x[members]
        for _ in range(iterations):
            assign, _ = _np_assign(xc, centroids[c])
            for j in range(centroids.shape[1]):
                if np.any(assign == j):
                    centroids[c, j] = xc[assign == j].mean(axis=0)
        assign, d2 = _np_assign(xc, centroids[c])
        assignments[members] = assign
        inertia += d2.sum()
    return centroids, assignments, inertia


def _same_partition(a, b):
    """True if the integer labelings a and b define the same partition (contingency is a permutation)."""
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    table = np.zeros((len(ua), len(ub)), np.int64)
    np.add.at(table, (ia, ib), 1)
    return (
        len(ua) == len(ub)
        and np.all((table > 0).sum(axis=0) == 1)
        and np.all((table > 0).sum(axis=1) == 1)
    )


def test_group_by_class_matches_numpy():
    rng = np.random.default_rng(0)
    num_classes, m = 5, 40
    labels = rng.choice([0, 1, 3, 4], size=97, p=[0.4, 0.1, 0.3, 0.2])  # class 2 empty
    layout = jax.jit(group_by_class, static_argnums=(1, 2))(jnp.asarray(labels), num_classes, m)
    index, mask = np.asarray(layout.index), np.asarray(layout.mask)
    assert index.shape == mask.shape == (num_classes, m)
    assert index.dtype == np.int32 and mask.dtype == np.bool_
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        expected_index = np.zeros(m, np.int64)
        expected_index[: len(members)] = members
        np.testing.assert_array_equal(index[c], expected_index)
        np.testing.assert_array_equal(mask[c], np.arange(m) < len(members))


def test_max_class_size_rounding():
    assert max_class_size(jnp.array([0, 0, 1]), 2) == 64
    assert max_class_size(jnp.array([1] * 64 + [0]), 2) == 64
    assert max_class_size(jnp.array([1] * 65 + [0]), 2) == 128
    assert max_class_size(np.array([2] * 21), 3, multiple=10) == 30
    assert max_class_size(np.array([2] * 20), 3, multiple=10) == 20


@pytest.mark.parametrize("method", METHODS)
def test_planted_clusters_recovered(method):
    rng = np.random.default_rng(1)
    num_classes, k, d = 3, 3, 4
    class_sizes = [[50, 10, 60], [5, 30, 8], [40, 40, 1]]  # uneven classes and clusters
    xs, ys, truth = [], [], []
    for c, sizes in enumerate(class_sizes):
        centers = rng.uniform(-100, 100, size=(k, d))
        for j, size in enumerate(sizes):
            xs.append(centers[j] + 0.1 * rng.standard_normal((size, d)))
            ys += [c] * size
            truth += [j] * size
    perm = rng.permutation(len(ys))
    x = np.concatenate(xs).astype(np.float32)[perm]
    y, truth = np.array(ys)[perm], np.array(truth)[perm]

    r = kmeans_per_class(
        x,
        y,
        num_classes=num_classes,
        clusters_per_class=k,
        key=jax.random.key(3),
        iterations=10,
        method=method,
    )
    assignments = np.asarray(r.assignments)
    expected_inertia = 0.0
    for c in range(num_classes):
        members = y == c
        assert _same_partition(truth[members], assignments[members])
        for j in range(k):
            group = x[members & (truth == j)]
            cluster = assignments[members & (truth == j)][0]
            np.testing.assert_allclose(r.centroids[c, cluster], group.mean(0), atol=1e-4)
            assert int(r.cluster_sizes[c, cluster]) == len(group)
            expected_inertia += np.sum((group.astype(np.float64) - group.mean(0)) ** 2)
    np.testing.assert_allclose(float(r.inertia), expected_inertia, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_lloyd_matches_numpy_reference_from_same_init(method):
    rng = np.random.default_rng(2)
    num_classes, k, d = 3, 4, 3
    y = rng.choice(num_classes, size=300, p=[0.6, 0.3, 0.1])
    x = rng.standard_normal((300, d)).astype(np.float32)  # no cluster structure
    init = np.stack([x[rng.choice(np.flatnonzero(y == c), k, replace=False)] for c in range(3)])
    init[1, 2] = 50.0  # a centroid no member is nearest to: an empty cluster
    iterations = 8
    ref_centroids, ref_assign, ref_inertia = _np_lloyd(x, y, init, iterations)
    r = kmeans_per_class(
        x,
        y,
        num_classes=num_classes,
        clusters_per_class=k,
        key=None,
        init_centroids=init,
        iterations=iterations,
        method=method,
    )
    np.testing.assert_array_equal(np.asarray(r.assignments), ref_assign)
    np.testing.assert_allclose(np.asarray(r.centroids), ref_centroids, atol=1e-5)
    assert float(r.inertia) <= ref_inertia * (1 + 1e-5)
    np.testing.assert_allclose(float(r.inertia), ref_inertia, rtol=1e-5)
    expected_sizes = [[np.sum((y == c) & (ref_assign == j)) for j in range(k)] for c in range(3)]
    np.testing.assert_array_equal(np.asarray(r.cluster_sizes), expected_sizes)
    assert int(r.cluster_sizes[1, 2]) == 0
    np.testing.assert_array_equal(np.asarray(r.centroids[1, 2]), [50.0] * d)


def _np_kmeans(x, labels, init, iterations):
    """Plain NumPy k-means (float64, vectorised, every one of ``iterations`` Lloyd steps, no early
    stop): centroids, assignments, cluster sizes and per-dimension variances around the centroids."""
    x = np.asarray(x, np.float64)
    centroids = np.array(init, np.float64)
    num_classes, k, d = centroids.shape
    assignments = np.zeros(len(x), np.int64)
    sizes = np.zeros((num_classes, k), np.int64)
    variances = np.zeros((num_classes, k, d))
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        xc, cent = x[members], centroids[c]
        for _ in range(iterations + 1):  # the last pass only assigns
            assign = np.argmin(((xc[:, None, :] - cent[None]) ** 2).sum(-1), axis=1)
            if _ == iterations:
                break
            for j in range(k):
                if np.any(assign == j):
                    cent[j] = xc[assign == j].mean(axis=0)
        assignments[members] = assign
        for j in range(k):
            group = xc[assign == j]
            sizes[c, j] = len(group)
            if len(group):
                variances[c, j] = ((group - cent[j]) ** 2).mean(axis=0)
    return centroids, assignments, sizes, variances


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("k", [3, 5])  # K = 5: the distance matmul pads the centroids to 8 rows
def test_fast_path_matches_plain_numpy_kmeans(method, k):
    # Blobs that k-means settles on within the iterations: the loop stops early at the fixed point,
    # and the result is that of all `iterations` NumPy steps (same initial centroids).
    rng = np.random.default_rng(14)
    num_classes, d, iterations = 3, 16, 60
    y = rng.integers(0, num_classes, 900)
    centres = rng.normal(size=(num_classes, 7, d)) * 3.0
    x = (centres[y, rng.integers(0, 7, 900)] + rng.normal(size=(900, d))).astype(np.float32)
    init = np.stack([x[rng.choice(np.flatnonzero(y == c), k, replace=False)] for c in range(3)])
    init[2, 0] = 100.0  # a centroid no member is nearest to: an empty cluster, kept
    ref_centroids, ref_assign, ref_sizes, ref_var = _np_kmeans(x, y, init, iterations)
    r = kmeans_per_class(
        x, y, num_classes=num_classes, clusters_per_class=k, key=None, init_centroids=init,
        iterations=iterations, method=method,
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(r.assignments), ref_assign)
    np.testing.assert_array_equal(np.asarray(r.cluster_sizes), ref_sizes)
    np.testing.assert_allclose(np.asarray(r.centroids), ref_centroids, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(r.centroids[2, 0]), [100.0] * d)
    np.testing.assert_allclose(np.asarray(r.variances), ref_var, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(r.variances[2, 0]) == 0)
    ref_inertia = float(np.sum(ref_var * ref_sizes[..., None]))
    np.testing.assert_allclose(float(r.inertia), ref_inertia, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_lloyd_stops_at_the_fixed_point(method):
    # 10^9 Lloyd steps would take days: the loop ends once an assignment repeats, with the
    # result of the full count (the same as 200 steps, long after convergence).
    rng = np.random.default_rng(15)
    x = rng.standard_normal((300, 4)).astype(np.float32)
    y = rng.integers(0, 3, 300)
    init = np.stack([x[np.flatnonzero(y == c)[:4]] for c in range(3)])
    common = dict(num_classes=3, clusters_per_class=4, key=None, init_centroids=init, method=method)
    settled = kmeans_per_class(x, y, iterations=200, **common)
    start = time.perf_counter()
    many = kmeans_per_class(x, y, iterations=10**9, **common)
    jax.block_until_ready(many)
    assert time.perf_counter() - start < 60
    for a, b in zip(settled, many):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_from_converged_state_does_not_move(method):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((400, 5)).astype(np.float32)
    y = rng.integers(0, 4, 400)
    common = dict(num_classes=4, clusters_per_class=6, method=method)
    r = kmeans_per_class(x, y, key=jax.random.key(0), iterations=100, **common)
    again = kmeans_per_class(x, y, key=None, init_centroids=r.centroids, iterations=5, **common)
    np.testing.assert_allclose(np.asarray(again.centroids), np.asarray(r.centroids), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(again.assignments), np.asarray(r.assignments))
    np.testing.assert_array_equal(np.asarray(again.cluster_sizes), np.asarray(r.cluster_sizes))


@pytest.mark.parametrize("method", METHODS)
def test_kmeanspp_seeding_is_proportional_to_squared_distance(method):
    # Many independent 1-D classes {0, 1, 3}, K = 2, no Lloyd step: centroids = (first, second) seed.
    points = np.array([0.0, 1.0, 3.0])
    num_classes = 3000
    x = np.tile(points, num_classes)[:, None].astype(np.float32)
    y = np.repeat(np.arange(num_classes), 3)
    r = kmeans_per_class(
        x,
        y,
        num_classes=num_classes,
        clusters_per_class=2,
        key=jax.random.key(7),
        iterations=0,
        max_class_size=3,
        method=method,
    )
    seeds = np.asarray(r.centroids[:, :, 0])
    pairs = [(a, b) for a in range(3) for b in range(3) if a != b]
    observed = [np.sum((seeds[:, 0] == points[a]) & (seeds[:, 1] == points[b])) for a, b in pairs]
    assert sum(observed) == num_classes

    def expected(power):
        probs = []
        for a, b in pairs:
            w = np.abs(points - points[a]) ** power
            probs.append(w[b] / w.sum() / 3)
        return np.array(probs) * num_classes

    assert stats.chisquare(observed, expected(2)).pvalue > 1e-3
    assert stats.chisquare(observed, expected(1)).pvalue < 1e-6  # the test can tell ∝ d from ∝ d²


@pytest.mark.parametrize("method", METHODS)
def test_seeding_duplicates_fall_back_to_uniform(method):
    # 3 identical members, K = 3: every seed is that point; ties → cluster 0 takes all members.
    x = np.array([[2.0, -1.0]] * 3 + [[0.0, 0.0], [5.0, 5.0]], np.float32)
    y = np.array([0, 0, 0, 1, 1])
    r = kmeans_per_class(
        x, y, num_classes=2, clusters_per_class=3, key=jax.random.key(1), method=method
    )
    np.testing.assert_allclose(np.asarray(r.centroids[0]), [[2.0, -1.0]] * 3, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.cluster_sizes[0]), [3, 0, 0])
    np.testing.assert_array_equal(np.asarray(r.assignments[:3]), [0, 0, 0])
    assert sorted(np.asarray(r.cluster_sizes[1]).tolist()) == [0, 1, 1]


@pytest.mark.parametrize("method", METHODS)
def test_small_and_empty_classes(method):
    rng = np.random.default_rng(5)
    d, k = 3, 3
    counts = [1, 0, 2, 7]  # class 1 is empty, classes 0 and 2 have fewer than K members
    y = np.repeat(np.arange(4), counts)
    x = rng.standard_normal((len(y), d)).astype(np.float32)
    common = dict(num_classes=4, clusters_per_class=k, iterations=5, method=method)
    r = kmeans_per_class(x, y, key=jax.random.key(2), **common)
    assert np.all(np.isfinite(np.asarray(r.centroids)))
    np.testing.assert_array_equal(np.asarray(r.cluster_sizes).sum(1), counts)
    np.testing.assert_array_equal(np.asarray(r.centroids[1]), np.zeros((k, d)))
    np.testing.assert_allclose(np.asarray(r.centroids[0]), np.repeat(x[:1], k, axis=0), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.cluster_sizes[0]), [1, 0, 0])
    assert np.all(np.asarray(r.assignments) < k)

    # Warm start: centroids nobody is nearest to, and the empty class, keep their values.
    init = np.array(r.centroids)
    init[3, 1] = 1e3
    init[1] = rng.standard_normal((k, d))
    w = kmeans_per_class(x, y, key=None, init_centroids=init, **common)
    assert int(w.cluster_sizes[3, 1]) == 0
    np.testing.assert_array_equal(np.asarray(w.centroids[3, 1]), init[3, 1])
    np.testing.assert_array_equal(np.asarray(w.centroids[1]), init[1].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(w.cluster_sizes).sum(1), counts)
    ref_centroids, ref_assign, _ = _np_lloyd(x, y, init, 5)
    np.testing.assert_allclose(np.asarray(w.centroids), ref_centroids, atol=1e-5)
    # A cluster of one member sits at its member up to rounding (the mean is taken on class-centred
    # data), as does a duplicate seed: such near-ties may go either way; every other sample agrees.
    for i, (got, want) in enumerate(zip(np.asarray(w.assignments), ref_assign)):
        d2 = np.sum((ref_centroids[y[i]] - x[i]) ** 2, axis=-1)
        assert got == want or d2[got] <= d2[want] + 1e-10, (i, got, want, d2)


def test_runs_under_jit_with_explicit_max_class_size():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((50, 2)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    init = np.stack([x[np.flatnonzero(y == c)[:2]] for c in range(3)])
    f = jax.jit(
        lambda x, y: kmeans_per_class(
            x, y, num_classes=3, clusters_per_class=2, key=None, init_centroids=init,
            iterations=4, max_class_size=64,
        )
    )  # fmt: skip
    r = f(x, y)
    _, ref_assign, ref_inertia = _np_lloyd(x, y, init, 4)
    np.testing.assert_array_equal(np.asarray(r.assignments), ref_assign)
    np.testing.assert_allclose(float(r.inertia), ref_inertia, rtol=1e-5)
    with pytest.raises(ValueError, match="max_class_size=None needs concrete labels"):
        jax.jit(
            lambda x, y: kmeans_per_class(x, y, num_classes=3, clusters_per_class=2, key=None,
                                          init_centroids=init)
        )(x, y)  # fmt: skip


def test_compiles_once_for_equal_shapes(monkeypatch):
    counted = chex.assert_max_traces(kmeans._kmeans_impl, n=1)
    static = ("num_classes", "k", "iterations", "m", "class_batch")
    monkeypatch.setattr(kmeans, "_kmeans_jit", jax.jit(counted, static_argnames=static))
    rng = np.random.default_rng(8)
    for seed in range(3):
        x = rng.standard_normal((120, 3)).astype(np.float32)
        y = rng.integers(0, 4, 120)  # different labels, same rounded class size (64)
        r = kmeans_per_class(
            x, y, num_classes=4, clusters_per_class=2, key=jax.random.key(seed), iterations=3
        )
        np.testing.assert_array_equal(np.asarray(r.cluster_sizes).sum(1), np.bincount(y, None, 4))
    chex.clear_trace_counter()


_X = np.zeros((6, 2), np.float32)
_Y = np.array([0, 0, 1, 1, 2, 2])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(features=np.zeros(6, np.float32)), "features has shape"),
        (dict(labels=np.zeros((6, 1), np.int32)), "labels has shape"),
        (dict(labels=np.zeros(5, np.int32)), "labels has shape"),
        (dict(labels=np.zeros(6, np.float32)), "labels has dtype"),
        (dict(labels=np.array([0, 0, 1, 1, 2, 3])), r"labels range over \[0, 3\]"),
        (
            dict(labels=np.array([0, -2, 1, 1, 2, 2])),
            r"labels range over \[-2, 2\].*-1 for a padding",
        ),
        (dict(method="lloyd"), "method='lloyd'"),
        (dict(num_classes=0), "num_classes=0"),
        (dict(clusters_per_class=0), "clusters_per_class=0"),
        (dict(iterations=-1), "iterations=-1"),
        (dict(init_centroids=np.zeros((3, 2, 3))), r"init_centroids has shape \(3, 2, 3\)"),
        (dict(init_centroids=np.zeros((2, 2, 2))), r"init_centroids has shape \(2, 2, 2\)"),
        (dict(key=None), "key=None"),
        (dict(max_class_size=1), "max_class_size=1"),
        (dict(max_class_size=0), "max_class_size=0"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(
        features=_X,
        labels=_Y,
        num_classes=3,
        clusters_per_class=2,
        key=jax.random.key(0),
        iterations=2,
    )
    args.update(kwargs)
    features, labels = args.pop("features"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        kmeans_per_class(features, labels, **args)


def test_max_class_size_rejects_traced_labels():
    with pytest.raises(ValueError, match="labels is a traced array"):
        jax.jit(lambda y: max_class_size(y, 3))(jnp.array(_Y))


def test_class_chunking_does_not_change_the_result(monkeypatch):
    # CPU processes classes a few at a time (lax.map batch_size); force chunks of 2 of 3 classes.
    rng = np.random.default_rng(9)
    x = rng.standard_normal((90, 4)).astype(np.float32)
    y = rng.integers(0, 3, 90)
    common = dict(num_classes=3, clusters_per_class=3, key=jax.random.key(5), iterations=6)
    full = kmeans_per_class(x, y, **common)
    monkeypatch.setattr(kmeans, "_class_batch", lambda c, m, d: 2)
    chunked = kmeans_per_class(x, y, **common)
    np.testing.assert_allclose(np.asarray(chunked.centroids), np.asarray(full.centroids), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(chunked.assignments), np.asarray(full.assignments))
    np.testing.assert_array_equal(np.asarray(chunked.cluster_sizes), np.asarray(full.cluster_sizes))


@pytest.mark.parametrize("method", METHODS)
def test_padding_rows_are_ignored(method):
    # Rows labelled -1 (the padding that makes N a multiple of the devices) change nothing.
    rng = np.random.default_rng(10)
    x = rng.standard_normal((100, 3)).astype(np.float32)
    y = rng.integers(0, 3, 100)
    init = np.stack([x[np.flatnonzero(y == c)[:2]] for c in range(3)])
    padded_x = np.concatenate([x, np.full((7, 3), 1e3, np.float32)])
    padded_y = np.concatenate([y, np.full(7, kmeans.PAD_LABEL)])
    common = dict(num_classes=3, clusters_per_class=2, iterations=6, method=method)
    for kw in (dict(key=None, init_centroids=init), dict(key=jax.random.key(4))):
        plain = kmeans_per_class(x, y, **common, **kw)
        padded = kmeans_per_class(padded_x, padded_y, **common, **kw)
        np.testing.assert_array_equal(np.asarray(padded.cluster_sizes), plain.cluster_sizes)
        np.testing.assert_array_equal(np.asarray(padded.assignments[:100]), plain.assignments)
        np.testing.assert_array_equal(np.asarray(padded.assignments[100:]), np.zeros(7))
        np.testing.assert_allclose(float(padded.inertia), float(plain.inertia), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(padded.centroids), plain.centroids, atol=1e-6)
    ref_centroids, ref_assign, _ = _np_lloyd(x, y, init, 6)
    np.testing.assert_array_equal(
        np.asarray(kmeans_per_class(padded_x, padded_y, key=None, init_centroids=init, **common)
                   .assignments[:100]),
        ref_assign,
    )  # fmt: skip


@pytest.mark.parametrize("warm", [False, True])
def test_the_two_methods_agree(warm):
    # Same seeds (the Gumbel noise is per row, not per method) and the same Lloyd steps.
    rng = np.random.default_rng(11)
    x = rng.standard_normal((500, 6)).astype(np.float32) * rng.uniform(0.1, 10, 6)
    y = rng.integers(0, 5, 500)
    y[y == 3] = 2  # class 3 is empty
    common = dict(num_classes=5, clusters_per_class=4, key=jax.random.key(6), iterations=20)
    if warm:
        init = np.stack([x[np.flatnonzero(y == c)[:4]] if c < 3 else x[:4] for c in range(5)])
        common.update(key=None, init_centroids=init.astype(np.float32))
    a = kmeans_per_class(x, y, method="classes", **common)
    b = kmeans_per_class(x, y, method="segments", **common)
    if not warm:  # the seeds themselves
        sa = kmeans_per_class(x, y, method="classes", **{**common, "iterations": 0})
        sb = kmeans_per_class(x, y, method="segments", **{**common, "iterations": 0})
        np.testing.assert_array_equal(np.asarray(sa.centroids), np.asarray(sb.centroids))
    np.testing.assert_array_equal(np.asarray(a.assignments), np.asarray(b.assignments))
    np.testing.assert_array_equal(np.asarray(a.cluster_sizes), np.asarray(b.cluster_sizes))
    np.testing.assert_allclose(np.asarray(a.centroids), np.asarray(b.centroids), atol=1e-5)
    np.testing.assert_allclose(float(a.inertia), float(b.inertia), rtol=1e-6)


def test_nearest_in_class_matches_numpy():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    y = rng.integers(-1, 3, 200)  # -1: padding rows
    centroids = rng.standard_normal((3, 5, 4)).astype(np.float32)
    got = np.asarray(kmeans.nearest_in_class(x, y, centroids))
    for i in range(200):
        expected = 0 if y[i] < 0 else _np_assign(x[i : i + 1], centroids[y[i]])[0][0]
        assert got[i] == expected, i


def test_segments_compile_once_for_equal_shapes(monkeypatch):
    counted = chex.assert_max_traces(kmeans._segments_impl, n=1)
    static = ("num_classes", "k", "iterations")
    monkeypatch.setattr(kmeans, "_segments_jit", jax.jit(counted, static_argnames=static))
    rng = np.random.default_rng(13)
    for seed in range(3):
        x = rng.standard_normal((120, 3)).astype(np.float32)
        y = rng.integers(0, 4, 120)
        r = kmeans_per_class(
            x, y, num_classes=4, clusters_per_class=2, key=jax.random.key(seed), iterations=3,
            method="segments",
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(r.cluster_sizes).sum(1), np.bincount(y, None, 4))
    chex.clear_trace_counter()


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from cem_jax import kmeans
    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    n, d = 8 * 125, 16
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.integers(0, 4, n)
    y[-5:] = kmeans.PAD_LABEL
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = NamedSharding(mesh, P("data"))
    xs, ys = jax.device_put(x, rows), jax.device_put(y, rows)
    common = dict(num_classes=4, clusters_per_class=3, key=jax.random.key(1), iterations=10)
    sharded = kmeans.kmeans_per_class(xs, ys, **common)  # method=None -> segments
    one = kmeans.kmeans_per_class(x, y, **common)  # one device: classes
    hlo = kmeans._segments_jit.lower(
        xs, ys, jax.random.key(1), None, num_classes=4, k=3, iterations=10
    ).compile().as_text()
    from hlo import collectives
    classes_hlo = kmeans._kmeans_jit.lower(
        xs, ys, jax.random.key(1), None, num_classes=4, k=3, iterations=10, m=320, class_batch=4
    ).compile().as_text()
    out = dict(
        auto_sharded=kmeans.is_sharded(xs), replicated=kmeans.is_sharded(jax.device_put(x)),
        same_assign=bool(np.array_equal(np.asarray(sharded.assignments), np.asarray(one.assignments))),
        same_sizes=bool(np.array_equal(np.asarray(sharded.cluster_sizes), np.asarray(one.cluster_sizes))),
        centroid_diff=float(np.abs(np.asarray(sharded.centroids) - np.asarray(one.centroids)).max()),
        inertia=[float(sharded.inertia), float(one.inertia)],
        largest_collective=max(size for _, size in collectives(hlo)),
        classes_largest_collective=max(size for _, size in collectives(classes_hlo)),
        n=n,
        assign_sharded=kmeans.is_sharded(kmeans.nearest_in_class(xs, ys, sharded.centroids)),
    )
    print("RESULT " + json.dumps(out))
    """
)


@pytest.mark.slow
def test_segments_on_8_fake_devices_match_one_device_without_gathering_the_features():
    env = fake_devices_env(8)
    paths = [ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line[len("RESULT ") :])
    assert out["auto_sharded"] and not out["replicated"]
    assert out["same_assign"] and out["same_sizes"], out  # the seeds do not depend on the sharding
    assert out["centroid_diff"] < 1e-5, out
    np.testing.assert_allclose(*out["inertia"], rtol=1e-6)
    # Nothing of per-sample size crosses devices (the per-class layout gathers [C, M, D]).
    assert out["largest_collective"] < out["n"] <= out["classes_largest_collective"], out
    assert out["assign_sharded"], out
