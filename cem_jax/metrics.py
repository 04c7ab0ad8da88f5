"""Image-reconstruction and classification metrics (DESIGN §2.5, reference §6.4).

Two conventions live here side by side:

* **Per-image** (our default, what :class:`MetricAccumulator` averages): :func:`mse`, :func:`psnr` and
  :func:`ssim` return one value per image ``[B]``; a dataset figure is the mean over images. PSNR is
  therefore the mean of per-image PSNRs and SSIM is dm-pix's (``'valid'`` 11×11 Gaussian window,
  σ = 1.5, k1 = 0.01, k2 = 0.03, peak 1).
* **Reference** (the official code, reference §6.4): :func:`reference_mse_psnr_ssim` returns, for one
  batch, the MSE over the whole batch, the PSNR *of that batch MSE*, and pytorch_ssim's SSIM (same
  window, but **zero padding 5**, no variance clipping) averaged over every pixel of every image and
  channel. The reference then weights the per-batch values by the batch size; feed them to
  :meth:`MetricAccumulator.update` with ``weight=batch_size`` to reproduce its table figures.

All images are ``[B, H, W, C]`` (NHWC) floats in ``[0, 1]``.

>>> import jax.numpy as jnp
>>> x = jnp.zeros((2, 16, 16, 3)); y = x.at[1].set(0.5)
>>> mse(x, y)
Array([0.  , 0.25], dtype=float32)
>>> psnr(x, y).round(2)  # identical images are capped at PSNR_CAP_DB
Array([100.  ,   6.02], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

#: PSNR reported for identical images (MSE = 0) and the ceiling of every PSNR value, in dB. It is the
#: PSNR of an MSE of 1e-10, far beyond anything an 8-bit image can resolve (~ 1/(255²·12) ≈ 1.3e-6).
PSNR_CAP_DB = 100.0
_MSE_FLOOR = 10.0 ** (-PSNR_CAP_DB / 10.0)

# SSIM constants shared by dm-pix and pytorch_ssim (peak 1).
SSIM_FILTER_SIZE = 11
SSIM_FILTER_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_images(x: Any, y: Any, *, min_side: int = 1) -> None:
    """Raises ValueError unless ``x`` and ``y`` are equal-shape ``[B, H, W, C]`` arrays."""
    xs, ys = np.shape(x), np.shape(y)
    if len(xs) != 4:
        raise ValueError(f"x: expected images [B, H, W, C] (rank 4), got shape {xs}.")
    if ys != xs:
        raise ValueError(f"y: expected the same shape as x {xs}, got {ys}.")
    if min(xs[1], xs[2]) < min_side:
        raise ValueError(
            f"x: images of {xs[1]}×{xs[2]} pixels are smaller than the {min_side}×{min_side} SSIM "
            f"window; accepted: H, W >= {min_side}."
        )


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image mean squared error.

    Args:
      x, y: ``[B, H, W, C]`` images in ``[0, 1]``.
    Returns:
      ``[B]`` float32: ``mean_{h,w,c} (x − y)²`` of each image.
    """
    _check_images(x, y)
    d = jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32)
    return jnp.mean(d * d, axis=(1, 2, 3))


