"""Per-class k-means on device (DESIGN §1, "Mixture state"; reference §4.2).

The features of every class are clustered into ``K`` clusters at once: the ``N`` samples are grouped
into a padded ``[C, M]`` layout (``M`` = largest class size, rounded up; :func:`group_by_class`),
gathered into ``[C, M, D]`` and one k-means is ``jax.vmap``-ped over the classes, with masks for the
padding. On accelerators all classes form one vmap; on CPU ``lax.map(batch_size=...)`` takes a few
classes at a time (~8 MiB of features) so that they stay in cache over the Lloyd iterations, which is
about twice as fast. A sample is only ever compared with the centroids of its own class, so one Lloyd
iteration costs ``O(C·M·K·D) ≈ O(N·K·D)``. This is ``method="classes"``.

Features sharded along ``N`` over several devices (or hosts) take ``method="segments"`` instead: the
gather into ``[C, M, D]`` would pull every sample onto every device. Every step is then a matmul or a
reduction over ``N`` that XLA partitions along the samples (DESIGN §5): distances to all ``C·K``
centroids ``[N, C·K]`` restricted to the own class, centroid sums as ``one_hot(group)ᵀ · x`` (an
all-reduce of ``[C·K, D]``), and each k-means++ draw as a Gumbel-max over ``[C, N]`` scores, the chosen
rows picked by a one-hot matmul. It does ``C``× the arithmetic of ``classes`` (the same memory traffic,
which is what bounds it on accelerators). Both methods draw the k-means++ seeds from the same
noise: row ``i``'s Gumbel noise comes from ``fold_in(key, i)``, and each draw is a Gumbel-max over
the class's members, so the seeds depend neither on the method, nor on how the samples are sharded,
nor on padding rows after them (a run on one device and on eight cluster alike, up to the rounding
of the Lloyd sums). ``method=None`` picks ``segments`` for an array sharded over several devices and
``classes`` otherwise.

Padding: a label of ``-1`` (:data:`PAD_LABEL`) marks a row that belongs to no class (the padding that
makes ``N`` a multiple of the device count); it is ignored by both methods and gets assignment 0.

Algorithm (per class, ``x`` its members):

1. Seeding (``init_centroids=None``), k-means++: the first centroid is a uniformly random member; each
   next one is a member drawn (Gumbel-max) with probability ∝ its **squared** distance to the nearest
   centroid chosen so far (the reference draws ∝ distance, a bug we fix). When every remaining squared
   distance is 0 (fewer than ``K`` distinct members) a uniformly random member is drawn instead; the
   duplicate centroid then becomes an empty cluster. A class without members gets zero centroids.
   Warm start (``init_centroids`` given): the given centroids, no seeding.
2. ``iterations`` Lloyd steps: assign each member to its nearest centroid (ties → lowest id), move each
   non-empty cluster's centroid to the mean of its members; an **empty cluster keeps its previous
   centroid** (as the reference does). The loop (a ``lax.while_loop``, static shapes) ends early
   when a step leaves the assignment unchanged: the next step would recompute the same means, so
   every later one is a no-op and the result is exactly that of the ``iterations`` steps. A warm
   start from the previous epoch usually settles in a few steps.
3. A last assignment to the returned centroids gives ``assignments``, ``cluster_sizes``, ``inertia``
   and the per-dimension within-cluster ``variances`` (the mixture's ``v̄``), all in the same pass
   over each class.

Assignment distances use ``‖x‖² − 2·x·c + ‖c‖²`` (matmuls, clamped at 0) on each class centred at its
mean; seeding, the inertia and the variances use the direct ``Σ(x − c)²`` (O(M·D) per centroid), so
that duplicates of a chosen member have distance exactly 0.

k-means++ seeding is its own jitted program (``_seed_jit``); the Lloyd steps and statistics are one
program for a given start (``_kmeans_jit``), so the first call of a training run (k-means++) and every
warm start after it share one compilation.

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

#: The label of a padding row: it belongs to no class and is ignored.
PAD_LABEL = -1
_METHODS = ("classes", "segments")


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
      variances: ``[C, K, D]`` float32, the per-dimension mean squared deviation of each cluster's
        members from its centroid (0 for an empty cluster): the mixture's ``v̄`` (DESIGN §1).
    """

    centroids: jax.Array
    assignments: jax.Array
    cluster_sizes: jax.Array
    inertia: jax.Array
    variances: jax.Array


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
    largest = int(_class_counts(labels, num_classes).max()) if num_classes > 0 else 0
    return max(multiple, -(-largest // multiple) * multiple)


_max_class_size = max_class_size  # kmeans_per_class has an argument of the same name


def _class_counts(labels, num_classes: int) -> jax.Array:
    """Members per class ``[C]``; labels outside ``[0, C)`` (padding) are not counted."""
    labels = jnp.asarray(labels).astype(jnp.int32).ravel()
    valid = (labels >= 0) & (labels < num_classes)
    return jnp.bincount(jnp.where(valid, labels, num_classes), length=num_classes + 1)[:num_classes]


def _row_gumbel(key: jax.Array, n: int, k: int, dtype) -> jax.Array:
    """``[N, K]`` Gumbel noise for the k-means++ draws; row ``i``'s comes from ``fold_in(key, i)``,
    so it depends neither on the sharding, nor on the method, nor on padding rows after the samples."""
    rows = jnp.arange(n, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i), (k,), dtype))(rows)


