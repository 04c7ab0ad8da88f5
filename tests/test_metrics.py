"""Tests for cem_jax.metrics against independent NumPy computations."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cem_jax import metrics

C1, C2 = 0.01**2, 0.03**2


def _images(seed: int, shape=(3, 16, 16, 2)) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype(np.float32)


def _np_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    g = np.array([math.exp(-((i - size // 2) ** 2) / (2 * sigma**2)) for i in range(size)])
    g /= g.sum()
    return np.outer(g, g)


def _np_local_stats(a: np.ndarray, b: np.ndarray, w: np.ndarray):
    """Weighted means / variances / covariance of two 2-D patches, written out from the definition."""
    mu_a = float((w * a).sum())
    mu_b = float((w * b).sum())
    var_a = float((w * a * a).sum()) - mu_a**2
    var_b = float((w * b * b).sum()) - mu_b**2
    cov = float((w * a * b).sum()) - mu_a * mu_b
    return mu_a, mu_b, var_a, var_b, cov


def _np_ssim_formula(mu_a, mu_b, var_a, var_b, cov) -> float:
    return ((2 * mu_a * mu_b + C1) * (2 * cov + C2)) / (
        (mu_a**2 + mu_b**2 + C1) * (var_a + var_b + C2)
    )


def _np_ssim_valid(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-image SSIM, 'valid' windows (like dm-pix), explicit loops over images, channels, windows."""
    w = _np_window()
    b, h, wd, c = x.shape
    out = np.zeros(b)
    for n in range(b):
        vals = []
        for ch in range(c):
            for i in range(h - 10):
                for j in range(wd - 10):
                    pa = x[n, i : i + 11, j : j + 11, ch].astype(np.float64)
                    pb = y[n, i : i + 11, j : j + 11, ch].astype(np.float64)
                    vals.append(_np_ssim_formula(*_np_local_stats(pa, pb, w)))
        out[n] = np.mean(vals)
    return out


def _np_ssim_zero_pad_mean(x: np.ndarray, y: np.ndarray) -> float:
    """pytorch_ssim: zero-pad each channel by 5, full-size map, mean over everything."""
    w = _np_window()
    xp = np.pad(x.astype(np.float64), ((0, 0), (5, 5), (5, 5), (0, 0)))
    yp = np.pad(y.astype(np.float64), ((0, 0), (5, 5), (5, 5), (0, 0)))
    b, h, wd, c = x.shape
    vals = []
    for n in range(b):
        for ch in range(c):
            for i in range(h):
                for j in range(wd):
                    pa = xp[n, i : i + 11, j : j + 11, ch]
                    pb = yp[n, i : i + 11, j : j + 11, ch]
                    vals.append(_np_ssim_formula(*_np_local_stats(pa, pb, w)))
    return float(np.mean(vals))


def test_mse_and_psnr_match_numpy():
    x, y = _images(0), _images(1)
    m = ((x.astype(np.float64) - y) ** 2).reshape(3, -1).mean(axis=1)
    np.testing.assert_allclose(metrics.mse(x, y), m, rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(x, y), 10 * np.log10(1.0 / m), rtol=1e-5)
    chex.assert_shape(metrics.mse(x, y), (3,))


def test_psnr_of_identical_images_is_the_cap():
    x = _images(2)
    np.testing.assert_array_equal(metrics.psnr(x, x), np.full(3, metrics.PSNR_CAP_DB, np.float32))
    # a tiny but nonzero error stays below the cap and is never above it
    assert float(metrics.psnr(x, x + 1e-3)[0]) == pytest.approx(60.0, abs=1e-2)


def test_ssim_of_identical_images_is_one():
    x = _images(3)
    np.testing.assert_allclose(metrics.ssim(x, x), np.ones(3), atol=1e-5)


def test_ssim_of_shifted_copy_matches_numpy():
    x = _images(4, shape=(2, 13, 14, 1)) * 0.8
    y = x + 0.15  # constant shift: structure identical, luminance term < 1
    expected = _np_ssim_valid(x, y)
    assert np.all(expected < 0.999)  # the shift does lower SSIM: the test is not trivial
    np.testing.assert_allclose(metrics.ssim(x, y), expected, rtol=1e-4, atol=1e-5)


