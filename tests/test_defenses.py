"""Tests for cem_jax.defenses against NumPy re-implementations and closed forms."""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cem_jax import defenses
from cem_jax.defenses import Defense, make_defense

EPS = 1e-7


def _features(seed: int, shape=(4, 4, 4, 3)) -> np.ndarray:
    """Sigmoid-like features in (0, 1), all distinct."""
    return np.random.default_rng(seed).uniform(0.01, 0.99, size=shape).astype(np.float32)


def _np_keep_largest(flat: np.ndarray, num_zeroed: int) -> np.ndarray:
    """Zero the num_zeroed smallest entries of a 1-D array; among equal values keep lower indices."""
    k = flat.size - num_zeroed
    order = np.lexsort((np.arange(flat.size), -flat))  # by value descending, then index ascending
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out


# ------------------------------------------------------------------------------------------------
# obfuscations
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn",
    [
        lambda k, z: defenses.gaussian_noise(k, z, 0.1),
        lambda k, z: defenses.dropout(k, z, 0.3),
        lambda k, z: defenses.dropout(k, z, 0.3, rescale=True),
        lambda k, z: defenses.topk(z, 0.5),
        lambda k, z: defenses.topk(z, 0.5, scope="batch"),
        lambda k, z: make_defense("cem_dropout").obfuscate(k, z),
        lambda k, z: make_defense("cem_topk").obfuscate(k, z),
    ],
)
def test_shapes_and_dtypes_preserved(fn):
    z = jnp.asarray(_features(0))
    out = fn(jax.random.key(0), z)
    chex.assert_shape(out, z.shape)
    chex.assert_type(out, z.dtype)


def test_noise_standard_deviation():
    n, sigma = 200_000, 0.3
    z = jnp.full((n,), 0.5, jnp.float32)
    eps = np.asarray(defenses.gaussian_noise(jax.random.key(1), z, sigma), np.float64) - 0.5
    # std of the sample std ≈ σ/sqrt(2n); mean ≈ σ/sqrt(n): 5-sigma tolerances
    assert abs(eps.std() - sigma) < 5 * sigma / math.sqrt(2 * n)
    assert abs(eps.mean()) < 5 * sigma / math.sqrt(n)


@pytest.mark.parametrize("ratio", [0.2, 0.7])
def test_dropout_keep_fraction_and_values(ratio):
    n = 100_000
    z = _features(2, shape=(n,))
    out = np.asarray(defenses.dropout(jax.random.key(3), jnp.asarray(z), ratio))
    kept = out != 0
    frac = kept.mean()
    assert abs(frac - (1 - ratio)) < 5 * math.sqrt(ratio * (1 - ratio) / n)
    np.testing.assert_array_equal(out[kept], z[kept])  # no rescaling (the reference)
    out_r = np.asarray(defenses.dropout(jax.random.key(3), jnp.asarray(z), ratio, rescale=True))
    np.testing.assert_array_equal(out_r != 0, kept)  # same key: same mask
    np.testing.assert_allclose(out_r[kept], z[kept] / (1 - ratio), rtol=1e-6)


def test_dropout_mask_is_uniform_below_ratio():
    z = jnp.asarray(_features(4, shape=(64,)))
    key = jax.random.key(5)
    u = np.asarray(jax.random.uniform(key, z.shape))
    out = np.asarray(defenses.dropout(key, z, 0.4))
    np.testing.assert_array_equal(out, np.where(u < 0.4, 0.0, np.asarray(z)))


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.29])
def test_topk_sample_scope_keeps_exactly_k_largest(ratio):
    z = _features(6, shape=(5, 37))
    d = 37
    k = d - int(d * ratio)
    out = np.asarray(defenses.topk(jnp.asarray(z), ratio))
    for i in range(5):
        kept = np.flatnonzero(out[i])
        assert kept.size == k
        np.testing.assert_array_equal(np.sort(kept), np.sort(np.argsort(-z[i])[:k]))
        np.testing.assert_array_equal(out[i, kept], z[i, kept])


def test_topk_ties_keep_exactly_k_lower_index_first():
    row = np.array([0.5, 0.2, 0.5, 0.9, 0.5, 0.1], np.float32)
    z = np.stack([row, row[::-1].copy()])
    out = np.asarray(defenses.topk(jnp.asarray(z), 0.5))  # zero int(6·0.5) = 3, keep 3
    assert (out != 0).sum(axis=1).tolist() == [3, 3]
    np.testing.assert_array_equal(out[0], _np_keep_largest(z[0], 3))
    np.testing.assert_array_equal(out[1], _np_keep_largest(z[1], 3))
    np.testing.assert_array_equal(out[0], np.array([0.5, 0, 0.5, 0.9, 0, 0], np.float32))