def _seed(x: jax.Array, mask: jax.Array, gumbel: jax.Array, k: int) -> jax.Array:
    """k-means++ seeding of one class. ``x [M, D]``, ``mask [M]``, ``gumbel [M, K]`` (the members'
    rows of :func:`_row_gumbel`) -> ``[K, D]`` centroids. Draw ``j`` is the Gumbel-max
    ``argmax(log w + gumbel[:, j])``: a member with probability ∝ ``w``."""
    m, d = x.shape
    uniform = jnp.where(mask, 0.0, -jnp.inf)  # log-weights of a uniform draw over the members
    first = x[jnp.argmax(uniform + gumbel[:, 0])]
    centroids = jnp.zeros((k, d), x.dtype).at[0].set(first)
    min_d2 = jnp.sum((x - first) ** 2, axis=-1)  # [M]

    def body(j, carry):
        centroids, min_d2 = carry
        positive = mask & (min_d2 > 0)
        logits = jnp.where(positive, jnp.log(jnp.where(positive, min_d2, 1.0)), -jnp.inf)
        logits = jnp.where(jnp.any(positive), logits, uniform)
        chosen = x[jnp.argmax(logits + gumbel[:, j])]
        min_d2 = jnp.minimum(min_d2, jnp.sum((x - chosen) ** 2, axis=-1))
        return centroids.at[j].set(chosen), min_d2

    centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_d2))
    return jnp.where(jnp.any(mask), centroids, 0.0)