def test_ssim_of_random_pair_matches_numpy():
    x, y = _images(5, shape=(2, 12, 13, 2)), _images(6, shape=(2, 12, 13, 2))
    np.testing.assert_allclose(metrics.ssim(x, y), _np_ssim_valid(x, y), rtol=1e-4, atol=1e-5)


def test_reference_metrics_match_numpy_zero_padded():
    x = _images(7, shape=(2, 12, 12, 3))
    y = np.clip(x + np.random.default_rng(8).normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    ref = metrics.reference_mse_psnr_ssim(x, y)
    batch_mse = float(((x.astype(np.float64) - y) ** 2).mean())
    np.testing.assert_allclose(ref["mse"], batch_mse, rtol=1e-5)
    np.testing.assert_allclose(ref["psnr"], 10 * np.log10(1 / batch_mse), rtol=1e-5)
    np.testing.assert_allclose(ref["ssim"], _np_ssim_zero_pad_mean(x, y), rtol=1e-4, atol=1e-5)
    per_image = metrics.reference_ssim(x, y)
    chex.assert_shape(per_image, (2,))
    np.testing.assert_allclose(
        per_image[1], _np_ssim_zero_pad_mean(x[1:], y[1:]), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(jnp.mean(per_image), ref["ssim"], rtol=1e-5)
    # the reference PSNR (of the batch MSE) differs from the mean of per-image PSNRs
    assert float(ref["psnr"]) <= float(jnp.mean(metrics.psnr(x, y))) + 1e-4


def test_reference_ssim_identical_is_one_and_differs_from_valid_mode():
    x = _images(9, shape=(2, 12, 12, 1))
    np.testing.assert_allclose(metrics.reference_mse_psnr_ssim(x, x)["ssim"], 1.0, atol=1e-5)
    y = np.clip(x + 0.2, 0, 1)
    assert (
        abs(float(metrics.reference_mse_psnr_ssim(x, y)["ssim"]) - float(metrics.ssim(x, y).mean()))
        > 1e-3
    )


def test_accuracy_by_hand():
    logits = np.array([[0.0, 1.0, 0.5], [3.0, 1.0, 0.0], [0.1, 0.2, 0.3], [1.0, 0.0, 0.0]])
    labels = np.array([1, 0, 0, 2])
    assert float(metrics.accuracy(logits, labels)) == pytest.approx(0.5)


def test_metrics_jit_and_trace_once():
    f = jax.jit(chex.assert_max_traces(lambda a, b: (metrics.mse(a, b), metrics.ssim(a, b)), n=1))
    f(_images(10), _images(11))
    f(_images(12), _images(13))


@pytest.mark.parametrize(
    "fn,args,match",
    [
        (metrics.mse, (np.zeros((2, 8, 8)), np.zeros((2, 8, 8))), "x: expected images"),
        (
            metrics.mse,
            (np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 1))),
            "y: expected the same shape",
        ),
        (metrics.ssim, (np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3))), "smaller than the 11"),
        (metrics.accuracy, (np.zeros((4, 3)), np.zeros((5,), int)), "labels"),
        (metrics.accuracy, (np.zeros((4,)), np.zeros((4,), int)), "logits"),
    ],
)
def test_bad_input_raises(fn, args, match):
    with pytest.raises(ValueError, match=match):
        fn(*args)


def test_accumulator_weighted_means():
    acc = metrics.MetricAccumulator()
    per_image = [np.array([1.0, 2.0, 3.0]), np.array([10.0])]
    for v in per_image:
        acc.update({"mse": jnp.asarray(v)})
    acc.update({"ref": 2.0}, weight=3)
    acc.update({"ref": 10.0}, weight=1)
    means, counts = acc.means(), acc.counts()
    assert means["mse"] == pytest.approx(np.concatenate(per_image).mean())
    assert counts["mse"] == 4
    assert means["ref"] == pytest.approx((2.0 * 3 + 10.0) / 4)
    assert counts["ref"] == 4
    with pytest.raises(ValueError, match="weight"):
        acc.update({"mse": np.ones(2)}, weight=2)
    with pytest.raises(ValueError, match="metrics"):
        acc.update({"bad": np.ones((2, 2))})
    acc.reset()
    assert acc.means() == {}