def test_topk_multidim_sample_scope():
    z = _features(7, shape=(3, 4, 4, 2))
    out = np.asarray(defenses.topk(jnp.asarray(z), 0.25))
    for i in range(3):
        flat = z[i].ravel()
        np.testing.assert_array_equal(out[i].ravel(), _np_keep_largest(flat, int(32 * 0.25)))


def test_topk_batch_scope_matches_reference():
    z = _features(8, shape=(4, 3, 3, 2))
    ratio = 0.45
    # the reference: flatten the batch tensor, zero the int(numel·ratio) smallest
    flat = z.ravel().copy()
    flat[np.argsort(flat)[: int(flat.size * ratio)]] = 0.0
    out = np.asarray(defenses.topk(jnp.asarray(z), ratio, scope="batch"))
    np.testing.assert_array_equal(out, flat.reshape(z.shape))
    # per-sample counts vary under the batch scope (the test data make them differ)
    assert len(set((out.reshape(4, -1) != 0).sum(axis=1).tolist())) > 1


def test_topk_gradient_passes_kept_entries_only():
    z = jnp.asarray(_features(9, shape=(2, 10)))
    g = jax.grad(lambda v: jnp.sum(defenses.topk(v, 0.4) * 3.0))(z)
    np.testing.assert_array_equal(
        np.asarray(g), np.where(np.asarray(defenses.topk(z, 0.4)) != 0, 3.0, 0.0)
    )


def test_determinism_and_key_dependence():
    z = jnp.asarray(_features(10))
    d = make_defense("cem_dropout")
    k1, k2 = jax.random.key(11), jax.random.key(12)
    for fn in (
        lambda k: defenses.gaussian_noise(k, z, 0.1),
        lambda k: defenses.dropout(k, z, 0.3),
        lambda k: d.obfuscate(k, z),
    ):
        np.testing.assert_array_equal(fn(k1), fn(k1))
        assert not np.array_equal(fn(k1), fn(k2))


def test_obfuscate_order_matches_numpy_composition():
    z = _features(13, shape=(3, 4, 4, 2))
    d = Defense(sigma=0.1, dropout_ratio=0.3, topk_ratio=0.4)
    key = jax.random.key(14)
    k_noise, k_drop = jax.random.split(key)
    noise = np.asarray(jax.random.normal(k_noise, z.shape, jnp.float32))
    u = np.asarray(jax.random.uniform(k_drop, z.shape))
    z1 = z + np.float32(0.1) * noise
    z2 = np.where(u < 0.3, np.float32(0.0), z1)
    expected = np.stack([_np_keep_largest(s.ravel(), int(32 * 0.4)).reshape(s.shape) for s in z2])
    out = np.asarray(d.obfuscate(key, jnp.asarray(z)))
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-7)
    # another order (top-k first, then noise and dropout) gives something else: the test has teeth
    zt = np.stack([_np_keep_largest(s.ravel(), int(32 * 0.4)).reshape(s.shape) for s in z])
    wrong = np.where(u < 0.3, 0.0, zt + np.float32(0.1) * noise)
    assert not np.allclose(out, wrong, atol=1e-3)


def test_obfuscate_off_is_identity_and_switches_are_independent():
    z = jnp.asarray(_features(15))
    key = jax.random.key(16)
    np.testing.assert_array_equal(make_defense("none").obfuscate(key, z), z)
    # turning dropout off does not change the noise draw
    noisy = make_defense("noise").obfuscate(key, z)
    both = make_defense("cem_dropout").obfuscate(key, z)
    kept = np.asarray(both) != 0
    np.testing.assert_array_equal(np.asarray(both)[kept], np.asarray(noisy)[kept])


# ------------------------------------------------------------------------------------------------
# distance correlation
# ------------------------------------------------------------------------------------------------
def _np_dcor_loops(x: np.ndarray, z: np.ndarray, eps: float) -> float:
    """Biased sample dCor (Székely), explicit double loops; eps = 0 is the textbook estimator."""
    n = x.shape[0]
    x = x.reshape(n, -1).astype(np.float64)
    z = z.reshape(n, -1).astype(np.float64)

    def dist(v):
        d = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                sq = float(np.sum((v[i] - v[j]) ** 2))
                d[i, j] = math.sqrt(max(sq, eps)) if eps else math.sqrt(sq)
        return d

    def center(d):
        c = np.zeros((n, n))
        row = [sum(d[i, j] for j in range(n)) / n for i in range(n)]
        col = [sum(d[i, j] for i in range(n)) / n for j in range(n)]
        tot = sum(row) / n
        for i in range(n):
            for j in range(n):
                c[i, j] = d[i, j] - row[i] - col[j] + tot
        return c

    a, b = center(dist(x)), center(dist(z))
    v_xz = sum(a[i, j] * b[i, j] for i in range(n) for j in range(n)) / n**2
    v_x = sum(a[i, j] ** 2 for i in range(n) for j in range(n)) / n**2
    v_z = sum(b[i, j] ** 2 for i in range(n) for j in range(n)) / n**2
    if not eps:
        return math.sqrt(v_xz / math.sqrt(v_x * v_z))
    dcov, dvx, dvz = math.sqrt(eps + v_xz), math.sqrt(eps + v_x), math.sqrt(eps + v_z)
    return dcov / (math.sqrt(eps + dvx * dvz) + eps)