def _padded_k(k: int) -> int:
    """The number of centroid rows the distance matmul ``[M, D]·[D, K']`` is given: for ``K > 4``,
    ``K`` rounded up to a multiple of 8 (zero rows, whose columns are dropped). XLA:CPU's kernel is
    ~20% faster at K' = 8 than at K = 5 and at K' = 16 than at K = 15, and slower at K' = 8 than at
    K = 3 (D = 512, a 2-core CPU)."""
    return k if k <= 4 else -(-k // 8) * 8


def _lloyd(x, mask, centroids, iterations: int):
    """Lloyd iterations for one class, stopping early at a fixed point.

    ``x [M, D]`` (0 on padding), ``mask [M]``, ``centroids [K, D]`` -> ``(centroids [K, D],
    assign [M], sizes [K], sq_sums [K, D])``: the final centroids, each member's nearest one
    (ties → lowest id; 0 on padding), the cluster sizes, and per cluster the per-dimension sums of
    the members' squared deviations from the centroid (their total is the inertia).

    Distances are computed on the class centred at its mean (less cancellation in the matmul form);
    the centroids stay in the original coordinates, so an empty cluster keeps its centroid exactly.

    Each step moves the centroids to the means of the current assignment, then reassigns. When the
    assignment comes back unchanged the next step would recompute the same means (and an empty
    cluster keeps its centroid), so every later step changes nothing: the loop stops there, with the
    result of all ``iterations`` steps.
    """
    k = centroids.shape[0]
    maskf = mask.astype(x.dtype)
    count = jnp.maximum(jnp.sum(maskf), 1.0)
    # The class mean [D] as a matvec: a column sum is ~20x slower on XLA:CPU.
    mu = jnp.matmul(maskf, x, precision=_HIGHEST) / count
    xc = (x - mu) * maskf[:, None]  # [M, D]
    xc_sq = jnp.sum(xc * xc, axis=-1)  # [M]

    def assign(c):  # [K, D] -> [M], nearest centroid by ‖x‖² − 2·x·c + ‖c‖² (clamped at 0)
        cc = c - mu
        padded = jnp.zeros((_padded_k(k), cc.shape[1]), cc.dtype).at[:k].set(cc)
        cross = jnp.matmul(xc, padded.T, precision=_HIGHEST)[:, :k]  # [M, K]
        d2 = jnp.maximum(xc_sq[:, None] - 2.0 * cross + jnp.sum(cc * cc, axis=-1)[None, :], 0.0)
        return jnp.argmin(d2, axis=-1).astype(jnp.int32)

    def onehot(a):  # [M, K], zero rows on padding
        return jax.nn.one_hot(a, k, dtype=x.dtype) * maskf[:, None]

    def step(carry):
        i, c, a, _ = carry
        hot = onehot(a)
        sizes = jnp.sum(hot, axis=0)  # [K]
        sums = jnp.matmul(hot.T, xc, precision=_HIGHEST)  # [K, D]
        means = sums / jnp.maximum(sizes, 1.0)[:, None] + mu
        c = jnp.where(sizes[:, None] > 0, means, c)
        new = assign(c)
        return i + 1, c, new, jnp.all((new == a) | ~mask)

    def running(carry):
        i, _, _, fixed = carry
        return (i < iterations) & ~fixed

    start = (jnp.zeros((), jnp.int32), centroids, assign(centroids), jnp.zeros((), bool))
    _, centroids, assign_, _ = jax.lax.while_loop(running, step, start)
    hot = onehot(assign_)
    dev2 = (xc - (centroids - mu)[assign_]) ** 2  # [M, D], direct (x − c)²; hot drops padding
    sq_sums = jnp.matmul(hot.T, dev2, precision=_HIGHEST)  # [K, D]
    sizes = jnp.sum(jax.nn.one_hot(assign_, k, dtype=jnp.int32) * mask[:, None], axis=0)
    return centroids, assign_, sizes, sq_sums


def _one_class(features, gumbel, index, mask, init, *, k: int, iterations: int):
    """Seeding (if ``init`` is None) and Lloyd for one class; ``index``, ``mask`` ``[M]``."""
    x = jnp.where(mask[:, None], features[index], 0.0)  # [M, D]
    centroids = _seed(x, mask, gumbel[index], k) if init is None else init
    return _lloyd(x, mask, centroids, iterations)


def _kmeans_impl(
    features, labels, key, init_centroids, *, num_classes, k, iterations, m, class_batch
):
    n = features.shape[0]
    layout = group_by_class(labels, num_classes, m)
    gumbel = _row_gumbel(key, n, k, features.dtype) if init_centroids is None else None
    per_class = lambda a: _one_class(features, gumbel, *a, k=k, iterations=iterations)
    centroids, assign, sizes, sq_sums = jax.lax.map(
        per_class, (layout.index, layout.mask, init_centroids), batch_size=class_batch
    )
    target = jnp.where(layout.mask, layout.index, n)  # padding scatters out of range -> dropped
    assignments = jnp.zeros((n,), jnp.int32).at[target.ravel()].set(assign.ravel(), mode="drop")
    variances = sq_sums / jnp.maximum(sizes, 1).astype(sq_sums.dtype)[..., None]
    return KMeansResult(centroids, assignments, sizes, jnp.sum(sq_sums), variances)


_kmeans_jit = jax.jit(
    _kmeans_impl, static_argnames=("num_classes", "k", "iterations", "m", "class_batch")
)


def _seed_impl(features, labels, key, *, num_classes, k, m, class_batch):
    """The k-means++ seeds ``[C, K, D]`` of every class (what :func:`_kmeans_impl` seeds with)."""
    layout = group_by_class(labels, num_classes, m)
    gumbel = _row_gumbel(key, features.shape[0], k, features.dtype)

    def per_class(a):
        index, mask = a
        x = jnp.where(mask[:, None], features[index], 0.0)
        return _seed(x, mask, gumbel[index], k)

    return jax.lax.map(per_class, (layout.index, layout.mask), batch_size=class_batch)


# kmeans_per_class seeds with this program, then runs the warm-start program: the Lloyd steps are
# compiled once for the first (k-means++) call and every later (warm) one.
_seed_jit = jax.jit(_seed_impl, static_argnames=("num_classes", "k", "m", "class_batch"))

# On CPU, classes are processed a few at a time so that their features stay in cache across the Lloyd
# iterations (about 2x faster than one vmap over all classes); on accelerators, one vmap.
_CPU_CHUNK_BYTES = 8 * 2**20


def _class_batch(num_classes: int, m: int, d: int) -> int:
    if jax.default_backend() != "cpu":
        return num_classes
    return max(1, min(num_classes, _CPU_CHUNK_BYTES // max(1, 4 * m * d)))


# ------------------------------------------------------------------------------------------------
# method="segments": global matmuls and reductions over N, which XLA partitions along the samples.


def _segment_setup(x, labels, num_classes):
    """One-hot classes ``[N, C]``, member mask ``[N]``, class means ``[C, D]``, the centred
    samples ``xc = x − μ_y`` ``[N, D]`` (0 on padding) and ``‖xc‖²`` ``[N]``."""
    member = (labels >= 0) & (labels < num_classes)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=x.dtype)  # a zero row for padding
    counts = jnp.sum(onehot, axis=0)
    mu = jnp.matmul(onehot.T, x, precision=_HIGHEST) / jnp.maximum(counts, 1.0)[:, None]
    xc = (x - jnp.matmul(onehot, mu, precision=_HIGHEST)) * member[:, None]
    return onehot, member, mu, xc, jnp.sum(xc * xc, axis=-1)


def _segment_assign(xc, xc_sq, onehot, centroids, mu):
    """Nearest centroid of the own class (ties → lowest id), ``[N]`` int32, by one ``[N, C·K]``
    matmul on the centred samples; the other classes' columns are dropped by the one-hot."""
    c, k, d = centroids.shape
    cent = centroids - mu[:, None, :]
    cross = jnp.matmul(xc, cent.reshape(c * k, d).T, precision=_HIGHEST).reshape(-1, c, k)
    own_cross = jnp.einsum("nck,nc->nk", cross, onehot, precision=_HIGHEST)
    own_sq = jnp.matmul(onehot, jnp.sum(cent * cent, axis=-1), precision=_HIGHEST)  # [N, K]
    d2 = jnp.maximum(xc_sq[:, None] - 2.0 * own_cross + own_sq, 0.0)
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def _segment_seed(x, labels, onehot, member, key, k):
    """k-means++ of every class at once: each draw is a Gumbel-max over ``[C, N]`` scores."""
    n, d = x.shape
    num_classes = onehot.shape[1]
    in_class = onehot.T > 0  # [C, N]
    gumbel = _row_gumbel(key, n, k, x.dtype).T  # [K, N]
    safe_labels = jnp.where(member, labels, 0)

    def pick(logits):  # [C, N] -> the argmax row of each class, [C, D] (exact: a one-hot matmul)
        chosen = jax.nn.one_hot(jnp.argmax(logits, axis=1), n, dtype=x.dtype)
        return jnp.matmul(chosen, x, precision=_HIGHEST)

    def own_d2(chosen):  # squared distance of every sample to its own class's new centroid, [N]
        return jnp.sum((x - chosen[safe_labels]) ** 2, axis=-1)

    uniform = jnp.where(in_class, 0.0, -jnp.inf)
    first = pick(uniform + gumbel[0][None, :])
    centroids = jnp.zeros((num_classes, k, d), x.dtype).at[:, 0].set(first)

    def body(j, carry):
        centroids, min_d2 = carry
        positive = in_class & (min_d2 > 0)[None, :]
        log_d2 = jnp.log(jnp.where(min_d2 > 0, min_d2, 1.0))[None, :]
        logits = jnp.where(positive, log_d2, -jnp.inf)
        logits = jnp.where(jnp.any(positive, axis=1, keepdims=True), logits, uniform)
        chosen = pick(logits + gumbel[j][None, :])
        return centroids.at[:, j].set(chosen), jnp.minimum(min_d2, own_d2(chosen))

    centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, own_d2(first)))
    return jnp.where(jnp.any(in_class, axis=1)[:, None, None], centroids, 0.0)


