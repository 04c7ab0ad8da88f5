"""Obfuscation defenses and defense losses (reference §3), and the defense registry.

Pure, jittable functions with explicit keys:

* :func:`gaussian_noise` — ``z + σ·ε`` (reference §3.1; σ is a standard deviation);
* :func:`dropout` — zero each entry with probability ``ratio``, **no** ``1/(1−ratio)`` rescaling by
  default, as the reference (§3.5);
* :func:`topk` — keep the largest entries, zero the ``int(numel·ratio)`` smallest (§3.6), per sample
  (default) or over the whole batch tensor as the reference;
* :func:`distance_correlation` — NoPeek's biased sample distance correlation (§3.7);
* :func:`ssim_penalty` — the adversarial (local-decoder) defense's hinge on the decoder's SSIM (§3.3).

A :class:`Defense` bundles the settings of one run; :meth:`Defense.obfuscate` applies noise, then
dropout, then top-k (the reference's order, §3.11) and is what the server, the evaluation and the
attacker all see. :data:`DEFENSES` holds the named presets and :func:`make_defense` builds one.

Presets (``make_defense(name)``; every field can be overridden):

==================  ======  ========  =====  ======  ===========  ====  ======
name                sigma   dropout   top-k  NoPeek  adversarial  CEM   λ
==================  ======  ========  =====  ======  ===========  ====  ======
``none``            0       –         –      –       –            –     –
``noise``           0.1     –         –      –       –            –     –
``cem_noise``       0.1     –         –      –       –            yes   0.32
``dropout``         0       0.2       –      –       –            –     –
``cem_dropout``     0.1     0.2       –      –       –            yes   0.32
``topk``            0       –         0.5    –       –            –     –
``cem_topk``        0.1     –         0.5    –       –            yes   0.32
``nopeek``          0       –         –      0.3     –            –     –
``cem_nopeek``      0.1     –         –      0.3     –            yes   0.32
``adversarial``     0       –         –      –       0.3 (0.5)    –     –
``cem_adversarial`` 0.1     –         –      –       0.3 (0.5)    yes   0.32
==================  ======  ========  =====  ======  ===========  ====  ======

(adversarial: α, with the SSIM threshold in brackets.) Why these values:

* σ = 0.1: the middle of the reference's sweep ``0.01 0.025 0.05 0.1 0.15`` and the σ at which its
  hinge threshold τσ² = 1.25e-3 starts to matter. A non-CEM preset is the pure defense (σ = 0); a
  ``cem_X`` preset is noise(σ) + X + CEM, as the paper combines them (CEM needs σ > 0).
* dropout 0.2: the reference's ``dropout0.2`` (run_exp.sh). Top-k 0.5: the default ratio of the
  reference's ``prune_defense``. NoPeek α = 0.3: the reference weights NoPeek by
  ``0.1·α₁·10 = α₁`` on CIFAR-10 with α₁ the AT strength, which run_exp.sh sets to 0.3.
  Adversarial α = 0.3, threshold 0.5: run_exp.sh.
* λ = 0.32 under the run's default loss, the official hinge (``cem_mode="reference"``) with its
  ``λ·lr₀/lr`` schedule (``lambda_schedule="inverse_lr"``): the official code's λ = 16 times its
  hidden ``0.001/lr`` factor at lr 0.05, rising ×5 at each learning-rate decay. The frontier study
  chose it (docs/default_cem_loss.md): of six variants at σ = 0.1, 3 seeds each, it led the
  previous default (the paper's Gaussian-mixture bound at a constant λ 1) by the most at equal
  accuracy, beyond twice the spread of its paired seeds. With ``cem_mode="gmm"`` and a constant λ
  (DESIGN §6: λ multiplies ``L_C`` directly) pass ``lambd`` explicitly: λ 1 keeps ``λ·L_C``
  (≈ 0.3–0.9 per class at σ = 0.1) on the scale of the cross-entropy, λ 3 gave as much attack
  error as the official loss in the study.

>>> d = make_defense("cem_dropout", sigma=0.05)
>>> d.sigma, d.dropout_ratio, d.cem, d.lambd
(0.05, 0.2, True, 0.32)
>>> make_defense("cem_nosie")
Traceback (most recent call last):
...
ValueError: defense 'cem_nosie' is unknown; did you mean 'cem_noise'? Accepted: none, noise, cem_noise, dropout, cem_dropout, topk, cem_topk, nopeek, cem_nopeek, adversarial, cem_adversarial.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: Stabiliser of the reference's NoPeek distance correlation (UT:245-252, 303-324).
DCOR_EPS = 1e-7

TOPK_SCOPES = ("sample", "batch")


# ------------------------------------------------------------------------------------------------
# Pure obfuscations and losses
# ------------------------------------------------------------------------------------------------
def _check_ratio(name: str, ratio: Any) -> None:
    """Raises unless a concrete ``ratio`` is in [0, 1); traced values are not checked."""
    if isinstance(ratio, jax.core.Tracer):
        return
    r = float(np.asarray(ratio))
    if not 0.0 <= r < 1.0:
        raise ValueError(f"{name}={ratio}: accepted 0 <= {name} < 1 (0 turns it off).")


def gaussian_noise(key: jax.Array, z: jax.Array, sigma: float | jax.Array) -> jax.Array:
    """``z + sigma·ε`` with ``ε ~ N(0, I)`` drawn by ``jax.random.normal(key, z.shape, z.dtype)``.

    Args:
      key: PRNG key.
      z: features, any shape (``[B, H, W, C]`` for the split models).
      sigma: noise standard deviation (reference §3.1), >= 0.
    Returns:
      Same shape and dtype as ``z``.
    """
    if not isinstance(sigma, jax.core.Tracer) and not float(np.asarray(sigma)) >= 0:
        raise ValueError(f"sigma={sigma}: accepted a standard deviation >= 0.")
    return z + sigma * jax.random.normal(key, jnp.shape(z), jnp.result_type(z))


def dropout(
    key: jax.Array, z: jax.Array, ratio: float | jax.Array, *, rescale: bool = False
) -> jax.Array:
    """Zeroes each entry independently with probability ``ratio`` (reference §3.5).

    An entry is zeroed where ``jax.random.uniform(key, z.shape) < ratio`` (the reference's mask). The
    reference does **not** rescale the survivors; ``rescale=True`` multiplies them by
    ``1/(1 − ratio)`` (inverted dropout, unbiased in expectation).

    Args:
      key: PRNG key.
      z: features, any shape.
      ratio: drop probability in [0, 1).
      rescale: scale the kept entries by ``1/(1 − ratio)``.
    Returns:
      Same shape and dtype as ``z``.
    """
    _check_ratio("ratio", ratio)
    keep = jax.random.uniform(key, jnp.shape(z)) >= ratio
    kept = z / (1.0 - ratio) if rescale else z
    return jnp.where(keep, kept, jnp.zeros_like(z))


def topk(z: jax.Array, ratio: float, *, scope: str = "sample") -> jax.Array:
    """Keeps the largest entries by value and zeroes the ``int(n·ratio)`` smallest (reference §3.6).

    ``scope="sample"`` (default): per sample, over its ``D = z[0].size`` entries; exactly
    ``k = D − int(D·ratio)`` entries of each sample survive. ``scope="batch"``: the reference's
    behaviour, over all ``n = z.size`` entries of the batch tensor at once (so a sample may keep more
    or fewer than ``k``). Ties at the boundary are broken toward the lower flat index (``lax.top_k``'s
    rule), so the count is always exact. The mask is a constant for the gradient: kept entries pass
    their gradient, zeroed ones pass none.

    Args:
      z: ``[B, ...]`` features.
      ratio: the fraction to zero, a Python float in [0, 1) (static: it sets ``k``).
      scope: ``"sample"`` or ``"batch"``.
    Returns:
      Same shape and dtype as ``z``.
    """
    _check_ratio("ratio", ratio)
    if scope not in TOPK_SCOPES:
        raise ValueError(f"scope={scope!r}: accepted one of {TOPK_SCOPES}.")
    if jnp.ndim(z) < 1:
        raise ValueError(f"z: expected [B, ...] features, got a scalar of shape {jnp.shape(z)}.")
    shape = jnp.shape(z)
    flat = jnp.reshape(z, (shape[0], -1) if scope == "sample" else (1, -1))
    n = flat.shape[1]
    num_zeroed = int(n * float(ratio))  # the reference's int(numel·ratio), same float arithmetic
    if num_zeroed == 0:
        return z
    _, idx = jax.lax.top_k(jax.lax.stop_gradient(flat), n - num_zeroed)
    rows = jnp.arange(flat.shape[0])[:, None]
    mask = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
    return jnp.reshape(jnp.where(mask, flat, jnp.zeros_like(flat)), shape)


def _pairwise_distances(a: jax.Array) -> jax.Array:
    """``sqrt(max(‖a_i − a_j‖², 1e-7))`` ``[B, B]`` via the Gram matrix (the reference's form)."""
    sq = jnp.sum(a * a, axis=1)
    gram = jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.maximum(sq[:, None] - 2.0 * gram + sq[None, :], DCOR_EPS))


def _double_center(d: jax.Array) -> jax.Array:
    return d - d.mean(axis=0, keepdims=True) - d.mean(axis=1, keepdims=True) + d.mean()


def distance_correlation(x: jax.Array, z: jax.Array) -> jax.Array:
    """NoPeek's biased sample distance correlation (Székely) between ``x`` and ``z`` (reference §3.7).

    Both are flattened per sample. With ``a_ij = sqrt(max(‖x_i − x_j‖², ε))`` (same for ``b`` from
    ``z``), ``A``, ``B`` their double-centred matrices and ``n = B``:
    ``dCov = sqrt(ε + ΣAB/n²)``, ``dVar_x = sqrt(ε + ΣA²/n²)``, ``dVar_z = sqrt(ε + ΣB²/n²)`` and
    ``dCor = dCov / (sqrt(ε + dVar_x·dVar_z) + ε)`` with the reference's ``ε = 1e-7`` (so even
    identical inputs are differentiable). ``ΣAB/n²`` is clipped at 0 before the square root (it is
    ≥ 0 in exact arithmetic; the clip only removes rounding). O(B²) memory, one Gram matmul per input.

    Args:
      x: ``[B, ...]`` inputs (the reference uses the normalised images).
      z: ``[B, ...]`` features (pre-noise).
    Returns:
      float32 scalar in [0, 1] (up to the stabilisers).
    """
    xs, zs = jnp.shape(x), jnp.shape(z)
    if len(xs) < 1 or len(zs) < 1 or xs[0] != zs[0]:
        raise ValueError(f"x, z: expected [B, ...] arrays with the same B, got {xs} and {zs}.")
    if xs[0] < 2:
        raise ValueError(f"x: distance correlation needs a batch of B >= 2, got B={xs[0]}.")
    n = xs[0]
    a = _double_center(_pairwise_distances(jnp.reshape(x, (n, -1)).astype(jnp.float32)))
    b = _double_center(_pairwise_distances(jnp.reshape(z, (n, -1)).astype(jnp.float32)))
    n2 = float(n * n)
    dcov = jnp.sqrt(DCOR_EPS + jnp.maximum(jnp.sum(a * b) / n2, 0.0))
    dvar_x = jnp.sqrt(DCOR_EPS + jnp.sum(a * a) / n2)
    dvar_z = jnp.sqrt(DCOR_EPS + jnp.sum(b * b) / n2)
    return dcov / (jnp.sqrt(DCOR_EPS + dvar_x * dvar_z) + DCOR_EPS)


def ssim_penalty(ssim_value: jax.Array, *, alpha: float, threshold: float) -> jax.Array:
    """The adversarial defense's encoder penalty on the local decoder's SSIM (reference §3.3).

    ``alpha·max(0, ssim − threshold)`` when ``threshold > 0``, else ``alpha·ssim``.

    >>> ssim_penalty(jnp.array([0.3, 0.8]), alpha=0.5, threshold=0.5)
    Array([0.  , 0.15], dtype=float32)
    """
    s = jnp.asarray(ssim_value, jnp.float32)
    if threshold > 0:
        return alpha * jnp.maximum(0.0, s - threshold)
    return alpha * s


# ------------------------------------------------------------------------------------------------
# Defense specification and registry
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Defense:
    """One run's defense: obfuscations applied to ``z`` and the loss terms the training loop adds.

    Hashable, so it can be a static argument of ``jax.jit``. Validated on construction (and by
    :meth:`validate`). The training loop reads ``nopeek_alpha`` (adds ``α·dCor(x, z)``),
    ``adversarial_alpha`` / ``ssim_threshold`` (the local-decoder defense, :meth:`adversarial_penalty`)
    and ``cem`` / ``lambd`` (adds ``λ·L_C``); all of them use the pre-noise ``z`` (reference §3.11).
    """

    name: str = "custom"
    sigma: float = 0.0  # Gaussian noise std (0: none)
    dropout_ratio: float = 0.0  # 0: off
    dropout_rescale: bool = False
    topk_ratio: float = 0.0  # 0: off
    topk_scope: str = "sample"
    nopeek_alpha: float = 0.0  # 0: off
    adversarial_alpha: float = 0.0  # 0: off
    ssim_threshold: float = 0.5
    cem: bool = False
    lambd: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first bad field, the value given and what is accepted."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name={self.name!r}: accepted a non-empty string.")
        for field in ("dropout_rescale", "cem"):
            v = getattr(self, field)
            if not isinstance(v, bool | np.bool_):
                raise ValueError(f"{field}={v!r}: accepted True or False.")
        for field in (
            "sigma",
            "dropout_ratio",
            "topk_ratio",
            "nopeek_alpha",
            "adversarial_alpha",
            "ssim_threshold",
            "lambd",
        ):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{field}={v!r}: accepted a finite real number.")
        for field in ("sigma", "nopeek_alpha", "adversarial_alpha", "lambd"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field}={getattr(self, field)}: accepted a value >= 0 (0: off).")
        for field in ("lambd", "sigma", "nopeek_alpha", "adversarial_alpha"):
            v = getattr(self, field)
            if v > MAX_LAMBDA:
                raise ValueError(
                    f"{field}={v:g}: accepted 0 <= {field} <= {MAX_LAMBDA:g}; the loss is computed "
                    "in float32 (largest 3.4e38), where a value this large overflows the loss and "
                    "its gradients."
                )
        for field in ("dropout_ratio", "topk_ratio"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(
                    f"{field}={getattr(self, field)}: accepted 0 (off) or a ratio in (0, 1)."
                )
        if self.topk_scope not in TOPK_SCOPES:
            raise ValueError(f"topk_scope={self.topk_scope!r}: accepted one of {TOPK_SCOPES}.")
        if self.ssim_threshold >= 1.0:
            raise ValueError(
                f"ssim_threshold={self.ssim_threshold}: accepted a value < 1 (<= 0: penalise "
                "α·SSIM without a hinge); SSIM never exceeds 1, so the hinge would never act."
            )
        if self.cem and self.sigma <= 0:
            raise ValueError(
                f"sigma={self.sigma}: CEM needs Gaussian noise; accepted sigma > 0 when cem=True "
                f"(defense {self.name!r})."
            )
        if not self.cem and self.lambd > 0:
            raise ValueError(
                f"lambd={self.lambd}: only a CEM defense (cem=True, the cem_* presets) uses lambd; "
                f"accepted 0 for defense {self.name!r}."
            )

    def obfuscate(self, key: jax.Array, z: jax.Array) -> jax.Array:
        """What leaves the client: noise, then dropout, then top-k (reference §3.11).

        ``key`` is split once, ``k_noise, k_dropout = jax.random.split(key)``, whatever is switched
        on, so turning one obfuscation off does not change the randomness of the other. Used by the
        server (training), the evaluation and the attacker alike.

        Args:
          key: PRNG key.
          z: ``[B, ...]`` client features.
        Returns:
          Same shape and dtype as ``z``.
        """
        k_noise, k_dropout = jax.random.split(key)
        if self.sigma > 0:
            z = gaussian_noise(k_noise, z, self.sigma)
        if self.dropout_ratio > 0:
            z = dropout(k_dropout, z, self.dropout_ratio, rescale=self.dropout_rescale)
        if self.topk_ratio > 0:
            z = topk(z, self.topk_ratio, scope=self.topk_scope)
        return z

    def nopeek_loss(self, x: jax.Array, z: jax.Array) -> jax.Array:
        """``nopeek_alpha·dCor(x, z)`` (0 when NoPeek is off); ``z`` is the pre-noise feature."""
        if self.nopeek_alpha <= 0:
            return jnp.zeros((), jnp.float32)
        return self.nopeek_alpha * distance_correlation(x, z)

    def adversarial_penalty(self, ssim_value: jax.Array) -> jax.Array:
        """:func:`ssim_penalty` with this defense's α and threshold (0 when the defense is off)."""
        if self.adversarial_alpha <= 0:
            return jnp.zeros_like(jnp.asarray(ssim_value, jnp.float32))
        return ssim_penalty(ssim_value, alpha=self.adversarial_alpha, threshold=self.ssim_threshold)


#: Default CEM strength of the cem_* presets (see the module docstring for the choice).
DEFAULT_LAMBDA = 0.32
MAX_LAMBDA = 1e6  # λ·L_C and its gradient stay far inside float32
DEFAULT_SIGMA = 0.1

_CEM = {"sigma": DEFAULT_SIGMA, "cem": True, "lambd": DEFAULT_LAMBDA}
_DROPOUT = {"dropout_ratio": 0.2}
_TOPK = {"topk_ratio": 0.5}
_NOPEEK = {"nopeek_alpha": 0.3}
_ADVERSARIAL = {"adversarial_alpha": 0.3, "ssim_threshold": 0.5}

#: Preset name → default keyword values of :class:`Defense` (see the module docstring's table).
DEFENSES: dict[str, dict[str, Any]] = {
    "none": {},
    "noise": {"sigma": DEFAULT_SIGMA},
    "cem_noise": {**_CEM},
    "dropout": {**_DROPOUT},
    "cem_dropout": {**_CEM, **_DROPOUT},
    "topk": {**_TOPK},
    "cem_topk": {**_CEM, **_TOPK},
    "nopeek": {**_NOPEEK},
    "cem_nopeek": {**_CEM, **_NOPEEK},
    "adversarial": {**_ADVERSARIAL},
    "cem_adversarial": {**_CEM, **_ADVERSARIAL},
}

_FIELDS = tuple(f.name for f in dataclasses.fields(Defense) if f.name != "name")


def describe_presets() -> str:
    """One line listing every preset of :data:`DEFENSES` with its non-default values (for ``--help``).

    >>> describe_presets().split("; ")[:3]
    ['none', 'noise (sigma=0.1)', 'cem_noise (sigma=0.1, cem, lambd=0.32)']
    """
    parts = []
    for name, values in DEFENSES.items():
        items = [k if v is True else f"{k}={v}" for k, v in values.items()]
        parts.append(f"{name} ({', '.join(items)})" if items else name)
    return "; ".join(parts)


def make_defense(name: str, **overrides: Any) -> Defense:
    """The preset ``name`` of :data:`DEFENSES` with ``overrides`` applied (``None`` keeps the default).

    Raises ``ValueError`` for an unknown name (listing all names and suggesting the closest), an
    unknown field, or a bad value (:meth:`Defense.validate`).
    """
    if name not in DEFENSES:
        close = difflib.get_close_matches(str(name), list(DEFENSES), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"defense {name!r} is unknown{hint} Accepted: {', '.join(DEFENSES)}.")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a defense field; accepted: {', '.join(_FIELDS)}.")
    values = {**DEFENSES[name], **{k: v for k, v in overrides.items() if v is not None}}
    return Defense(name=name, **values)
