"""Per-class k-means on device (DESIGN §1, "Mixture state"; reference §4.2).

The features of every class are clustered into ``K`` clusters at once: the ``N`` samples are grouped
into a padded ``[C, M]`` layout (``M`` = largest class size, rounded up; :func:`group_by_class`),
gathered into ``[C, M, D]`` and one k-means is ``jax.vmap``-ped over the classes, with masks for the
padding. On accelerators all classes form one vmap; on CPU ``lax.map(batch_size=...)`` takes a few
classes at a time (~8 MiB of features) so that they stay in cache over the Lloyd iterations, which is
about twice as fast. A sample is only ever compared with the centroids of its own class, so one Lloyd
iteration costs ``O(C·M·K·D) ≈ O(N·K·D)``.

Algorithm (per class, ``x`` its members):

1. Seeding (``init_centroids=None``), k-means++: the first centroid is a uniformly random member; each
   next one is a member drawn with probability ∝ its **squared** distance to the nearest centroid chosen
   so far (the reference draws ∝ distance, a bug we fix). When every remaining squared distance is 0
   (fewer than ``K`` distinct members) a uniformly random member is drawn instead; the duplicate centroid
   then becomes an empty cluster. A class without members gets zero centroids.
   Warm start (``init_centroids`` given): the given centroids, no seeding.
2. ``iterations`` Lloyd steps: assign each member to its nearest centroid (ties → lowest id), move each
   non-empty cluster's centroid to the mean of its members; an **empty cluster keeps its previous
   centroid** (as the reference does). There is no early stop: the number of steps is static.
3. A last assignment to the returned centroids gives ``assignments``, ``cluster_sizes`` and ``inertia``.

Assignment distances use ``‖x‖² − 2·x·c + ‖c‖²`` (matmuls, clamped at 0) on each class centred at its
mean; seeding and the inertia use the direct ``Σ(x − c)²`` (O(M·D) per centroid), so that duplicates of
a chosen member have distance exactly 0.

>>> import jax, jax.numpy as jnp
>>> x = jnp.array([[0.0], [0.1], [10.0], [10.1], [5.0], [5.2]])
>>> y = jnp.array([0, 0, 0, 0, 1, 1])
>>> r = kmeans_per_class(x, y, num_classes=2, clusters_per_class=2, key=jax.random.key(0))
>>> r.centroids.shape, r.assignments.shape, r.cluster_sizes.tolist()
((2, 2, 1), (6,), [[2, 2], [1, 1]])
>>> [round(v, 2) for v in sorted(r.centroids[0, :, 0].tolist())]
[0.05, 10.05]
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class ClassLayout(NamedTuple):
    """The samples grouped by class, padded to a common size ``M``.

    Attributes:
      index: ``[C, M]`` int32; row ``c`` holds the indices (into the ``N`` samples) of the members of
        class ``c`` in increasing order, then padding (0).
      mask: ``[C, M]`` bool; True where ``index`` is a real member.
    """

    index: jax.Array
    mask: jax.Array


class KMeansResult(NamedTuple):
    """Result of :func:`kmeans_per_class`.

    Attributes:
      centroids: ``[C, K, D]`` float32.
      assignments: ``[N]`` int32, the cluster id (``0..K-1``) of each sample within its own class.
      cluster_sizes: ``[C, K]`` int32, the number of members of each cluster.
      inertia: ``[]`` float32, the sum over samples of the squared distance to the assigned centroid.
    """

    centroids: jax.Array
    assignments: jax.Array
    cluster_sizes: jax.Array
    inertia: jax.Array


def group_by_class(labels: jax.Array, num_classes: int, max_class_size: int) -> ClassLayout:
    """Groups sample indices by class into a padded ``[C, M]`` layout. Jittable (``C``, ``M`` static).

    Args:
      labels: ``[N]`` int, in ``[0, num_classes)``; other values belong to no class.
      num_classes: ``C``.
      max_class_size: ``M``; members of a class beyond the first ``M`` are dropped (choose ``M`` at least
        the largest class count, e.g. with :func:`max_class_size`).

    Returns:
      A :class:`ClassLayout` with ``index`` and ``mask`` of shape ``[C, M]``.

    >>> g = group_by_class(jnp.array([1, 0, 1, 1]), num_classes=3, max_class_size=4)
    >>> g.index.tolist()
    [[1, 0, 0, 0], [0, 2, 3, 0], [0, 0, 0, 0]]
    >>> g.mask.astype(int).tolist()
    [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    n = labels.shape[0]
    order = jnp.argsort(labels, stable=True).astype(jnp.int32)  # indices grouped by class, in order
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    starts = jnp.searchsorted(labels[order], classes, side="left").astype(jnp.int32)  # [C]
    ends = jnp.searchsorted(labels[order], classes, side="right").astype(jnp.int32)  # [C]
    pos = starts[:, None] + jnp.arange(max_class_size, dtype=jnp.int32)[None, :]  # [C, M]
    mask = pos < ends[:, None]
    index = jnp.where(mask, order[jnp.clip(pos, 0, max(n - 1, 0))], 0) if n else pos * 0
    return ClassLayout(index=index.astype(jnp.int32), mask=mask)


def max_class_size(labels, num_classes: int, multiple: int = 64) -> int:
    """The largest class count, rounded up to a multiple of ``multiple`` (host-side).

    Rounding keeps the compiled shape of :func:`kmeans_per_class` stable across epochs and subsets.
    ``labels`` must be concrete (not traced). At least ``multiple`` (a class-less input gives
    ``multiple``).

    >>> max_class_size(jnp.array([0, 0, 1]), num_classes=2, multiple=64)
    64
    >>> max_class_size(jnp.array([0] * 65 + [1]), num_classes=2, multiple=64)
    128
    """
    if isinstance(labels, jax.core.Tracer):
        raise ValueError(
            "labels is a traced array: max_class_size needs concrete labels (call it outside jit, "
            "or pass max_class_size explicitly)."
        )
    if not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple={multiple!r}: accepted an int >= 1.")
    counts = jnp.bincount(jnp.asarray(labels).astype(jnp.int32).ravel(), length=num_classes)
    largest = int(counts.max()) if num_classes > 0 else 0
    return max(multiple, -(-largest // multiple) * multiple)


_max_class_size = max_class_size  # kmeans_per_class has an argument of the same name


def _sq_dists(x: jax.Array, x_sq: jax.Array, c: jax.Array) -> jax.Array:
    """``[M, D], [M], [K, D] -> [M, K]`` squared distances ``‖x‖² − 2x·c + ‖c‖²``, clamped at 0."""
    c_sq = jnp.sum(c * c, axis=-1)
    cross = jnp.matmul(x, c.T, precision=_HIGHEST)
    return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _seed(x: jax.Array, mask: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding of one class. ``x [M, D]``, ``mask [M]`` -> ``[K, D]`` centroids."""
    m, d = x.shape
    uniform = jnp.where(mask, 0.0, -jnp.inf)  # log-weights of a uniform draw over the members
    keys = jax.random.split(key, k)
    first = x[jax.random.categorical(keys[0], uniform)]
    centroids = jnp.zeros((k, d), x.dtype).at[0].set(first)
    min_d2 = jnp.sum((x - first) ** 2, axis=-1)  # [M]

    def body(j, carry):
        centroids, min_d2 = carry
        positive = mask & (min_d2 > 0)
        logits = jnp.where(positive, jnp.log(jnp.where(positive, min_d2, 1.0)), -jnp.inf)
        logits = jnp.where(jnp.any(positive), logits, uniform)
        chosen = x[jax.random.categorical(keys[j], logits)]
        min_d2 = jnp.minimum(min_d2, jnp.sum((x - chosen) ** 2, axis=-1))
        return centroids.at[j].set(chosen), min_d2

    centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_d2))
    return jnp.where(jnp.any(mask), centroids, 0.0)


def _assign(xc, xc_sq, centroids, mu):
    """Nearest centroid (ties → lowest id), ``[M]`` int32; ``xc = x − mu`` is the centred class."""
    return jnp.argmin(_sq_dists(xc, xc_sq, centroids - mu), axis=-1).astype(jnp.int32)


def _lloyd(x, mask, centroids, iterations: int):
    """Lloyd iterations for one class; returns ``(centroids [K, D], assign [M], sizes [K], d2 [M])``.

    Distances are computed on the class centred at its mean (less cancellation in the matmul form);
    the centroids stay in the original coordinates, so an empty cluster keeps its centroid exactly.
    """
    k = centroids.shape[0]
    maskf = mask.astype(x.dtype)
    count = jnp.maximum(jnp.sum(maskf), 1.0)
    # The class mean [D] as a matvec: a column sum is ~20x slower on XLA:CPU.
    mu = jnp.matmul(maskf, x, precision=_HIGHEST) / count
    xc = (x - mu) * maskf[:, None]
    xc_sq = jnp.sum(xc * xc, axis=-1)

    def step(_, c):
        onehot = jax.nn.one_hot(_assign(xc, xc_sq, c, mu), k, dtype=x.dtype) * maskf[:, None]
        sizes = jnp.sum(onehot, axis=0)  # [K]
        sums = jnp.matmul(onehot.T, xc, precision=_HIGHEST)  # [K, D]
        means = sums / jnp.maximum(sizes, 1.0)[:, None] + mu
        return jnp.where(sizes[:, None] > 0, means, c)

    centroids = jax.lax.fori_loop(0, iterations, step, centroids)
    assign = _assign(xc, xc_sq, centroids, mu)
    d2 = jnp.where(mask, jnp.sum((x - centroids[assign]) ** 2, axis=-1), 0.0)  # direct, for inertia
    sizes = jnp.sum(jax.nn.one_hot(assign, k, dtype=jnp.int32) * mask[:, None], axis=0)
    return centroids, assign, sizes.astype(jnp.int32), d2


def _one_class(features, index, mask, key, init, *, k: int, iterations: int):
    """Seeding (if ``init`` is None) and Lloyd for one class; ``index``, ``mask`` ``[M]``."""
    x = jnp.where(mask[:, None], features[index], 0.0)  # [M, D]
    centroids = _seed(x, mask, key, k) if init is None else init
    return _lloyd(x, mask, centroids, iterations)


def _kmeans_impl(
    features, labels, key, init_centroids, *, num_classes, k, iterations, m, class_batch
):
    n = features.shape[0]
    layout = group_by_class(labels, num_classes, m)
    keys = None
    if init_centroids is None:
        keys = jax.random.split(key, num_classes)
    per_class = lambda a: _one_class(features, *a, k=k, iterations=iterations)
    centroids, assign, sizes, d2 = jax.lax.map(
        per_class, (layout.index, layout.mask, keys, init_centroids), batch_size=class_batch
    )
    target = jnp.where(layout.mask, layout.index, n)  # padding scatters out of range -> dropped
    assignments = jnp.zeros((n,), jnp.int32).at[target.ravel()].set(assign.ravel(), mode="drop")
    return KMeansResult(centroids, assignments, sizes, jnp.sum(d2))


_kmeans_jit = jax.jit(
    _kmeans_impl, static_argnames=("num_classes", "k", "iterations", "m", "class_batch")
)

# On CPU, classes are processed a few at a time so that their features stay in cache across the Lloyd
# iterations (about 2x faster than one vmap over all classes); on accelerators, one vmap.
_CPU_CHUNK_BYTES = 8 * 2**20


def _class_batch(num_classes: int, m: int, d: int) -> int:
    if jax.default_backend() != "cpu":
        return num_classes
    return max(1, min(num_classes, _CPU_CHUNK_BYTES // max(1, 4 * m * d)))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def kmeans_per_class(
    features: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    clusters_per_class: int,
    key: jax.Array | None,
    init_centroids: jax.Array | None = None,
    iterations: int = 50,
    max_class_size: int | None = None,
) -> KMeansResult:
    """K-means with ``K = clusters_per_class`` clusters inside each class, all classes at once.

    Args:
      features: ``[N, D]`` float (computed in float32).
      labels: ``[N]`` int in ``[0, num_classes)``.
      num_classes: ``C`` >= 1.
      clusters_per_class: ``K`` >= 1.
      key: PRNG key for the k-means++ seeding (unused, may be None, when ``init_centroids`` is given).
      init_centroids: optional ``[C, K, D]`` warm start (e.g. the previous epoch's centroids).
      iterations: number of Lloyd iterations (>= 0; no early stop).
      max_class_size: padded class size ``M``; None computes it on the host with
        :func:`max_class_size` (labels must then be concrete). Must be at least the largest class count.

    Returns:
      A :class:`KMeansResult` (centroids ``[C, K, D]``, assignments ``[N]``, cluster_sizes ``[C, K]``,
      inertia ``[]``). The assignments, sizes and inertia belong to the returned centroids.

    The work is one ``jax.jit`` (static ``C``, ``K``, ``iterations``, ``M``): calls with equal shapes
    compile once.
    """
    if not _is_int(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r}: accepted an int >= 1.")
    if not _is_int(clusters_per_class) or clusters_per_class < 1:
        raise ValueError(f"clusters_per_class={clusters_per_class!r}: accepted an int >= 1.")
    if not _is_int(iterations) or iterations < 0:
        raise ValueError(f"iterations={iterations!r}: accepted an int >= 0.")
    features = jnp.asarray(features)
    labels = jnp.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"features has shape {features.shape}: accepted a 2-D array [N, D].")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise ValueError(
            f"labels has shape {labels.shape}: accepted a 1-D array [N] with N = "
            f"{features.shape[0]} (the number of rows of features)."
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels has dtype {labels.dtype}: accepted an integer dtype.")
    concrete = not isinstance(labels, jax.core.Tracer)
    if concrete and labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"labels range over [{lo}, {hi}]: accepted values in [0, num_classes) = "
                f"[0, {num_classes})."
            )
    n, d = features.shape
    k = clusters_per_class
    if init_centroids is not None:
        init_centroids = jnp.asarray(init_centroids)
        if init_centroids.shape != (num_classes, k, d):
            raise ValueError(
                f"init_centroids has shape {init_centroids.shape}: accepted "
                f"[num_classes, clusters_per_class, D] = {(num_classes, k, d)}."
            )
        init_centroids = init_centroids.astype(jnp.float32)
    elif key is None:
        raise ValueError("key=None: accepted a jax.random key when init_centroids is None.")
    if max_class_size is None:
        if not concrete:
            raise ValueError(
                "max_class_size=None needs concrete labels, but labels is traced: pass "
                "max_class_size (an int >= the largest class count) when calling under jit."
            )
        m = _max_class_size(labels, num_classes)
    else:
        if not _is_int(max_class_size) or max_class_size < 1:
            raise ValueError(f"max_class_size={max_class_size!r}: accepted an int >= 1 or None.")
        m = max_class_size
        if concrete and n:
            largest = int(jnp.bincount(labels.astype(jnp.int32), length=num_classes).max())
            if largest > m:
                raise ValueError(
                    f"max_class_size={m}: accepted an int >= the largest class count ({largest}) "
                    "or None."
                )
    if init_centroids is not None:
        key = None
    return _kmeans_jit(
        features.astype(jnp.float32),
        labels.astype(jnp.int32),
        key,
        init_centroids,
        num_classes=num_classes,
        k=k,
        iterations=iterations,
        m=m,
        class_batch=_class_batch(num_classes, m, d),
    )