def _segments_impl(features, labels, key, init_centroids, *, num_classes, k, iterations):
    x = features
    onehot, member, mu, xc, xc_sq = _segment_setup(x, labels, num_classes)
    if init_centroids is None:
        centroids = _segment_seed(x, labels, onehot, member, key, k)
    else:
        centroids = init_centroids
    num = num_classes * k

    def groups(c):
        return labels * k + _segment_assign(xc, xc_sq, onehot, c, mu)  # negative on padding

    def step(carry):  # as in _lloyd: means of the current groups, regroup, stop at a fixed point
        i, c, g, _ = carry
        hot = jax.nn.one_hot(g, num, dtype=x.dtype)  # [N, C·K]; padding rows are zero
        sizes = jnp.sum(hot, axis=0)
        sums = jnp.matmul(hot.T, xc, precision=_HIGHEST).reshape(num_classes, k, -1)
        means = sums / jnp.maximum(sizes, 1.0).reshape(num_classes, k, 1) + mu[:, None, :]
        c = jnp.where(sizes.reshape(num_classes, k, 1) > 0, means, c)
        new = groups(c)
        return i + 1, c, new, jnp.all((new == g) | ~member)

    def running(carry):
        i, _, _, fixed = carry
        return (i < iterations) & ~fixed

    start = (jnp.zeros((), jnp.int32), centroids, groups(centroids), jnp.zeros((), bool))
    _, centroids, group, _ = jax.lax.while_loop(running, step, start)
    group = jnp.where(member, group, 0)
    own = centroids.reshape(num, -1)[group]
    dev2 = (x - own) ** 2 * member[:, None]  # [N, D]
    hot = jax.nn.one_hot(group, num, dtype=x.dtype) * member[:, None]
    sq_sums = jnp.matmul(hot.T, dev2, precision=_HIGHEST)  # [C·K, D], an all-reduce when sharded
    sizes = jnp.sum(jax.nn.one_hot(group, num, dtype=jnp.int32) * member[:, None], axis=0)
    variances = (sq_sums / jnp.maximum(sizes, 1).astype(x.dtype)[:, None]).reshape(centroids.shape)
    assignments = jnp.where(member, group - jnp.where(member, labels, 0) * k, 0)
    return KMeansResult(
        centroids,
        assignments.astype(jnp.int32),
        sizes.reshape(num_classes, k),
        jnp.sum(dev2),
        variances,
    )