def test_distance_correlation_matches_numpy_loops():
    rng = np.random.default_rng(17)
    x = rng.normal(size=(12, 3, 2, 2)).astype(np.float32)
    z = (np.tanh(x.reshape(12, -1)[:, :5]) + 0.5 * rng.normal(size=(12, 5))).astype(np.float32)
    got = float(defenses.distance_correlation(jnp.asarray(x), jnp.asarray(z)))
    assert got == pytest.approx(_np_dcor_loops(x, z, EPS), rel=1e-4)
    assert got == pytest.approx(_np_dcor_loops(x, z, 0.0), rel=2e-3)  # the stabiliser is tiny
    assert 0.2 < got < 0.99


@pytest.mark.parametrize("scale,shift", [(2.5, 0.7), (-0.4, 3.0), (1.0, 0.0)])
def test_distance_correlation_of_affine_map_is_one(scale, shift):
    x = np.random.default_rng(18).normal(size=(64, 10)).astype(np.float32)
    got = float(defenses.distance_correlation(jnp.asarray(x), jnp.asarray(scale * x + shift)))
    assert got == pytest.approx(1.0, abs=1e-3)


def test_distance_correlation_independent_is_small_dependent_is_large():
    rng = np.random.default_rng(19)

    def dcor(a, b):
        return float(defenses.distance_correlation(jnp.asarray(a), jnp.asarray(b)))

    x = rng.normal(size=(2000, 5)).astype(np.float32)
    z_ind = rng.normal(size=(2000, 3)).astype(np.float32)
    z_dep = (x[:, :3] ** 2).astype(np.float32)  # uncorrelated with x, but dependent
    small_500, small_2000 = dcor(x[:500], z_ind[:500]), dcor(x, z_ind)
    # the biased estimator of independent samples decays like n^(-1/2) towards 0
    assert small_2000 < 0.1
    assert 1.4 < small_500 / small_2000 < 2.8
    assert dcor(x, z_dep) > 0.25  # ≈ 0.31


def test_distance_correlation_is_differentiable_at_identical_inputs():
    x = jnp.asarray(np.random.default_rng(20).normal(size=(8, 6)).astype(np.float32))
    z = jnp.zeros((8, 4))  # all pairwise distances 0: the stabilisers keep the gradient finite
    g = jax.grad(lambda v: defenses.distance_correlation(x, v))(z)
    assert np.all(np.isfinite(np.asarray(g)))


def test_ssim_penalty_hinge():
    s = np.array([-0.2, 0.3, 0.5, 0.55, 0.9], np.float32)
    np.testing.assert_allclose(
        defenses.ssim_penalty(s, alpha=0.3, threshold=0.5),
        0.3 * np.maximum(0.0, s - 0.5),
        rtol=1e-6,
    )
    for thr in (0.0, -1.0):
        np.testing.assert_allclose(
            defenses.ssim_penalty(s, alpha=0.3, threshold=thr), 0.3 * s, rtol=1e-6
        )
    d = make_defense("adversarial")
    np.testing.assert_allclose(d.adversarial_penalty(s), 0.3 * np.maximum(0.0, s - 0.5), rtol=1e-6)
    np.testing.assert_array_equal(make_defense("noise").adversarial_penalty(s), np.zeros(5))


def test_nopeek_loss_weighting():
    rng = np.random.default_rng(21)
    x, z = rng.normal(size=(10, 7)), rng.normal(size=(10, 3))
    d = make_defense("nopeek")
    expected = d.nopeek_alpha * _np_dcor_loops(x, z, EPS)
    assert float(d.nopeek_loss(jnp.asarray(x), jnp.asarray(z))) == pytest.approx(expected, rel=1e-4)
    assert float(make_defense("noise").nopeek_loss(jnp.asarray(x), jnp.asarray(z))) == 0.0


