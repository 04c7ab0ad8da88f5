"""The mathematics of CEM (DESIGN §1): mixture state, CEM loss, leakage certificate, MSE floor.

Notation: ``ẑ = f(x)`` are the client's clean features, flattened to ``D`` numbers; the server sees
``z = ẑ + σ·ε``. A clustering ``c = (y, k)`` (class ``y``, k-means cluster ``k`` inside the class) with
probabilities ``p_c`` and within-cluster covariances ``Σ_c`` bounds the leakage (Xia et al., CVPR 2025,
arXiv 2503.00383, with the Gaussian maximum-entropy argument of DESIGN §1)::

    I(x; z) ≤ H(c) + ½ Σ_c p_c · log det(I + Σ_c/σ²) ≤ H(c) + ½ Σ_c p_c · Σ_j log(1 + v_cj/σ²)

and the paper's theorem turns a conditional entropy into a floor on any attacker's mean squared error:
``E‖x − x̂(z)‖²/d ≥ exp(2·H(x|z)/d)/(2πe)``.

Typical use (once per epoch :func:`fit_mixture` and :func:`leakage_upper_bound` on the clean training
features, every step ``λ·cem_loss`` added to the task loss):

>>> import jax, jax.numpy as jnp
>>> key_x, key_fit = jax.random.split(jax.random.key(0))
>>> feats = jax.random.uniform(key_x, (64, 4, 4, 2))
>>> labels = jnp.arange(64) % 3
>>> state = fit_mixture(feats, labels, num_classes=3, clusters_per_class=2, key=key_fit)
>>> loss = cem_loss(feats[:16], labels[:16], state, sigma=0.1)
>>> grads = jax.grad(lambda f: cem_loss(f, labels[:16], state, sigma=0.1))(feats[:16])
>>> grads.shape
(16, 4, 4, 2)
>>> bool(leakage_upper_bound(feats, labels, state, sigma=0.1) > 0)
True

Only ``jax`` and :mod:`cem_jax.kmeans` are used: no flax, no optax.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from cem_jax import kmeans

_HIGHEST = lax.Precision.HIGHEST
_MODES = ("gmm", "reference")
_COVARIANCES = ("diagonal", "full")


class MixtureState(NamedTuple):
    """Per-class k-means mixture of the clean training features (a pytree; orbax-checkpointable).

    Attributes:
      centroids: ``[C, K, D]`` float32, the cluster centres.
      weights: ``[C, K]`` float32, ``π``: the fraction of the class's samples in each cluster
        (0 for an empty cluster; each non-empty class sums to 1).
      variances: ``[C, K, D]`` float32, ``v̄``: per-dimension within-cluster variance around the
        centroid (0 for an empty cluster).
      counts: ``[C]`` int32, ``N_class``: the number of training samples of each class.

    >>> s = init_mixture(num_classes=2, clusters_per_class=3, dim=4)
    >>> [x.shape for x in s]
    [(2, 3, 4), (2, 3), (2, 3, 4), (2,)]
    """

    centroids: jax.Array
    weights: jax.Array
    variances: jax.Array
    counts: jax.Array


# --------------------------------------------------------------------------------------------------
# Validation (host side, before tracing)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: accepted a Python int >= 1.")
    return value


def _check_scalar(name: str, value: Any, *, low: float, high: float = math.inf, strict: bool):
    """Checks a concrete scalar against (low, high] (strict) or [low, high]; tracers pass."""
    if not _is_concrete(value):
        return
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} has shape {jnp.shape(value)}: accepted a scalar.")
    v = float(value)
    ok = (v > low if strict else v >= low) and v <= high
    if not ok or math.isnan(v):
        lo = f"> {low}" if strict else f">= {low}"
        hi = "" if high == math.inf else f" and <= {high}"
        raise ValueError(f"{name}={v!r}: accepted a real number {lo}{hi}.")


def _check_state(state: Any) -> tuple[int, int, int]:
    if not isinstance(state, MixtureState):
        raise ValueError(f"state is a {type(state).__name__}: accepted a MixtureState.")
    cs = jnp.shape(state.centroids)
    if len(cs) != 3:
        raise ValueError(f"state.centroids has shape {cs}: accepted [C, K, D].")
    c, k, d = cs
    expected = {"weights": (c, k), "variances": (c, k, d), "counts": (c,)}
    for name, shape in expected.items():
        got = jnp.shape(getattr(state, name))
        if got != shape:
            raise ValueError(
                f"state.{name} has shape {got}: accepted {shape} to match state.centroids {cs}."
            )
    return c, k, d


def _check_features_labels(
    features: Any, labels: Any, num_classes: int, dim: int | None, *, padding: bool = False
):
    fs, ls = jnp.shape(features), jnp.shape(labels)
    if len(fs) < 2 or fs[0] < 1:
        raise ValueError(
            f"features has shape {fs}: accepted [N, ...] with N >= 1 and a feature axis."
        )
    if len(ls) != 1 or ls[0] != fs[0]:
        raise ValueError(
            f"labels has shape {ls}: accepted [N] with N = features.shape[0] = {fs[0]}."
        )
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise ValueError(f"labels has dtype {jnp.result_type(labels)}: accepted an integer dtype.")
    d = math.prod(fs[1:])
    if dim is not None and d != dim:
        raise ValueError(
            f"features has shape {fs}, i.e. D = {d} per example: accepted D = {dim} (the state's "
            "feature dimension, state.centroids.shape[2])."
        )
    if _is_concrete(labels):
        with jax.ensure_compile_time_eval():  # concrete labels captured inside a caller's jit
            lo, hi = int(jnp.min(labels)), int(jnp.max(labels))
        if lo < (kmeans.PAD_LABEL if padding else 0) or hi >= num_classes:
            pad = f", or {kmeans.PAD_LABEL} for a padding row" if padding else ""
            raise ValueError(
                f"labels span [{lo}, {hi}]: accepted values in [0, {num_classes}) "
                f"(num_classes = {num_classes}){pad}."
            )
    return fs[0], d


def _float_dtype(x: Any) -> Any:
    """At least float32 (bfloat16 features are promoted; float64 stays float64 when x64 is on)."""
    return jnp.promote_types(jnp.result_type(x), jnp.float32)


# --------------------------------------------------------------------------------------------------
# Mixture state


def init_mixture(num_classes: int, clusters_per_class: int, dim: int) -> MixtureState:
    """An all-zero :class:`MixtureState` (``π = 0`` everywhere, so :func:`cem_loss` is exactly 0).

    Useful for abstract shapes (checkpoint restore targets, ``jax.eval_shape``) and for the first
    epoch, before any features have been clustered (the reference skips CEM in epoch 1 too).

    >>> init_mixture(10, 5, 8).centroids.shape
    (10, 5, 8)
    """
    c = _check_positive_int("num_classes", num_classes)
    k = _check_positive_int("clusters_per_class", clusters_per_class)
    d = _check_positive_int("dim", dim)
    return MixtureState(
        centroids=jnp.zeros((c, k, d), jnp.float32),
        weights=jnp.zeros((c, k), jnp.float32),
        variances=jnp.zeros((c, k, d), jnp.float32),
        counts=jnp.zeros((c,), jnp.int32),
    )


@jax.jit
def _mixture_from_kmeans(centroids, cluster_sizes, variances):
    """The :class:`MixtureState` of a k-means result: ``[C, K, D], [C, K], [C, K, D]``.

    ``N_c`` is the sum of the class's cluster sizes (every member is in exactly one cluster; padding
    rows in none), so nothing here reads the ``N`` samples again: k-means already returned the
    per-cluster variances.
    """
    counts = jnp.sum(cluster_sizes.astype(jnp.int32), axis=1)  # [C]
    sizes = cluster_sizes.astype(jnp.float32)
    weights = sizes / jnp.maximum(counts, 1).astype(jnp.float32)[:, None]
    return MixtureState(
        centroids=centroids.astype(jnp.float32),
        weights=weights,
        variances=variances.astype(jnp.float32),
        counts=counts,
    )


def fit_mixture(
    features: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    clusters_per_class: int,
    key: jax.Array,
    previous: MixtureState | None = None,
    iterations: int = 50,
) -> MixtureState:
    """Clusters each class's features with k-means and returns the mixture statistics.

    Args:
      features: ``[N, ...]`` clean (pre-noise) features, flattened to ``[N, D]``; may be sharded
        along ``N`` over several devices (k-means then runs sharded, ``method="segments"``).
      labels: ``[N]`` int class labels in ``[0, num_classes)``; ``-1`` marks a padding row (ignored).
      num_classes: ``C``.
      clusters_per_class: ``K``.
      key: PRNG key for the k-means++ seeding (unused when warm-starting).
      previous: warm start from ``previous.centroids`` (the last epoch's state); k-means++ otherwise.
      iterations: Lloyd iterations.

    Returns:
      :class:`MixtureState` with ``π_ck = n_ck / N_c``, ``v̄_ckj = mean_{i∈(c,k)} (ẑ_ij − μ_ckj)²``
      around the returned centroid ``μ_ck`` and ``counts = bincount(labels)``. Empty clusters keep
      their previous centroid and get ``π = 0``, ``v̄ = 0``.

    Called on the host (it sizes a padded per-class layout from the concrete labels); the k-means
    (which returns the variances too) and the statistics are jitted and compile once per shape, and
    the first (k-means++) call and the warm starts after it share the compiled Lloyd steps.

    >>> z = jnp.concatenate([jnp.zeros((4, 2)), jnp.ones((4, 2))])
    >>> s = fit_mixture(z, jnp.zeros(8, jnp.int32), num_classes=1, clusters_per_class=2,
    ...                 key=jax.random.key(0))
    >>> s.weights.tolist(), s.counts.tolist()
    ([[0.5, 0.5]], [8])
    """
    c = _check_positive_int("num_classes", num_classes)
    k = _check_positive_int("clusters_per_class", clusters_per_class)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"iterations={iterations!r}: accepted a Python int >= 0.")
    if not (_is_concrete(features) and _is_concrete(labels)):
        raise ValueError(
            "fit_mixture got traced features/labels: accepted concrete arrays (call it outside "
            "jax.jit; it sizes the per-class layout on the host)."
        )
    n, d = _check_features_labels(features, labels, c, None, padding=True)
    init = None
    if previous is not None:
        pc, pk, pd = _check_state(previous)
        if (pc, pk, pd) != (c, k, d):
            raise ValueError(
                f"previous has (C, K, D) = {(pc, pk, pd)}: accepted {(c, k, d)} from num_classes, "
                "clusters_per_class and the features."
            )
        init = previous.centroids
    z = jnp.asarray(features, jnp.float32).reshape(n, d)
    labels = jnp.asarray(labels, jnp.int32)
    result = kmeans.kmeans_per_class(
        z,
        labels,
        num_classes=c,
        clusters_per_class=k,
        key=key,
        init_centroids=init,
        iterations=iterations,
    )
    return _mixture_from_kmeans(result.centroids, result.cluster_sizes, result.variances)


# --------------------------------------------------------------------------------------------------
# The CEM loss


def _cem_loss_impl(z, labels, centroids, weights, variances, counts, sigma, kappa, tau, gamma,
                   max_blend, *, mode):  # fmt: skip
    """Batch-space CEM loss: no array grows with C (see :func:`cem_loss`)."""
    b = z.shape[0]
    k = centroids.shape[1]
    dtype = z.dtype
    labels = labels.astype(jnp.int32)
    sg = lax.stop_gradient
    # Each sample's own-class quantities, gathered by label: [B, K, D], [B, K], [B, K, D].
    own_centroids = sg(centroids[labels].astype(dtype))
    dist = jnp.sum((sg(z)[:, None, :] - own_centroids) ** 2, axis=-1)  # [B, K]
    assign = jnp.argmin(dist, axis=1)  # nearest centroid of the own class
    centre = jnp.take_along_axis(own_centroids, assign[:, None, None], axis=1)[:, 0]  # [B, D]
    pi = sg(weights[labels, assign].astype(dtype))  # [B]
    vbar = sg(variances[labels, assign].astype(dtype))  # [B, D]
    n_class = sg(counts[labels].astype(dtype))  # [B]

    # Groups (class, cluster) and classes, found with [B, B] equality matrices.
    group = labels * k + assign.astype(jnp.int32)
    same_group = group[:, None] == group[None, :]
    same_class = labels[:, None] == labels[None, :]
    earlier = jnp.arange(b)[None, :] < jnp.arange(b)[:, None]  # [i, j]: j comes before i
    is_first = ~jnp.any(same_group & earlier, axis=1)  # representative of its group
    num_classes_present = jnp.sum(~jnp.any(same_class & earlier, axis=1)).astype(dtype)

    sq = (z - centre) ** 2  # [B, D], differentiable in z
    size = jnp.sum(same_group, axis=1).astype(dtype)  # n: group size in the batch
    batch_var = jnp.matmul(same_group.astype(dtype), sq, precision=_HIGHEST) / size[:, None]

    valid = (pi > 0) & (n_class > 0)
    expected = jnp.where(valid, pi * n_class, 1.0)  # guard: π·N_class = 0 never divides
    mu = jnp.minimum(kappa * size / expected, max_blend)[:, None]
    v = mu * batch_var + (1.0 - mu) * vbar  # [B, D]
    if mode == "gmm":
        per_group = 0.5 * jnp.mean(jnp.log1p(v / sigma**2), axis=1)
    else:
        floor = jnp.log(tau * sigma**2 + gamma)
        per_group = jax.nn.relu(jnp.log(jnp.mean(v, axis=1) + gamma) - floor)
    terms = jnp.where(is_first & valid, pi * per_group, 0.0)
    return jnp.sum(terms) / num_classes_present


_cem_loss_jit = jax.jit(_cem_loss_impl, static_argnames=("mode",))


def cem_loss(
    features: jax.Array,
    labels: jax.Array,
    state: MixtureState,
    *,
    sigma: float | jax.Array,
    mode: str = "gmm",
    kappa: float = 10.0,
    tau: float = 0.125,
    gamma: float = 0.01,
    max_blend: float = 0.99,
) -> jax.Array:
    """The CEM regulariser ``L_C`` (DESIGN §1), minimised as ``L_task + λ·L_C``.

    Per sample ``i`` of class ``c``: the nearest centroid ``k`` of class ``c`` (distances under
    ``stop_gradient``). For every group ``(c, k)`` present in the batch, with ``n`` members:
    ``v_b[j] = mean_{i∈(c,k)} (ẑ_ij − μ_ckj)²`` around the fixed centroid, blended with the epoch
    statistics ``v = μ·v_b + (1−μ)·stop_gradient(v̄_ck)``, ``μ = min(κ·n/(π_ck·N_c), max_blend)``.
    Then, averaged over the classes present in the batch:

    - ``mode="gmm"`` (default; the paper's Gaussian-mixture bound, per dimension):
      ``L_C = mean_c Σ_k π_ck · mean_j ½·log(1 + v_ckj/σ²)``;
    - ``mode="reference"`` (the official code's hinge, arXiv 2503.00383 code ``compute_class_means``):
      ``L_C = mean_c Σ_k π_ck · relu(log(mean_j v_ckj + γ) − log(τσ² + γ))``. Unlike the official
      code, π and v̄ are looked up for the sample's own class (its ``lb_count`` indexing bug uses the
      class of the q-th sorted sample for the q-th class present; we fix it).

    A group with ``π = 0`` (empty cluster) or ``N_c = 0`` contributes exactly 0 with a finite
    gradient, so the all-zero :func:`init_mixture` state gives ``L_C = 0``.

    Cost does not depend on C: everything lives in batch space (``[B, K, D]`` gathers, ``[B, B]``
    same-group / same-class matrices, one ``[B, B] × [B, D]`` matmul). Works under the caller's
    ``jax.jit`` / ``jax.grad`` with traced labels; ``sigma``, ``kappa``... are traced values, so a new
    σ does not recompile.

    Args:
      features: ``[B, H, W, C]`` or ``[B, D]`` clean (pre-noise) client features.
      labels: ``[B]`` int labels.
      state: the epoch's :class:`MixtureState` (treated as a constant).
      sigma: noise standard deviation σ > 0.
      mode: ``"gmm"`` or ``"reference"``.
      kappa: κ, the blend rate (10 in the reference).
      tau: τ, hinge threshold factor (reference mode).
      gamma: γ, log offset (reference mode).
      max_blend: upper limit on μ.

    Returns:
      Scalar loss, differentiable in ``features``.

    >>> s = MixtureState(centroids=jnp.zeros((1, 1, 2)), weights=jnp.ones((1, 1)),
    ...                  variances=jnp.zeros((1, 1, 2)), counts=jnp.array([1]))
    >>> z = jnp.array([[1.0, 1.0], [-1.0, -1.0]])       # v_b = 1 per dimension, μ = 0.99
    >>> round(float(cem_loss(z, jnp.zeros(2, jnp.int32), s, sigma=1.0)), 3)  # ½·log(1 + 0.99)
    0.344
    """
    c, _, d = _check_state(state)
    b, _ = _check_features_labels(features, labels, c, d)
    if mode not in _MODES:
        raise ValueError(f"mode={mode!r}: accepted one of {_MODES}.")
    _check_scalar("sigma", sigma, low=0.0, strict=True)
    _check_scalar("kappa", kappa, low=0.0, strict=False)
    _check_scalar("tau", tau, low=0.0, strict=False)
    _check_scalar("gamma", gamma, low=0.0, strict=True)
    _check_scalar("max_blend", max_blend, low=0.0, high=1.0, strict=False)
    z = jnp.reshape(features, (b, d))
    dtype = _float_dtype(z)
    scalars = [jnp.asarray(x, dtype) for x in (sigma, kappa, tau, gamma, max_blend)]
    return _cem_loss_jit(z.astype(dtype), labels, *state, *scalars, mode=mode)


# --------------------------------------------------------------------------------------------------
# The leakage certificate


def _assign_groups(z, labels, centroids, segments=False):
    """Nearest own-class centroid per sample: group id ``label·K + k`` ``[N]`` (``-1`` for a padding
    row) and sizes ``[C·K]``.

    Samples are processed in chunks, so memory is ``O(chunk·K·D)``, not ``O(N·K·D)``; with
    ``segments`` (features sharded along ``N``) by :func:`cem_jax.kmeans.nearest_in_class` instead,
    one ``[N, C·K]`` matmul partitioned along the samples.
    """
    num_classes, k, _ = centroids.shape
    labels = labels.astype(jnp.int32)
    centroids = centroids.astype(z.dtype)

    def nearest(args):
        zi, yi = args
        return jnp.argmin(jnp.sum((zi[None, :] - centroids[yi]) ** 2, axis=-1)).astype(jnp.int32)

    if segments:
        assign = kmeans.nearest_in_class(z, labels, centroids)
    else:
        assign = lax.map(nearest, (z, labels), batch_size=min(z.shape[0], 512))
    group = jnp.where(labels >= 0, labels * k + assign, -1)
    sizes = jax.ops.segment_sum(jnp.ones_like(group), group, num_segments=num_classes * k)
    return group, sizes


_assign_groups_jit = jax.jit(_assign_groups, static_argnames=("segments",))


def _cluster_entropy(sizes, total):
    p = sizes.astype(jnp.float32) / total
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)), p


def _chi2_lower_quantile(k: jax.Array, confidence: float) -> jax.Array:
    """Wilson–Hilferty approximation of the ``1 − confidence`` quantile of χ²(k) (k ≥ 1).

    Below the exact quantile for small ``k`` (e.g. 3e-8 against 0.0039 at k = 1, 95 %), so the
    upper confidence limits built from it are, if anything, too high.
    """
    z = jax.scipy.special.ndtri(1.0 - confidence)
    a = 2.0 / (9.0 * k)
    q = k * (1.0 - a + z * jnp.sqrt(a)) ** 3
    return jnp.maximum(q, 1e-12 * k)


def _variance_upper_limit(var_ml, n, confidence):
    """One-sided upper ``confidence`` limit of a Gaussian variance from ``n`` samples.

    ``n·v_ML / χ²_{1−confidence}(n − 1)``; ``var_ml`` ``[M, D]``, ``n`` ``[M, 1]`` (n ≥ 2).
    """
    k = jnp.maximum(n - 1.0, 1.0)
    return n * var_ml / _chi2_lower_quantile(k, confidence)


@functools.partial(jax.jit, static_argnames=("confidence", "segments"))
def _diagonal_bound(z, labels, centroids, sigma, confidence=None, segments=False):
    group, sizes = _assign_groups(z, labels, centroids, segments)
    num = centroids.shape[0] * centroids.shape[1]
    n = jnp.maximum(sizes, 1).astype(z.dtype)[:, None]
    total = jnp.sum(sizes)  # the samples, without padding rows
    means = jax.ops.segment_sum(z, group, num_segments=num) / n
    var = jax.ops.segment_sum((z - means[group]) ** 2, group, num_segments=num) / n
    if confidence is not None:
        # Clusters of one sample have no variance estimate: they take the upper limit of the
        # variance of all samples (N of them) instead.
        n_all = total.astype(z.dtype)
        var_all = jnp.var(z, axis=0, keepdims=True, where=(labels >= 0)[:, None])
        var_all = _variance_upper_limit(var_all, n_all[None, None], confidence)
        var = jnp.where(n >= 2, _variance_upper_limit(var, n, confidence), var_all)
    h_c, p = _cluster_entropy(sizes, total)
    logdet = jnp.sum(jnp.log1p(var / sigma**2), axis=1)
    return h_c + 0.5 * jnp.sum(p * logdet)


def _log_det_eye_plus(x, n, sigma):
    """``log det(I_D + XᵀX/(n·σ²))`` for centred, zero-padded ``x [M, D]``, by Cholesky.

    Uses the smaller of ``XᵀX`` (D×D) and ``XXᵀ`` (M×M; Sylvester's identity gives the same
    determinant). Both matrices are ``I`` plus a PSD matrix: eigenvalues ≥ 1, so Cholesky is safe.
    """
    m, d = x.shape
    scale = 1.0 / (n * sigma**2)
    if m < d:
        gram = jnp.matmul(x, x.T, precision=_HIGHEST)
    else:
        gram = jnp.matmul(x.T, x, precision=_HIGHEST)
    mat = jnp.eye(gram.shape[0], dtype=x.dtype) + scale * gram
    chol = jnp.linalg.cholesky(mat)
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))


#: The full-covariance estimate uses a cluster's sample covariance only when it holds more than
#: this many samples per feature dimension; smaller clusters use their diagonal term (which, for
#: the true covariance, is never below the full one: Hadamard's inequality).
FULL_MIN_SAMPLES_PER_DIM = 10


def _full_bound(z, group, sizes, sigma, *, max_group_size):
    num = sizes.shape[0]
    d = z.shape[1]
    layout = kmeans.group_by_class(group, num, max_group_size)

    def one_cluster(args):
        index, mask = args
        maskf = mask.astype(z.dtype)[:, None]
        x = z[index] * maskf  # [M, D]
        n = jnp.maximum(jnp.sum(maskf), 1.0)
        centred = (x - jnp.sum(x, axis=0) / n) * maskf  # two-pass: own mean first
        diagonal = jnp.sum(jnp.log1p(jnp.sum(centred**2, axis=0) / (n * sigma**2)))
        full = _log_det_eye_plus(centred, n, sigma)
        return jnp.where(n > FULL_MIN_SAMPLES_PER_DIM * d, full, diagonal)

    logdets = lax.map(one_cluster, (layout.index, layout.mask))  # one cluster at a time
    h_c, p = _cluster_entropy(sizes, jnp.sum(sizes))
    return h_c + 0.5 * jnp.sum(jnp.where(p > 0, p * logdets, 0.0))


_full_bound_jit = jax.jit(_full_bound, static_argnames=("max_group_size",))


@jax.jit
def _full_bound_segments(z, group, sizes, sigma):
    """:func:`_full_bound` for features sharded along ``N``: one cluster at a time, its members
    selected by a mask over all ``N`` rows (reductions over ``N``, no gather of the features); the
    ``D×D`` scatter matrix only for the clusters that use it (more than 10 samples per dimension)."""
    d = z.shape[1]

    def one_cluster(g):
        member = (group == g)[:, None]
        n = jnp.maximum(sizes[g], 1).astype(z.dtype)
        mean = jnp.sum(jnp.where(member, z, 0.0), axis=0) / n
        centred = jnp.where(member, z - mean, 0.0)
        diagonal = jnp.sum(jnp.log1p(jnp.sum(centred**2, axis=0) / (n * sigma**2)))

        full = lambda: _log_det_eye_plus(centred, n, sigma)  # noqa: E731
        return lax.cond(n > FULL_MIN_SAMPLES_PER_DIM * d, full, lambda: diagonal)

    logdets = lax.map(one_cluster, jnp.arange(sizes.shape[0]))
    h_c, p = _cluster_entropy(sizes, jnp.sum(sizes))
    return h_c + 0.5 * jnp.sum(jnp.where(p > 0, p * logdets, 0.0))


def leakage_upper_bound(
    features: jax.Array,
    labels: jax.Array,
    state: MixtureState,
    *,
    sigma: float | jax.Array,
    covariance: str = "diagonal",
    confidence: float | None = None,
) -> jax.Array:
    """Upper bound on ``I(x; z)``, in bits per example, for ``z = ẑ + σ·ε`` (DESIGN §1).

    Each sample goes to the nearest centroid of its own class (``state.centroids``); clusters
    ``c = (y, k)`` have ``p_c = n_c/N`` and the within-cluster covariance ``Σ_c`` of ``ẑ`` around
    the cluster's own mean. Since ``h(z) ≤ H(c) + h(z|c)`` and a Gaussian maximises entropy for a
    given covariance,

    - ``covariance="full"``: ``I ≤ H(c) + ½ Σ_c p_c · log det(I + Σ_c/σ²)``,
    - ``covariance="diagonal"``: ``I ≤ H(c) + ½ Σ_c p_c · Σ_j log(1 + v_cj/σ²)`` (looser, by
      Hadamard's inequality),

    divided by ``ln 2``. The inequality holds for any encoder and any clustering **with the true
    covariances**; computed from samples it is an *estimate* of that bound:

    - The sample covariance of a cluster of ``n ≤ D`` points has rank ``< n``, so its
      ``log det`` drops most directions and falls far below the truth. ``"full"`` therefore uses a
      cluster's sample covariance only when ``n > FULL_MIN_SAMPLES_PER_DIM·D`` and that cluster's
      diagonal term otherwise; even then ``log det`` of a sample covariance is biased low by about
      ``D²/(2n)`` nats. Use it as a tighter estimate, not as a certificate.
    - ``confidence`` (diagonal only), e.g. ``0.95``, replaces every variance by its one-sided upper
      confidence limit under Gaussian sampling, ``n·v_ML / χ²_{1−confidence}(n − 1)``: the
      finite-sample error then inflates the bound instead of lowering it. This is
      :func:`leakage_certificate`.

    The full version runs one cluster at a time (memory ``O(M·D + min(M, D)²)``, ``M`` the padded
    largest cluster), with a Cholesky log-determinant; it must be called outside ``jax.jit`` (it
    sizes the padded layout on the host). The diagonal version is jittable.

    Features sharded along ``N`` over several devices (:func:`cem_jax.kmeans.is_sharded`) are
    never gathered: the assignment is a partitioned matmul, the statistics are segment sums, and the
    full version selects one cluster's rows at a time by a mask.

    Args:
      features: ``[N, ...]`` clean (pre-noise) features, flattened to ``[N, D]``.
      labels: ``[N]`` int labels; ``-1`` marks a padding row (not counted in ``N``).
      state: :class:`MixtureState` whose centroids define the clusters (fit on the training
        features; pass held-out features to measure the bound off the fitting data).
      sigma: noise standard deviation σ > 0.
      covariance: ``"diagonal"`` or ``"full"``.
      confidence: ``None`` (maximum-likelihood variances) or a level in ``(0, 1)``; diagonal only.

    Returns:
      Scalar, bits per example.

    >>> s = init_mixture(1, 1, 2)
    >>> z = jnp.array([[1.0, 0.0], [-1.0, 0.0]])         # one cluster, variance (1, 0)
    >>> float(leakage_upper_bound(z, jnp.zeros(2, jnp.int32), s, sigma=1.0))  # ½·log2(1 + 1)
    0.5
    """
    c, _, d = _check_state(state)
    n, _ = _check_features_labels(features, labels, c, d, padding=True)
    _check_scalar("sigma", sigma, low=0.0, strict=True)
    if covariance not in _COVARIANCES:
        raise ValueError(f"covariance={covariance!r}: accepted one of {_COVARIANCES}.")
    if confidence is not None:
        if covariance != "diagonal":
            raise ValueError(
                f'confidence={confidence} with covariance="{covariance}": the upper confidence '
                'limits are defined for covariance="diagonal" only.'
            )
        _check_scalar("confidence", confidence, low=0.0, high=1.0, strict=True)
        if not confidence < 1:
            raise ValueError(f"confidence={confidence}: accepted a level in (0, 1).")
        confidence = float(confidence)
    segments = kmeans.is_sharded(features)
    z = jnp.reshape(features, (n, d))
    z = z.astype(_float_dtype(z))
    sigma = jnp.asarray(sigma, z.dtype)
    if covariance == "diagonal":
        nats = _diagonal_bound(z, labels, state.centroids, sigma, confidence, segments)
    elif segments:
        group, sizes = _assign_groups_jit(z, labels, state.centroids, segments=True)
        nats = _full_bound_segments(z, group, sizes, sigma)
    else:
        if not (_is_concrete(features) and _is_concrete(labels)):
            raise ValueError(
                'covariance="full" got traced features/labels: accepted concrete arrays (call it '
                'outside jax.jit), or use covariance="diagonal" inside jit.'
            )
        group, sizes = _assign_groups_jit(z, labels, state.centroids)
        size = kmeans.max_class_size(group, sizes.shape[0])
        nats = _full_bound_jit(z, group, sizes, sigma, max_group_size=size)
    return nats / math.log(2.0)


def leakage_certificate(
    features: jax.Array,
    labels: jax.Array,
    state: MixtureState,
    *,
    sigma: float | jax.Array,
    confidence: float = 0.95,
) -> jax.Array:
    """The diagonal bound with upper-confidence variances: the number we call the certificate.

    :func:`leakage_upper_bound` with ``covariance="diagonal"`` and every within-cluster variance
    replaced by its one-sided ``confidence`` upper limit. It guarantees ``I(x; z)`` for the
    distribution the features were drawn from up to (i) the Gaussian-sampling model of those
    limits (each limit holds with probability ``confidence``; summed over thousands of terms the
    total is far more reliable than that) and (ii) the features being a fair sample of it —
    compute it on held-out features too. It says nothing about an attacker who sees more than
    ``ẑ + σ·ε`` (e.g. the client's weights *and* the clean features).

    >>> key = jax.random.key(0)
    >>> z = 0.3 * jax.random.normal(key, (400, 4))        # one Gaussian cluster, Σ = 0.09·I
    >>> y = jnp.zeros(400, jnp.int32)
    >>> truth = 0.5 * 4 * math.log2(1 + 0.09 / 0.1**2)    # ½·log2 det(I + Σ/σ²)
    >>> bool(leakage_certificate(z, y, init_mixture(1, 1, 4), sigma=0.1) >= truth)
    True
    """
    return leakage_upper_bound(
        features, labels, state, sigma=sigma, covariance="diagonal", confidence=confidence
    )


# --------------------------------------------------------------------------------------------------
# The MSE floor


def mse_lower_bound(conditional_entropy: float | jax.Array, dim: int) -> jax.Array:
    """The paper's floor on any attacker's per-dimension MSE: ``exp(2·H(x|z)/d) / (2πe)``.

    Args:
      conditional_entropy: ``H(x|z)`` in nats, total over the ``d`` dimensions (any shape).
      dim: ``d``, the number of input dimensions.

    Returns:
      ``E‖x − x̂(z)‖²/d`` lower bound, same shape as ``conditional_entropy``.

    >>> h = 0.5 * math.log(2 * math.pi * math.e * 0.25)   # N(0, 0.25) in one dimension
    >>> round(float(mse_lower_bound(h, dim=1)), 6)
    0.25
    """
    d = _check_positive_int("dim", dim)
    h = jnp.asarray(conditional_entropy, _float_dtype(jnp.asarray(conditional_entropy)))
    return jnp.exp(2.0 * h / d) / (2.0 * math.pi * math.e)