def _psnr_from_mse(m: jax.Array) -> jax.Array:
    """``10·log10(1/m)`` with peak 1, capped at :data:`PSNR_CAP_DB` (m = 0 gives the cap)."""
    return -10.0 * jnp.log10(jnp.maximum(m, _MSE_FLOOR))


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR in dB with peak 1: ``10·log10(1 / mse_i)``.

    Identical images (MSE 0) give :data:`PSNR_CAP_DB` (100 dB) instead of infinity, and no value
    exceeds it, so means over a dataset stay finite.

    Args:
      x, y: ``[B, H, W, C]`` images in ``[0, 1]``.
    Returns:
      ``[B]`` float32.
    """
    return _psnr_from_mse(mse(x, y))


def ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image SSIM through ``dm_pix.ssim``.

    11×11 Gaussian window (σ = 1.5), k1 = 0.01, k2 = 0.03, ``max_val`` = 1, ``'valid'`` filtering
    (no padding: the map is ``(H−10)×(W−10)``), averaged over the map and the channels.

    Args:
      x, y: ``[B, H, W, C]`` images in ``[0, 1]`` with ``H, W >= 11``.
    Returns:
      ``[B]`` float32 in ``[-1, 1]``; 1 for identical images.
    """
    _check_images(x, y, min_side=SSIM_FILTER_SIZE)
    return dm_pix.ssim(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(y, jnp.float32),
        max_val=1.0,
        filter_size=SSIM_FILTER_SIZE,
        filter_sigma=SSIM_FILTER_SIGMA,
        k1=SSIM_K1,
        k2=SSIM_K2,
    )


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Top-1 accuracy: the fraction of ``argmax(logits) == labels``.

    Args:
      logits: ``[B, num_classes]``.
      labels: ``[B]`` integer class ids.
    Returns:
      float32 scalar in ``[0, 1]``.

    >>> accuracy(jnp.array([[0.1, 0.9], [2.0, 1.0], [0.0, 1.0]]), jnp.array([1, 1, 1]))
    Array(0.6666667, dtype=float32)
    """
    ls, ys = np.shape(logits), np.shape(labels)
    if len(ls) != 2:
        raise ValueError(f"logits: expected shape [B, num_classes], got {ls}.")
    if ys != ls[:1]:
        raise ValueError(f"labels: expected shape ({ls[0]},) to match logits {ls}, got {ys}.")
    correct = jnp.argmax(logits, axis=-1) == jnp.asarray(labels)
    return jnp.mean(correct.astype(jnp.float32))


def _gaussian_window_2d(size: int, sigma: float) -> np.ndarray:
    """pytorch_ssim's window: outer product of the normalised 1-D Gaussian centred at ``size//2``."""
    g = np.exp(-((np.arange(size) - size // 2) ** 2) / (2.0 * sigma**2))
    g = g / g.sum()
    return np.outer(g, g).astype(np.float32)


def _ssim_map_zero_pad(x: jax.Array, y: jax.Array) -> jax.Array:
    """pytorch_ssim's SSIM map ``[B, H, W, C]``: depthwise Gaussian conv with zero padding 5."""
    c = x.shape[-1]
    w = _gaussian_window_2d(SSIM_FILTER_SIZE, SSIM_FILTER_SIGMA)
    kernel = jnp.asarray(np.tile(w[:, :, None, None], (1, 1, 1, c)))  # HWIO, I = 1 (depthwise)
    pad = SSIM_FILTER_SIZE // 2

    def blur(a: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            a,
            kernel,
            window_strides=(1, 1),
            padding=((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
            precision=jax.lax.Precision.HIGHEST,
        )

    mu1, mu2 = blur(x), blur(y)
    mu1_sq, mu2_sq, mu12 = mu1 * mu1, mu2 * mu2, mu1 * mu2
    s1 = blur(x * x) - mu1_sq
    s2 = blur(y * y) - mu2_sq
    s12 = blur(x * y) - mu12
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    return ((2 * mu12 + c1) * (2 * s12 + c2)) / ((mu1_sq + mu2_sq + c1) * (s1 + s2 + c2))


def reference_ssim(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image pytorch_ssim SSIM (zero padding 5, no clipping), ``[B]``.

    The mean over images equals ``reference_mse_psnr_ssim(x, y)["ssim"]`` (all images have the same
    size), so batch-size-weighted means of either agree.

    Args:
      x, y: ``[B, H, W, C]`` images in ``[0, 1]``.
    Returns:
      ``[B]`` float32; 1 for identical images.
    """
    _check_images(x, y)
    m = _ssim_map_zero_pad(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32))
    return jnp.mean(m, axis=(1, 2, 3))


def reference_mse_psnr_ssim(x: jax.Array, y: jax.Array) -> dict[str, jax.Array]:
    """The reference code's per-batch figures (reference §6.4), as float32 scalars.

    * ``"mse"``: ``mean((x − y)²)`` over the whole batch ``B×H×W×C``;
    * ``"psnr"``: ``10·log10(1 / mse)`` of that batch MSE (capped like :func:`psnr`), *not* the mean
      of per-image PSNRs;
    * ``"ssim"``: pytorch_ssim — 11×11 Gaussian window (σ = 1.5) applied per channel with **zero
      padding 5**, C1 = 0.01², C2 = 0.03², no clipping — averaged over ``B, H, W, C``.

    The reference averages these over batches weighted by batch size (use
    ``MetricAccumulator.update(..., weight=B)``).

    Args:
      x, y: ``[B, H, W, C]`` images in ``[0, 1]``.
    Returns:
      ``{"mse", "psnr", "ssim"}`` → scalar.
    """
    _check_images(x, y)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    batch_mse = jnp.mean((x - y) ** 2)
    return {
        "mse": batch_mse,
        "psnr": _psnr_from_mse(batch_mse),
        "ssim": jnp.mean(_ssim_map_zero_pad(x, y)),
    }


class MetricAccumulator:
    """Host-side running means of metrics over batches.

    ``update`` takes a mapping of name → value. A 1-D value (per-image metrics, ``[B]``) adds its sum
    and its length; a scalar adds ``value·weight`` and ``weight`` (``weight`` defaults to 1; pass the
    batch size to get the reference's batch-size-weighted means). Values are pulled to the host
    (NumPy float64) so long evaluations don't lose precision.

    >>> acc = MetricAccumulator()
    >>> acc.update({"mse": jnp.array([1.0, 3.0])})
    >>> acc.update({"mse": jnp.array([5.0])})
    >>> acc.update({"ref_mse": 0.5}, weight=4)
    >>> acc.means()
    {'mse': 3.0, 'ref_mse': 0.5}
    >>> acc.counts()
    {'mse': 3.0, 'ref_mse': 4.0}
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, float] = {}

    def update(self, metrics: Mapping[str, Any], *, weight: float | None = None) -> None:
        """Adds one batch of metrics (see the class docstring for 1-D vs scalar values)."""
        if weight is not None and not weight >= 0:
            raise ValueError(f"weight: expected a number >= 0 (e.g. the batch size), got {weight}.")
        for name, value in metrics.items():
            v = np.asarray(jax.device_get(value), dtype=np.float64)
            if v.ndim == 1:
                if weight is not None:
                    raise ValueError(
                        f"weight: only for scalar metrics; {name!r} is per-image with shape "
                        f"{v.shape} and is counted by its length."
                    )
                s, n = float(v.sum()), float(v.size)
            elif v.ndim == 0:
                w = 1.0 if weight is None else float(weight)
                s, n = float(v) * w, w
            else:
                raise ValueError(
                    f"metrics[{name!r}]: expected a scalar or a 1-D per-image array, got shape "
                    f"{v.shape}."
                )
            self._sums[name] = self._sums.get(name, 0.0) + s
            self._counts[name] = self._counts.get(name, 0.0) + n

    def means(self) -> dict[str, float]:
        """Name → weighted mean so far (NaN for a name whose total weight is 0)."""
        return {
            k: (s / self._counts[k] if self._counts[k] else float("nan"))
            for k, s in self._sums.items()
        }

    def counts(self) -> dict[str, float]:
        """Name → total count (images for per-image metrics, total weight for scalars)."""
        return dict(self._counts)

    def reset(self) -> None:
        """Forgets everything."""
        self._sums.clear()
        self._counts.clear()