# ------------------------------------------------------------------------------------------------
# one trace per configuration
# ------------------------------------------------------------------------------------------------
def test_each_function_traces_once_per_configuration():
    z1, z2 = jnp.asarray(_features(22)), jnp.asarray(_features(23))
    k1, k2 = jax.random.key(1), jax.random.key(2)

    noise = jax.jit(chex.assert_max_traces(defenses.gaussian_noise, n=1))
    noise(k1, z1, 0.1)
    noise(k2, z2, 0.2)  # sigma is traced: no retrace

    drop = jax.jit(chex.assert_max_traces(defenses.dropout, n=1), static_argnames="rescale")
    drop(k1, z1, 0.2)
    drop(k2, z2, 0.5)

    top = jax.jit(chex.assert_max_traces(defenses.topk, n=1), static_argnames=("ratio", "scope"))
    top(z1, ratio=0.5)
    top(z2, ratio=0.5)

    dcor = jax.jit(chex.assert_max_traces(defenses.distance_correlation, n=1))
    dcor(z1, z2)
    dcor(z2, z1)

    obf = jax.jit(chex.assert_max_traces(Defense.obfuscate, n=1), static_argnums=0)
    d = make_defense("cem_topk")
    obf(d, k1, z1)
    obf(d, k2, z2)
    obf(dataclasses.replace(d), k1, z2)  # an equal Defense hits the cache


# ------------------------------------------------------------------------------------------------
# registry and validation
# ------------------------------------------------------------------------------------------------
def test_registry_names_and_presets_validate():
    assert list(defenses.DEFENSES) == [
        "none",
        "noise",
        "cem_noise",
        "dropout",
        "cem_dropout",
        "topk",
        "cem_topk",
        "nopeek",
        "cem_nopeek",
        "adversarial",
        "cem_adversarial",
    ]
    for name in defenses.DEFENSES:
        d = make_defense(name)
        d.validate()
        assert d.name == name
        if name.startswith("cem_"):
            base = make_defense(name.removeprefix("cem_"))
            assert d.cem and d.sigma > 0 and d.lambd > 0
            # cem_X = noise + X + CEM
            plain = dataclasses.replace(d, name=base.name, sigma=0.0, cem=False, lambd=0.0)
            assert plain == dataclasses.replace(base, sigma=0.0)
        else:
            assert not d.cem and d.lambd == 0
            assert d.sigma == (0.1 if name == "noise" else 0.0)


def test_make_defense_overrides_and_none_defaults():
    d = make_defense("cem_noise", sigma=0.05, lambd=None, topk_ratio=None)
    assert (d.sigma, d.lambd, d.topk_ratio) == (0.05, defenses.DEFAULT_LAMBDA, 0.0)
    assert make_defense("topk", topk_scope="batch").topk_scope == "batch"


def test_make_defense_typo_suggests_closest():
    with pytest.raises(ValueError, match=r"did you mean 'cem_noise'") as e:
        make_defense("cem_nosie")
    for name in defenses.DEFENSES:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="Accepted: none, noise"):
        make_defense("zzzzzz")
    with pytest.raises(ValueError, match="sigmaa: not a defense field"):
        make_defense("noise", sigmaa=0.1)


@pytest.mark.parametrize(
    "name,overrides,match",
    [
        ("dropout", {"dropout_ratio": 1.0}, "dropout_ratio=1.0"),
        ("dropout", {"dropout_ratio": -0.1}, "dropout_ratio=-0.1"),
        ("topk", {"topk_ratio": 1.5}, "topk_ratio=1.5"),
        ("topk", {"topk_scope": "global"}, "topk_scope='global'"),
        ("noise", {"sigma": -0.1}, "sigma=-0.1"),
        ("noise", {"sigma": float("nan")}, "sigma=nan"),
        ("nopeek", {"nopeek_alpha": -1.0}, "nopeek_alpha=-1.0"),
        ("adversarial", {"adversarial_alpha": -0.3}, "adversarial_alpha=-0.3"),
        ("adversarial", {"ssim_threshold": 1.0}, "ssim_threshold=1.0"),
        ("cem_noise", {"sigma": 0.0}, "CEM needs Gaussian noise"),
        ("cem_noise", {"lambd": -1.0}, "lambd=-1.0"),
        ("noise", {"lambd": 8.0}, "only a CEM defense"),
        ("noise", {"cem": "yes"}, "cem='yes'"),
        ("noise", {"sigma": "0.1"}, "sigma='0.1'"),
    ],
)
def test_bad_values_raise(name, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_defense(name, **overrides)


def test_bad_function_arguments_raise_before_tracing():
    z = jnp.asarray(_features(24))
    with pytest.raises(ValueError, match="ratio=1.2"):
        defenses.dropout(jax.random.key(0), z, 1.2)
    with pytest.raises(ValueError, match="ratio=1.0"):
        defenses.topk(z, 1.0)
    with pytest.raises(ValueError, match="scope='rows'"):
        defenses.topk(z, 0.5, scope="rows")
    with pytest.raises(ValueError, match="sigma=-1"):
        defenses.gaussian_noise(jax.random.key(0), z, -1)
    with pytest.raises(ValueError, match="same B"):
        defenses.distance_correlation(z, z[:2])
    with pytest.raises(ValueError, match="B >= 2"):
        defenses.distance_correlation(z[:1], z[:1])
