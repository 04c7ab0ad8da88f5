"""Tests of cem_jax.entropy against independent NumPy computations and closed forms."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util as jtu

from cem_jax import entropy, kmeans
from cem_jax.entropy import MixtureState
from tests.devices import fake_devices_env

# --------------------------------------------------------------------------------------------------
# Independent NumPy implementations (explicit Python loops, float64)


def np_cem_loss(
    z, labels, state, *, sigma, mode, kappa=10.0, tau=0.125, gamma=0.01, max_blend=0.99
):
    z = np.asarray(z, np.float64).reshape(len(labels), -1)
    labels = np.asarray(labels)
    cents = np.asarray(state.centroids, np.float64)
    weights = np.asarray(state.weights, np.float64)
    var = np.asarray(state.variances, np.float64)
    counts = np.asarray(state.counts, np.float64)
    classes = sorted(set(labels.tolist()))
    total = 0.0
    for c in classes:
        members = [i for i in range(len(labels)) if labels[i] == c]
        assign = {i: int(np.argmin([np.sum((z[i] - ck) ** 2) for ck in cents[c]])) for i in members}
        for k in range(cents.shape[1]):
            group = [i for i in members if assign[i] == k]
            if not group or weights[c, k] == 0 or counts[c] == 0:
                continue
            pi, n = weights[c, k], len(group)
            v_b = np.mean([(z[i] - cents[c, k]) ** 2 for i in group], axis=0)
            mu = min(kappa * n / (pi * counts[c]), max_blend)
            v = mu * v_b + (1 - mu) * var[c, k]
            if mode == "gmm":
                total += pi * np.mean(0.5 * np.log(1 + v / sigma**2))
            else:
                total += pi * max(0.0, np.log(np.mean(v) + gamma) - np.log(tau * sigma**2 + gamma))
    return total / len(classes)


def np_leakage_bits(z, labels, centroids, sigma, covariance):
    z = np.asarray(z, np.float64).reshape(len(labels), -1)
    cents = np.asarray(centroids, np.float64)
    n, d = z.shape
    k_count = cents.shape[1]
    groups = {}
    for i in range(n):
        k = int(np.argmin(np.sum((z[i] - cents[labels[i]]) ** 2, axis=-1)))
        groups.setdefault(int(labels[i]) * k_count + k, []).append(i)
    total = 0.0
    for members in groups.values():
        x = z[members]
        p = len(members) / n
        cov = (x - x.mean(0)).T @ (x - x.mean(0)) / len(members)
        if covariance == "full" and len(members) > entropy.FULL_MIN_SAMPLES_PER_DIM * d:
            logdet = np.linalg.slogdet(np.eye(d) + cov / sigma**2)[1]
        else:
            logdet = np.sum(np.log1p(np.diag(cov) / sigma**2))
        total += -p * np.log(p) + 0.5 * p * logdet
    return total / np.log(2)


# --------------------------------------------------------------------------------------------------
# A hand-built state and batch: 4 classes (class 3 absent from the batch), uneven class sizes,
# clusters with π = 0 that still receive batch samples, a class with N_class = 0.

C, K, H, W, CH = 5, 3, 2, 1, 3
D = H * W * CH


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    centroids = rng.normal(size=(C, K, D)).astype(np.float32)
    labels = np.array([0] * 9 + [1] * 3 + [2] * 12 + [4] * 2)  # class 3 absent, uneven sizes
    rng.shuffle(labels)
    # Each sample near a random centroid of its class (so several clusters are hit).
    pick = rng.integers(0, K, size=len(labels))
    z = centroids[labels, pick] + 0.4 * rng.normal(size=(len(labels), D))
    weights = rng.dirichlet(np.ones(K), size=C).astype(np.float32)
    weights[0] = [0.6, 0.0, 0.4]  # empty cluster (0, 1): π = 0
    weights[2] = [0.0, 0.7, 0.3]  # empty cluster (2, 0)
    variances = rng.uniform(0.05, 0.6, size=(C, K, D)).astype(np.float32)
    variances[0, 1] = 0.0
    variances[2, 0] = 0.0
    counts = np.array([400, 15, 2000, 50, 0], np.int32)  # class 4 present with N_class = 0
    state = MixtureState(*(jnp.asarray(a) for a in (centroids, weights, variances, counts)))
    return z.reshape(-1, H, W, CH).astype(np.float32), labels.astype(np.int32), state


def test_problem_covers_the_edge_cases():
    z, labels, state = _problem()
    zf = z.reshape(len(labels), -1)
    a = [int(np.argmin(((zf[i] - state.centroids[y]) ** 2).sum(-1))) for i, y in enumerate(labels)]
    hit = {(int(y), k) for y, k in zip(labels, a)}
    assert (0, 1) in hit or (2, 0) in hit  # a π = 0 group present in the batch
    assert 3 not in set(labels.tolist()) and 4 in set(labels.tolist())
    sizes = {g: sum(1 for y, k in zip(labels, a) if (int(y), k) == g) for g in hit}
    mus = [
        10 * n / (float(state.weights[g]) * int(state.counts[g[0]]))
        for g, n in sizes.items()
        if float(state.weights[g]) > 0 and int(state.counts[g[0]]) > 0
    ]
    assert min(mus) < 0.99 < max(mus)  # both the blended and the saturated regime


@pytest.mark.parametrize("mode", ["gmm", "reference"])
@pytest.mark.parametrize("sigma", [0.3, 1.0])
def test_cem_loss_matches_numpy(mode, sigma):
    z, labels, state = _problem()
    expected = np_cem_loss(z, labels, state, sigma=sigma, mode=mode)
    got = entropy.cem_loss(jnp.asarray(z), jnp.asarray(labels), state, sigma=sigma, mode=mode)
    assert expected > 0
    np.testing.assert_allclose(float(got), expected, rtol=2e-5)


def test_cem_loss_reference_hinge_partly_active():
    # With σ = 1 the reference threshold log(τ + γ) sits inside the range of group variances, so the
    # NumPy comparison above exercises both sides of the relu.
    z, labels, state = _problem()
    hinge_off = np_cem_loss(z, labels, state, sigma=1.0, mode="reference", tau=10.0)
    assert hinge_off == 0.0
    assert float(entropy.cem_loss(z, labels, state, sigma=1.0, mode="reference", tau=10.0)) == 0.0
    for tau in (0.5, 1.0, 2.0):
        e = np_cem_loss(z, labels, state, sigma=1.0, mode="reference", tau=tau)
        g = entropy.cem_loss(z, labels, state, sigma=1.0, mode="reference", tau=tau)
        np.testing.assert_allclose(float(g), e, rtol=2e-5, atol=1e-7)


def test_cem_loss_other_constants_and_2d_features():
    z, labels, state = _problem(seed=3)
    z2 = z.reshape(len(labels), -1)
    kw = dict(kappa=3.0, tau=0.2, gamma=0.05, max_blend=0.5)
    for mode in ("gmm", "reference"):
        e = np_cem_loss(z2, labels, state, sigma=0.5, mode=mode, **kw)
        g = entropy.cem_loss(z2, labels, state, sigma=0.5, mode=mode, **kw)
        np.testing.assert_allclose(float(g), e, rtol=2e-5)


def test_init_mixture_gives_zero_loss_with_finite_gradient():
    z, labels, _ = _problem()
    state = entropy.init_mixture(C, K, D)
    for mode in ("gmm", "reference"):
        loss, grad = jax.value_and_grad(
            lambda f, m=mode: entropy.cem_loss(f, labels, state, sigma=0.1, mode=m)
        )(jnp.asarray(z))
        assert float(loss) == 0.0
        assert np.all(np.asarray(grad) == 0.0)


@pytest.mark.parametrize("mode", ["gmm", "reference"])
def test_cem_loss_gradient_check_grads_float64(mode):
    z, labels, state = _problem(seed=1)
    with jax.enable_x64(True):
        z64 = jnp.asarray(z, jnp.float64)
        assert z64.dtype == jnp.float64
        f = lambda f_: entropy.cem_loss(f_, jnp.asarray(labels), state, sigma=0.3, mode=mode)
        assert f(z64).dtype == jnp.float64
        jtu.check_grads(f, (z64,), order=1, modes=["rev"])
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak


@pytest.mark.parametrize("mode", ["gmm", "reference"])
def test_cem_loss_gradient_matches_numpy_finite_differences(mode):
    z, labels, state = _problem(seed=2)
    sigma = 0.3  # random data: no relu kink or assignment boundary within eps
    grad = np.asarray(
        jax.grad(lambda f: entropy.cem_loss(f, labels, state, sigma=sigma, mode=mode))(
            jnp.asarray(z)
        )
    )
    z64 = z.astype(np.float64)
    eps = 1e-5
    fd = np.zeros_like(z64)
    for idx in np.ndindex(z64.shape):
        zp, zm = z64.copy(), z64.copy()
        zp[idx] += eps
        zm[idx] -= eps
        fd[idx] = (
            np_cem_loss(zp, labels, state, sigma=sigma, mode=mode)
            - np_cem_loss(zm, labels, state, sigma=sigma, mode=mode)
        ) / (2 * eps)
    assert np.abs(fd).max() > 1e-3
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5 * np.abs(fd).max())


def test_cem_loss_under_jit_with_traced_labels_and_sigma():
    z, labels, state = _problem()

    @jax.jit
    def step(f, y, s, sigma):
        return jax.value_and_grad(lambda f_: entropy.cem_loss(f_, y, s, sigma=sigma))(f)

    loss, grad = step(jnp.asarray(z), jnp.asarray(labels), state, 0.7)
    eager_loss, eager_grad = jax.value_and_grad(
        lambda f_: entropy.cem_loss(f_, labels, state, sigma=0.7)
    )(jnp.asarray(z))
    np.testing.assert_allclose(
        float(loss), np_cem_loss(z, labels, state, sigma=0.7, mode="gmm"), rtol=2e-5
    )
    np.testing.assert_allclose(float(loss), float(eager_loss), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(eager_grad), rtol=1e-5, atol=1e-8)


def test_cem_loss_compiles_once_for_new_values():
    z, labels, state = _problem()
    rng = np.random.default_rng(5)
    entropy.cem_loss(z, labels, state, sigma=0.5)
    size = entropy._cem_loss_jit._cache_size()
    for i, sigma in enumerate([0.1, 0.2, 1.5]):
        perm = rng.permutation(len(labels))
        st = state._replace(weights=state.weights * (1 + i))
        entropy.cem_loss(z[perm] + i, labels[perm], st, sigma=sigma, kappa=5.0 + i, tau=0.3)
    assert entropy._cem_loss_jit._cache_size() == size


# --------------------------------------------------------------------------------------------------
# Leakage bound and MSE floor


def test_leakage_full_matches_closed_form_single_gaussian():
    rng = np.random.default_rng(0)
    d, n, sigma = 4, 20000, 0.5
    a = rng.normal(size=(d, d))
    cov = a @ a.T / d + 0.1 * np.eye(d)  # non-diagonal
    z = rng.multivariate_normal(np.full(d, 3.0), cov, size=n).astype(np.float32)
    labels = np.zeros(n, np.int32)
    state = entropy.init_mixture(1, 1, d)
    full = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma, covariance="full"))
    diag = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma, covariance="diagonal"))
    exact = 0.5 * np.linalg.slogdet(np.eye(d) + cov / sigma**2)[1] / np.log(2)
    # Sampling error of log det(Σ̂ + σ²I): std ≈ sqrt(2·tr(M²)/n), M = (Σ + σ²I)⁻¹Σ.
    m = np.linalg.solve(cov + sigma**2 * np.eye(d), cov)
    tol_bits = 5 * 0.5 * math.sqrt(2 * np.trace(m @ m) / n) / np.log(2)
    assert abs(full - exact) < tol_bits
    np.testing.assert_allclose(
        full, np_leakage_bits(z, labels, state.centroids, sigma, "full"), rtol=1e-5
    )
    np.testing.assert_allclose(
        diag, np_leakage_bits(z, labels, state.centroids, sigma, "diagonal"), rtol=1e-5
    )
    assert diag > full + 0.05  # Hadamard, strict for a correlated Σ


def _mixed_scale_problem(rng, d, n_per, sigma):
    c_count, k_count = 2, 2
    cents = rng.normal(size=(c_count, k_count, d)) * 10
    zs, ls = [], []
    for c in range(c_count):
        for k in range(k_count):
            scales = sigma * np.logspace(-4, 2, d)[rng.permutation(d)]  # v/σ² from 1e-8 to 1e4
            q, _ = np.linalg.qr(rng.normal(size=(d // 2, d // 2)))
            x = rng.normal(size=(n_per + 7 * (c + k), d)) * scales
            x[:, : d // 2] = x[:, : d // 2] @ q  # correlated half
            zs.append(cents[c, k] + x)
            ls += [c] * len(x)
    state = MixtureState(
        jnp.asarray(cents, jnp.float32),
        jnp.zeros((c_count, k_count)),
        jnp.zeros((c_count, k_count, d)),
        jnp.zeros((c_count,), jnp.int32),
    )
    return np.concatenate(zs).astype(np.float32), np.array(ls, np.int32), state


@pytest.mark.parametrize("n_per", [40, 250])  # padded size M < D (Gram form) and M >= D (D×D form)
def test_log_det_float32_matches_float64_slogdet(n_per):
    rng = np.random.default_rng(n_per)
    d, sigma = 192, 0.1
    z, labels, state = _mixed_scale_problem(rng, d, n_per, sigma)
    x = z[labels == 0][:n_per]
    centred = x - x.mean(0)
    got = float(entropy._log_det_eye_plus(jnp.asarray(centred), float(len(x)), sigma))
    cov = centred.astype(np.float64).T @ centred.astype(np.float64) / len(x)
    expected = np.linalg.slogdet(np.eye(d) + cov / sigma**2)[1]
    assert np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    # The leakage bound itself: clusters of n <= 10·D take their diagonal term.
    full = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma, covariance="full"))
    np.testing.assert_allclose(
        full, np_leakage_bits(z, labels, state.centroids, sigma, "full"), rtol=1e-3
    )
    diag = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma))
    np.testing.assert_allclose(
        diag, np_leakage_bits(z, labels, state.centroids, sigma, "diagonal"), rtol=1e-4
    )
    assert diag >= full


def _gaussian_clusters(rng, d, num, correlated):
    """``num`` well-separated Gaussian clusters (one class each) with known covariances.

    Returns ``sample(rng, n_per) -> (features, labels)``, a state whose centroids are the true
    means, and ``truth(σ) = H(c) + ½ Σ_c p_c log det(I + Σ_c/σ²)`` in bits: the means are ~40
    standard deviations apart, so the mixture's entropy is that closed form (to ~1e-300).
    """
    means = 10.0 * rng.normal(size=(num, d))
    covs = []
    for _ in range(num):
        if correlated:
            a = rng.normal(size=(d, 3)) * 0.2
            covs.append(a @ a.T + np.diag(rng.uniform(0.001, 0.02, d)))
        else:
            covs.append(np.diag(rng.uniform(0.001, 0.05, d)))
    state = MixtureState(
        jnp.asarray(means[:, None, :], jnp.float32),
        jnp.ones((num, 1)),
        jnp.zeros((num, 1, d)),
        jnp.ones((num,), jnp.int32),
    )

    def sample(rng, n_per):
        z = np.concatenate([rng.multivariate_normal(means[c], covs[c], n_per) for c in range(num)])
        return z.astype(np.float32), np.repeat(np.arange(num), n_per).astype(np.int32)

    def truth(sigma):
        logdets = [np.linalg.slogdet(np.eye(d) + cov / sigma**2)[1] for cov in covs]
        return (math.log(num) + 0.5 * np.mean(logdets)) / math.log(2)

    return sample, state, truth


@pytest.mark.parametrize("correlated", [True, False])
def test_certificate_never_below_closed_form_with_clusters_smaller_than_d(correlated):
    # n = 40 samples per cluster for D = 64 dimensions: the sample covariance has rank 39.
    d, n_per, sigma = 64, 40, 0.1
    margins = []
    for seed in range(12):
        rng = np.random.default_rng(100 + seed)
        sample, state, truth = _gaussian_clusters(rng, d, 3, correlated)
        z, labels = sample(rng, n_per)
        exact = truth(sigma)
        cert = float(entropy.leakage_certificate(z, labels, state, sigma=sigma))
        full = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma, covariance="full"))
        rank_deficient = np_ml_full_bits(z, labels, sigma)
        assert cert >= exact, (seed, cert, exact)
        assert full > rank_deficient  # the rank-deficient log det is never used
        if correlated:
            # What the old estimator reported: far below the truth (the failure being fixed).
            assert rank_deficient < 0.9 * exact
        margins.append(cert / exact - 1)
    assert min(margins) > 0


def np_ml_full_bits(z, labels, sigma):
    z = np.asarray(z, np.float64)
    total, n = 0.0, len(labels)
    for c in np.unique(labels):
        x = z[labels == c]
        p = len(x) / n
        cov = np.cov(x.T, bias=True)
        total += (
            -p * np.log(p) + 0.5 * p * np.linalg.slogdet(np.eye(z.shape[1]) + cov / sigma**2)[1]
        )
    return total / np.log(2)


def test_full_estimate_and_certificate_with_many_samples_per_dimension_and_held_out():
    # With many samples per dimension the full estimate approaches the truth; the certificate stays
    # above it on the fitting data and on fresh (held-out) data, with a margin that shrinks with n.
    rng = np.random.default_rng(7)
    d, sigma = 6, 0.1
    sample, state, truth = _gaussian_clusters(rng, d, 2, True)
    exact = truth(sigma)
    z, labels = sample(rng, 5000)
    full = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma, covariance="full"))
    assert abs(full - exact) < 0.02 * exact
    held_out, held_labels = sample(np.random.default_rng(8), 500)
    for feats, y in ((z, labels), (held_out, held_labels)):
        cert = float(entropy.leakage_certificate(feats, y, state, sigma=sigma))
        diag = float(entropy.leakage_upper_bound(feats, y, state, sigma=sigma))
        assert cert >= exact and cert > diag
        assert cert < diag * (1.06 if len(y) == 10000 else 1.25)


def test_leakage_uses_nearest_own_class_centroid_and_cluster_entropy():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(90, 3)).astype(np.float32)
    labels = (np.arange(90) % 3).astype(np.int32)
    state = MixtureState(
        jnp.asarray(rng.normal(size=(4, 2, 3)), jnp.float32),
        jnp.zeros((4, 2)),
        jnp.zeros((4, 2, 3)),
        jnp.zeros(4, jnp.int32),
    )
    for cov in ("full", "diagonal"):
        got = float(entropy.leakage_upper_bound(z, labels, state, sigma=0.2, covariance=cov))
        np.testing.assert_allclose(
            got, np_leakage_bits(z, labels, state.centroids, 0.2, cov), rtol=1e-5
        )
    # Features that are constant within each cluster leak exactly H(c).
    zc = np.asarray(state.centroids)[labels, 0]
    h = float(entropy.leakage_upper_bound(zc, labels, state, sigma=0.2, covariance="full"))
    np.testing.assert_allclose(h, math.log2(3), rtol=1e-5)


def test_leakage_diagonal_is_jittable():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 4)).astype(np.float32)
    labels = (np.arange(50) % 2).astype(np.int32)
    state = MixtureState(
        jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32),
        jnp.zeros((2, 3)),
        jnp.zeros((2, 3, 4)),
        jnp.zeros(2, jnp.int32),
    )
    f = jax.jit(lambda a, b, s: entropy.leakage_upper_bound(a, b, state, sigma=s))
    np.testing.assert_allclose(
        float(f(z, labels, 0.3)),
        np_leakage_bits(z, labels, state.centroids, 0.3, "diagonal"),
        rtol=1e-5,
    )


def test_mse_lower_bound_gaussian_closed_form():
    for s2, sig2, d in [(1.0, 0.25, 3), (0.04, 1e-2, 3072), (5.0, 0.1, 1)]:
        h = d / 2 * math.log(2 * math.pi * math.e * s2 * sig2 / (s2 + sig2))
        np.testing.assert_allclose(
            float(entropy.mse_lower_bound(h, d)), s2 * sig2 / (s2 + sig2), rtol=1e-5
        )
    hs = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(
        np.asarray(entropy.mse_lower_bound(hs, 2)),
        np.exp(np.array([0.0, 1.0])) / (2 * np.pi * np.e),
        rtol=1e-6,
    )


# --------------------------------------------------------------------------------------------------
# fit_mixture


def _blobs(rng, counts, k, d, spread=8.0):
    zs, ls = [], []
    centres = rng.normal(size=(len(counts), k, d)) * spread
    for c, n in enumerate(counts):
        which = rng.integers(0, k, size=n)
        zs.append(centres[c, which] + rng.normal(size=(n, d)))
        ls.append(np.full(n, c))
    return np.concatenate(zs).astype(np.float32), np.concatenate(ls).astype(np.int32)


def test_fit_mixture_statistics_match_numpy():
    rng = np.random.default_rng(0)
    counts = [120, 35, 2, 0, 80]  # class 2 smaller than K (empty clusters), class 3 absent
    z, labels = _blobs(rng, counts, 3, 6)
    z = z.reshape(-1, 2, 3)
    state = entropy.fit_mixture(
        z, labels, num_classes=5, clusters_per_class=3, key=jax.random.key(1), iterations=20
    )
    chex.assert_shape(state.centroids, (5, 3, 6))
    chex.assert_shape(state.variances, (5, 3, 6))
    np.testing.assert_array_equal(np.asarray(state.counts), np.bincount(labels, minlength=5))
    w = np.asarray(state.weights)
    for c, n in enumerate(counts):
        np.testing.assert_allclose(w[c].sum(), 1.0 if n else 0.0, atol=1e-6)
    # Variances around the returned centroids, for the assignments k-means returns.
    res = kmeans.kmeans_per_class(
        z.reshape(len(labels), -1),
        labels,
        num_classes=5,
        clusters_per_class=3,
        key=jax.random.key(1),
        iterations=20,
    )
    np.testing.assert_allclose(np.asarray(state.centroids), np.asarray(res.centroids), rtol=1e-6)
    a = np.asarray(res.assignments)
    zf = z.reshape(len(labels), -1).astype(np.float64)
    cents = np.asarray(state.centroids, np.float64)
    empty_seen = False
    for c in range(5):
        for k in range(3):
            members = zf[(labels == c) & (a == k)]
            if len(members) == 0:
                empty_seen = True
                assert w[c, k] == 0 and np.all(np.asarray(state.variances[c, k]) == 0)
                continue
            np.testing.assert_allclose(w[c, k], len(members) / counts[c], rtol=1e-6)
            np.testing.assert_allclose(
                np.asarray(state.variances[c, k]),
                ((members - cents[c, k]) ** 2).mean(0),
                rtol=1e-4,
                atol=1e-6,
            )
    assert empty_seen


def test_fit_mixture_warm_start_from_converged_state_does_not_move():
    rng = np.random.default_rng(1)
    z, labels = _blobs(rng, [200, 150, 100], 4, 5, spread=20.0)
    state = entropy.fit_mixture(
        z, labels, num_classes=3, clusters_per_class=4, key=jax.random.key(0), iterations=50
    )
    again = entropy.fit_mixture(
        z,
        labels,
        num_classes=3,
        clusters_per_class=4,
        key=jax.random.key(7),
        previous=state,
        iterations=10,
    )
    for a, b in zip(state, again):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_fit_mixture_compiles_once_for_new_values():
    rng = np.random.default_rng(2)
    z, labels = _blobs(rng, [60, 40], 2, 4)
    kw = dict(num_classes=2, clusters_per_class=2, iterations=5)
    state = entropy.fit_mixture(z, labels, key=jax.random.key(0), **kw)
    jits = (entropy._mixture_from_kmeans, kmeans._kmeans_jit, kmeans._seed_jit)
    sizes = [f._cache_size() for f in jits]
    # The warm start (every epoch after the first) runs the program the first call compiled.
    state = entropy.fit_mixture(z, labels, key=jax.random.key(0), previous=state, **kw)
    assert [f._cache_size() for f in jits] == sizes
    for i in range(3):
        perm = rng.permutation(len(labels))
        state = entropy.fit_mixture(z[perm] * (1 + i), labels[perm], key=jax.random.key(i), **kw)
        state = entropy.fit_mixture(
            z[perm] + i, labels[perm], key=jax.random.key(i), previous=state, **kw
        )
    assert [f._cache_size() for f in jits] == sizes


def test_fit_mixture_traces_each_program_once(monkeypatch):
    # As the training loop calls it: k-means++ once, then warm starts on new features every epoch.
    lloyd = chex.assert_max_traces(kmeans._kmeans_impl, n=1)
    seed = chex.assert_max_traces(kmeans._seed_impl, n=1)
    static = ("num_classes", "k", "iterations", "m", "class_batch")
    monkeypatch.setattr(kmeans, "_kmeans_jit", jax.jit(lloyd, static_argnames=static))
    monkeypatch.setattr(kmeans, "_seed_jit", jax.jit(seed, static_argnames=static[:2] + static[3:]))
    rng = np.random.default_rng(3)
    z, labels = _blobs(rng, [70, 50, 30], 3, 8)
    kw = dict(num_classes=3, clusters_per_class=3, iterations=20)
    state = None
    try:
        for epoch in range(4):
            z = z + rng.normal(size=z.shape).astype(np.float32) * 0.1  # the encoder moves
            state = entropy.fit_mixture(z, labels, key=jax.random.key(epoch), previous=state, **kw)
            np.testing.assert_array_equal(np.asarray(state.counts), [70, 50, 30])
    finally:
        chex.clear_trace_counter()


# --------------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_value_error():
    z, labels, state = _problem()
    key = jax.random.key(0)
    cases = [
        (lambda: entropy.cem_loss(z[:, :1], labels, state, sigma=0.1), "features"),
        (lambda: entropy.cem_loss(z, labels[:-1], state, sigma=0.1), "labels"),
        (lambda: entropy.cem_loss(z, labels.astype(np.float32), state, sigma=0.1), "labels"),
        (lambda: entropy.cem_loss(z, labels + 1, state, sigma=0.1), "labels"),
        (lambda: entropy.cem_loss(z, labels - 1, state, sigma=0.1), "labels"),
        (lambda: entropy.cem_loss(z, labels, state, sigma=0.0), "sigma"),
        (lambda: entropy.cem_loss(z, labels, state, sigma=-1.0), "sigma"),
        (lambda: entropy.cem_loss(z, labels, state, sigma=0.1, mode="hinge"), "mode"),
        (lambda: entropy.cem_loss(z, labels, state, sigma=0.1, max_blend=1.5), "max_blend"),
        (lambda: entropy.cem_loss(z, labels, state, sigma=0.1, gamma=0.0), "gamma"),
        (
            lambda: entropy.cem_loss(
                z, labels, state._replace(weights=state.weights[:2]), sigma=0.1
            ),
            "state.weights",
        ),
        (lambda: entropy.cem_loss(z, labels, (1, 2), sigma=0.1), "state"),
        (
            lambda: entropy.leakage_upper_bound(z, labels, state, sigma=0.1, covariance="banded"),
            "covariance",
        ),
        (lambda: entropy.leakage_upper_bound(z, labels, state, sigma=0.0), "sigma"),
        (lambda: entropy.leakage_upper_bound(z[:, :1], labels, state, sigma=0.1), "features"),
        (lambda: entropy.leakage_upper_bound(z, labels + 5, state, sigma=0.1), "labels"),
        (
            lambda: entropy.fit_mixture(z, labels, num_classes=5, clusters_per_class=0, key=key),
            "clusters_per_class",
        ),
        (
            lambda: entropy.fit_mixture(z, labels, num_classes=0, clusters_per_class=2, key=key),
            "num_classes",
        ),
        (
            lambda: entropy.fit_mixture(z, labels, num_classes=3, clusters_per_class=2, key=key),
            "labels",
        ),
        (
            lambda: entropy.fit_mixture(
                z, labels, num_classes=5, clusters_per_class=2, key=key, previous=state
            ),
            "previous",
        ),
        (
            lambda: entropy.fit_mixture(
                z, labels, num_classes=5, clusters_per_class=3, key=key, iterations=-1
            ),
            "iterations",
        ),
        (lambda: entropy.init_mixture(2, 0, 3), "clusters_per_class"),
        (lambda: entropy.mse_lower_bound(1.0, 0), "dim"),
        (lambda: entropy.mse_lower_bound(1.0, 2.5), "dim"),
    ]
    for fn, name in cases:
        with pytest.raises(ValueError, match=name) as info:
            fn()
        assert "accepted" in str(info.value)


def test_traced_full_covariance_is_refused():
    z, labels, state = _problem()
    with pytest.raises(ValueError, match="full"):
        jax.jit(
            lambda a: entropy.leakage_upper_bound(a, labels, state, sigma=0.1, covariance="full")
        )(z)


# --------------------------------------------------------------------------------------------------
# The mechanism: minimising L_C lowers the leakage bound.


@pytest.mark.parametrize("mode", ["gmm", "reference"])
def test_gradient_steps_on_cem_loss_lower_the_leakage_bound(mode):
    rng = np.random.default_rng(0)
    n, d, classes, sigma = 240, 16, 3, 0.1
    labels = jnp.asarray(np.arange(n) % classes, jnp.int32)
    z = jnp.asarray(rng.uniform(0, 1, size=(n, d)), jnp.float32)  # free "features"
    state = entropy.fit_mixture(
        z, labels, num_classes=classes, clusters_per_class=2, key=jax.random.key(0)
    )
    before = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma))
    grad = jax.jit(jax.grad(lambda z, s: entropy.cem_loss(z, labels, s, sigma=sigma, mode=mode)))
    for step in range(300):
        z = z - 0.5 * grad(z, state)
        if step % 50 == 49:  # the training loop's per-epoch refresh
            state = entropy.fit_mixture(
                z,
                labels,
                num_classes=classes,
                clusters_per_class=2,
                key=jax.random.key(step),
                previous=state,
            )
    after = float(entropy.leakage_upper_bound(z, labels, state, sigma=sigma))
    assert after < 0.7 * before, (before, after)
    # and the certificate agrees: the features carry less information through the channel
    assert float(entropy.leakage_certificate(z, labels, state, sigma=sigma)) < before


# --------------------------------------------------------------------------------------------------
# Padding rows and features sharded over devices


def test_padding_rows_change_neither_the_mixture_nor_the_bounds():
    # Rows labelled -1 pad N to a multiple of the device count; they must count for nothing.
    rng = np.random.default_rng(20)
    z, labels = _blobs(rng, [60, 45, 50], 2, 4, spread=3.0)
    pad_z = np.concatenate([z, np.full((5, 4), 100.0, np.float32)])
    pad_y = np.concatenate([labels, np.full(5, -1, np.int32)])
    fit = dict(num_classes=3, clusters_per_class=2, key=jax.random.key(2), iterations=10)
    plain = entropy.fit_mixture(z, labels, **fit)
    padded = entropy.fit_mixture(pad_z, pad_y, **fit)
    for a, b in zip(plain, padded):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    for kw in (dict(), dict(covariance="full"), dict(confidence=0.95)):
        a = float(entropy.leakage_upper_bound(z, labels, plain, sigma=0.3, **kw))
        b = float(entropy.leakage_upper_bound(pad_z, pad_y, plain, sigma=0.3, **kw))
        np.testing.assert_allclose(b, a, rtol=1e-6)
    np.testing.assert_allclose(
        float(entropy.leakage_upper_bound(pad_z, pad_y, plain, sigma=0.3)),
        np_leakage_bits(z, labels, plain.centroids, 0.3, "diagonal"),
        rtol=1e-5,
    )
    with pytest.raises(ValueError, match=r"-1 for a padding row"):
        entropy.fit_mixture(z, labels - 2, **fit)
    with pytest.raises(ValueError, match=r"accepted values in \[0, 3\)"):
        entropy.cem_loss(pad_z, pad_y, plain, sigma=0.3)  # the loss takes no padding


SHARDED_SCRIPT = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from cem_jax import entropy, kmeans
assert jax.device_count() == 8
rng = np.random.default_rng(0)
d, n = 3, 8 * 150
centres = rng.normal(size=(4, 2, d)) * 6
labels = rng.integers(0, 4, n).astype(np.int32)
z = (centres[labels, rng.integers(0, 2, n)] + rng.normal(size=(n, d))).astype(np.float32)
labels[-6:] = -1  # padding rows
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
rows = NamedSharding(mesh, P("data"))
zs, ys = jax.device_put(z, rows), jax.device_put(labels, rows)
fit = dict(num_classes=4, clusters_per_class=2, key=jax.random.key(3), iterations=15)
sharded = entropy.fit_mixture(zs, ys, **fit)
# The same algorithm on one device (method="segments"), and the per-class layout from its centroids.
seg = kmeans.kmeans_per_class(z, labels, method="segments", **fit)
out = dict(
    centroid_diff=float(np.abs(np.asarray(sharded.centroids) - np.asarray(seg.centroids)).max()),
    counts=np.asarray(sharded.counts).tolist(),
    expected_counts=np.bincount(labels[labels >= 0], minlength=4).tolist(),
)
for name, kw in (("diag", {}), ("full", {"covariance": "full"}), ("cert", {"confidence": 0.95})):
    out[name] = [
        float(entropy.leakage_upper_bound(zs, ys, sharded, sigma=0.5, **kw)),
        float(entropy.leakage_upper_bound(z, labels, sharded, sigma=0.5, **kw)),
    ]
hlo = "\\n".join(
    f.lower(*args).compile().as_text()
    for f, args in (
        (entropy._diagonal_bound, (zs, ys, sharded.centroids, jnp.float32(0.5), 0.95, True)),
        (entropy._full_bound_segments, (zs, *entropy._assign_groups_jit(zs, ys, sharded.centroids,
                                                                          segments=True),
                                        jnp.float32(0.5))),
    )
)
from hlo import collectives
out["largest_collective"] = max(size for _, size in collectives(hlo))
out["n"] = n
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_mixture_and_bounds_on_8_fake_devices_match_one_device_without_gathering():
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = fake_devices_env(8)
    env["PYTHONPATH"] = os.pathsep.join(
        [root, os.path.join(root, "tests"), env.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])
    assert out["centroid_diff"] < 1e-5, out
    assert out["counts"] == out["expected_counts"]
    for name in ("diag", "full", "cert"):
        np.testing.assert_allclose(*out[name], rtol=1e-5, err_msg=name)
    assert out["full"][0] < out["diag"][0] < out["cert"][0]  # 150 samples per cluster > 10·D: full
    assert out["largest_collective"] < out["n"], out  # nothing of per-sample size crosses devices