_segments_jit = jax.jit(_segments_impl, static_argnames=("num_classes", "k", "iterations"))


@jax.jit
def nearest_in_class(features: jax.Array, labels: jax.Array, centroids: jax.Array) -> jax.Array:
    """The nearest centroid of each sample's own class, ``[N, D], [N], [C, K, D] -> [N]`` int32.

    The assignment step of ``method="segments"`` (ties → lowest id; 0 for padding rows, label
    ``-1``): one ``[N, C·K]`` matmul on class-centred samples, partitioned along ``N`` when the
    features are sharded.

    >>> c = jnp.array([[[0.0], [10.0]], [[5.0], [6.0]]])
    >>> nearest_in_class(jnp.array([[9.0], [9.0], [1.0]]), jnp.array([0, 1, -1]), c).tolist()
    [1, 1, 0]
    """
    num_classes = centroids.shape[0]
    x = features.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    onehot, member, mu, xc, xc_sq = _segment_setup(x, labels, num_classes)
    assign = _segment_assign(xc, xc_sq, onehot, centroids.astype(jnp.float32), mu)
    return jnp.where(member, assign, 0)


def is_sharded(x) -> bool:
    """True for a ``jax.Array`` split over several devices (``method=None`` then picks
    ``"segments"``); False for host arrays, one device, or a replicated array."""
    sharding = getattr(x, "sharding", None)
    if sharding is None or isinstance(x, jax.core.Tracer):
        return False
    return len(sharding.device_set) > 1 and not sharding.is_fully_replicated


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
    method: str | None = None,
) -> KMeansResult:
    """K-means with ``K = clusters_per_class`` clusters inside each class, all classes at once.

    Args:
      features: ``[N, D]`` float (computed in float32).
      labels: ``[N]`` int in ``[0, num_classes)``, or ``-1`` for a padding row (ignored).
      num_classes: ``C`` >= 1.
      clusters_per_class: ``K`` >= 1.
      key: PRNG key for the k-means++ seeding (unused, may be None, when ``init_centroids`` is given).
      init_centroids: optional ``[C, K, D]`` warm start (e.g. the previous epoch's centroids).
      iterations: number of Lloyd iterations (>= 0); the loop ends early once the assignment stops
        changing, which gives the same result as running all of them.
      max_class_size: padded class size ``M``; None computes it on the host with
        :func:`max_class_size` (labels must then be concrete). Must be at least the largest class count.
        Not used by ``method="segments"``.
      method: ``"classes"`` (the padded per-class layout), ``"segments"`` (global matmuls over ``N``,
        for features sharded over several devices) or None (``"segments"`` when
        :func:`is_sharded` says the features are, ``"classes"`` otherwise). The two follow the same
        algorithm and draw the same k-means++ seeds; they differ only in the rounding of the sums.

    Returns:
      A :class:`KMeansResult` (centroids ``[C, K, D]``, assignments ``[N]``, cluster_sizes ``[C, K]``,
      inertia ``[]``, variances ``[C, K, D]``). The assignments, sizes, inertia and variances belong
      to the returned centroids.

    The work is a ``jax.jit`` of the Lloyd steps (static ``C``, ``K``, ``iterations``, ``M``), after
    one of the k-means++ seeding when ``init_centroids`` is None: calls with equal shapes compile
    once, warm-started or not.
    """
    if method is None:
        method = "segments" if is_sharded(features) else "classes"
    if method not in _METHODS:
        raise ValueError(f"method={method!r}: accepted one of {_METHODS} or None.")
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
        if lo < PAD_LABEL or hi >= num_classes:
            raise ValueError(
                f"labels range over [{lo}, {hi}]: accepted values in [0, num_classes) = "
                f"[0, {num_classes}), or {PAD_LABEL} for a padding row."
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
    if init_centroids is not None:
        key = None
    args = (features.astype(jnp.float32), labels.astype(jnp.int32), key, init_centroids)
    if method == "segments":
        return _segments_jit(*args, num_classes=num_classes, k=k, iterations=iterations)
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
            largest = int(_class_counts(labels, num_classes).max())
            if largest > m:
                raise ValueError(
                    f"max_class_size={m}: accepted an int >= the largest class count ({largest}) "
                    "or None."
                )
    shape = dict(num_classes=num_classes, k=k, m=m, class_batch=_class_batch(num_classes, m, d))
    features, labels, key, init_centroids = args
    if init_centroids is None:
        init_centroids = _seed_jit(features, labels, key, **shape)
    return _kmeans_jit(features, labels, None, init_centroids, iterations=iterations, **shape)
