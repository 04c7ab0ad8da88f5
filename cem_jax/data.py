"""Datasets in memory as uint8 arrays, and device-side normalisation and augmentation (DESIGN §2.1).

Sources, chosen by ``data_dir`` in :func:`load_dataset`:

* an image folder ``<data_dir>/{train,test}/<class>/*.{png,jpg,jpeg}``;
* a folder holding ``train.zip`` and ``test.zip`` whose members are ``train/<class>/...`` and
  ``test/<class>/...`` (or ``<class>/...``);
* a single ``.zip`` file holding both ``train/<class>/...`` and ``test/<class>/...`` (optionally under
  one top-level folder);
* tensorflow-datasets for ``"cifar10"`` / ``"cifar100"`` when ``data_dir`` is ``None`` or holds none of
  the layouts above;
* ``"synthetic"``: class-dependent smooth patterns plus noise, generated from a seed.

Class names are the sorted class folder names and labels index them (``torchvision.ImageFolder``
order). Images are decoded once, with Pillow in a thread pool, into ``[N, H, W, 3]`` uint8 arrays that
stay on the host; :func:`epoch_batches` gives the index batches, and :func:`augment` /
:func:`normalize` run on the device inside the jitted step.

>>> ds = synthetic_dataset(num_train=40, num_test=20, image_size=8, num_classes=4)
>>> ds.train_images.shape, ds.train_images.dtype, ds.num_classes, ds.image_size
((40, 8, 8, 3), dtype('uint8'), 4, 8)
>>> key = jax.random.key(0)
>>> x = augment(key, ds.train_images[:5])
>>> x.shape, x.dtype
((5, 8, 8, 3), dtype('float32'))
>>> normalize(x, ds.mean, ds.std).shape
(5, 8, 8, 3)
>>> epoch_batches(key, 40, 16).shape
(2, 16)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import os
import struct
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "facescrub", "tinyimagenet", "synthetic")

# Reference §5.4 (DS:21-30). CIFAR-100 in full precision (DS:23-24).
NORMALIZATION: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": (
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
    "facescrub": ((0.5708, 0.5905, 0.4272), (0.2058, 0.2275, 0.2098)),
    "tinyimagenet": ((0.5141, 0.5775, 0.3985), (0.2927, 0.2570, 0.1434)),
}

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_SPLITS = ("train", "test")
_TFDS_NAMES = ("cifar10", "cifar100")
_CACHE_VERSION = 1

_LAYOUT_HELP = (
    "Expected one of: a folder with train/<class>/*.{png,jpg,jpeg} and test/<class>/...; a folder "
    "holding train.zip and test.zip whose members are train/<class>/... and test/<class>/...; or a "
    "single .zip holding train/<class>/... and test/<class>/...."
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in host memory.

    Attributes:
      name: dataset name (one of :data:`DATASETS`, or any name for :func:`load_image_folder`).
      train_images: ``[N, H, W, 3]`` uint8, square images (``H == W``).
      train_labels: ``[N]`` int32 in ``[0, num_classes)``.
      test_images: ``[M, H, W, 3]`` uint8.
      test_labels: ``[M]`` int32.
      class_names: ``num_classes`` names; label ``i`` is ``class_names[i]``.
      mean, std: per-channel normalisation constants for images on ``[0, 1]``.
      source: where the arrays came from, e.g. ``"zip:/path"``, ``"tfds:cifar10"``, ``"synthetic"``.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    def __post_init__(self):
        for split in _SPLITS:
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
                raise ValueError(
                    f"{split}_images: got shape {images.shape} dtype {images.dtype}; "
                    "accepted [N, H, W, 3] uint8."
                )
            if labels.shape != images.shape[:1]:
                raise ValueError(
                    f"{split}_labels: got shape {labels.shape}; accepted [{images.shape[0]}] to "
                    f"match {split}_images."
                )
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"test_images: image shape {self.test_images.shape[1:]} differs from train_images "
                f"{self.train_images.shape[1:]}."
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean/std: got {self.mean}/{self.std}; accepted 3 floats each.")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])


# --------------------------------------------------------------------------------------------------
# Public loading API


def load_dataset(
    name: str,
    data_dir: str | None = None,
    *,
    train_subset: int | None = None,
    subset_seed: int = 0,
    cache_dir: str | None = None,
    synthetic_shape: tuple[int, int, int, int] | None = None,
) -> Dataset:
    """Loads ``name`` into memory.

    Args:
      name: one of :data:`DATASETS`.
      data_dir: an image folder, a folder with ``train.zip``/``test.zip``, or a ``.zip`` (see module
        docstring). For ``cifar10``/``cifar100`` a folder without that layout (or ``None``) is used
        as tensorflow-datasets' ``data_dir``. Ignored for ``synthetic``.
      train_subset: keep a class-balanced random subset of this many training images.
      subset_seed: seed of that subset.
      cache_dir: if given, decoded folder/zip arrays are stored there as ``.npz`` and reused while
        the source files keep their size and modification time.
      synthetic_shape: ``(num_train, num_test, image_size, num_classes)`` for ``synthetic``.

    Returns:
      The :class:`Dataset`, with the reference normalisation constants of ``name``.
    """
    if name not in DATASETS:
        raise ValueError(f"name={name!r}: accepted datasets are {', '.join(DATASETS)}.")
    if name == "synthetic":
        kwargs = {}
        if synthetic_shape is not None:
            if len(synthetic_shape) != 4:
                raise ValueError(
                    f"synthetic_shape={synthetic_shape!r}: accepted "
                    "(num_train, num_test, image_size, num_classes)."
                )
            keys = ("num_train", "num_test", "image_size", "num_classes")
            kwargs = dict(zip(keys, (int(v) for v in synthetic_shape)))
        ds = synthetic_dataset(**kwargs)
    else:
        layout = _detect_layout(data_dir) if data_dir is not None else None
        if layout is not None:
            ds = _load_layout(
                name,
                layout,
                train_subset=train_subset,
                subset_seed=subset_seed,
                cache_dir=cache_dir,
            )
            return ds  # the subset was taken before decoding
        if name in _TFDS_NAMES:
            ds = _load_tfds(name, data_dir)
        elif data_dir is None:
            raise ValueError(
                f"data_dir=None: dataset {name!r} is read from a folder or zip only. {_LAYOUT_HELP}"
            )
        else:
            raise ValueError(
                f"data_dir={data_dir!r}: found {_describe_path(data_dir)}. {_LAYOUT_HELP}"
            )
    if train_subset is not None:
        ds = subset(ds, train_subset, seed=subset_seed)
    return ds


def load_image_folder(
    data_dir: str,
    *,
    name: str | None = None,
    train_subset: int | None = None,
    subset_seed: int = 0,
    cache_dir: str | None = None,
) -> Dataset:
    """Loads any folder/zip dataset (layouts as in the module docstring), under any ``name``.

    ``mean``/``std`` are the reference constants when ``name`` is one of them, else they are computed
    from the (possibly subset) training images: per channel, over all pixels, on ``[0, 1]``.
    """
    layout = _detect_layout(data_dir)
    if layout is None:
        raise ValueError(f"data_dir={data_dir!r}: found {_describe_path(data_dir)}. {_LAYOUT_HELP}")
    if name is None:
        name = os.path.splitext(os.path.basename(os.path.normpath(data_dir)))[0]
    return _load_layout(
        name, layout, train_subset=train_subset, subset_seed=subset_seed, cache_dir=cache_dir
    )


def synthetic_dataset(
    *,
    num_train: int = 512,
    num_test: int = 256,
    image_size: int = 32,
    num_classes: int = 10,
    seed: int = 0,
) -> Dataset:
    """A small learnable dataset: each class is a smooth coloured pattern; images add noise.

    Class ``c`` has its own colour pair and a plane wave with its own frequency and orientation;
    every image draws a random phase of that wave and independent pixel noise (σ = 20/255). Labels
    cycle through the classes, so every class has ``num_train // num_classes`` or one more images.
    Everything is a function of ``seed``. ``mean``/``std`` are computed from the training images.
    """
    for arg, value, low in (
        ("num_train", num_train, 1),
        ("num_test", num_test, 1),
        ("image_size", image_size, 1),
        ("num_classes", num_classes, 2),
    ):
        if int(value) < low:
            raise ValueError(f"{arg}={value}: accepted an integer >= {low}.")
    rng = np.random.default_rng(seed)
    colours = rng.uniform(0.1, 0.9, size=(2, num_classes, 3))
    freqs = rng.uniform(0.5, 3.0, size=num_classes)
    angles = rng.uniform(0.0, np.pi, size=num_classes)
    coords = (np.arange(image_size) + 0.5) / image_size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (np.arange(n) % num_classes).astype(np.int32)
        rng.shuffle(labels)
        phase = rng.uniform(0.0, 2 * np.pi, size=(n, 1, 1))
        direction = (
            np.cos(angles[labels])[:, None, None] * xx + np.sin(angles[labels])[:, None, None] * yy
        )
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freqs[labels][:, None, None] * direction + phase)
        a = colours[0, labels][:, None, None, :]
        b = colours[1, labels][:, None, None, :]
        img = a + (b - a) * wave[..., None]
        img = img + rng.normal(0.0, 20.0 / 255.0, size=img.shape)
        return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8), labels

    train_images, train_labels = make(num_train)
    test_images, test_labels = make(num_test)
    mean, std = channel_stats(train_images)
    return Dataset(
        name="synthetic",
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        class_names=tuple(f"class_{c}" for c in range(num_classes)),
        mean=mean,
        std=std,
        source=f"synthetic:seed={seed}",
    )


def dataset_identity(ds: Dataset) -> dict:
    """What data ``ds`` holds, as a JSON-able dict to store beside a checkpoint and compare later.

    ``{"name", "source", "class_names", "num_train", "num_test", "digest"}``: ``digest`` is the
    sha256 (hex) of the shapes, uint8 image bytes and int32 labels of the train and then the test
    split, so any changed pixel, label, order or subset gives another digest (about 0.3 s for all of
    CIFAR-10). Two loads of the same data give equal dicts wherever they were read from, except
    ``source`` (the path), which is informative only: compare ``digest`` to decide "same data".
    """
    h = hashlib.sha256(b"cem_jax.dataset_identity.v1")
    for split in _SPLITS:
        images = np.ascontiguousarray(getattr(ds, f"{split}_images"), np.uint8)
        labels = np.ascontiguousarray(getattr(ds, f"{split}_labels"), np.int32)
        h.update(f"|{split}|{images.shape}|{labels.shape}|".encode())
        h.update(memoryview(images).cast("B"))
        h.update(memoryview(labels).cast("B"))
    return {
        "name": ds.name,
        "source": ds.source,
        "class_names": [str(c) for c in ds.class_names],
        "num_train": ds.num_train,
        "num_test": ds.num_test,
        "digest": h.hexdigest(),
    }


def channel_stats(
    images: np.ndarray,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of ``[N, H, W, 3]`` uint8 images scaled to ``[0, 1]``.

    Exact integer sums, computed in chunks, so it works on 50k images without a float copy.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images: got shape {images.shape} dtype {images.dtype}; accepted [N, H, W, 3] uint8."
        )
    total = np.zeros(3, np.int64)
    total_sq = np.zeros(3, np.int64)
    for lo in range(0, images.shape[0], 4096):
        x = images[lo : lo + 4096].reshape(-1, 3).astype(np.int64)
        total += x.sum(axis=0)
        total_sq += (x * x).sum(axis=0)
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / (count * 255.0)
    var = np.maximum(total_sq / (count * 255.0**2) - mean**2, 0.0)
    std = np.sqrt(var)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def subset_indices(labels: np.ndarray, num: int, *, num_classes: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of ``num`` examples.

    Per-class counts are as equal as the class sizes allow (water-filling: every class gets
    ``min(size, q)`` and ``num - Σ`` classes with spare images one more, chosen at random).
    """
    labels = np.asarray(labels)
    if not num_classes <= num <= labels.shape[0]:
        raise ValueError(
            f"train_subset={num}: accepted {num_classes} (num_classes) .. {labels.shape[0]} "
            "(training set size)."
        )
    rng = np.random.default_rng(seed)
    avail = np.bincount(labels, minlength=num_classes)
    lo, hi = 0, int(avail.max())  # largest q with sum(min(avail, q)) <= num
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if np.minimum(avail, mid).sum() <= num:
            lo = mid
        else:
            hi = mid - 1
    counts = np.minimum(avail, lo)
    spare = np.flatnonzero(avail > lo)
    extra = num - int(counts.sum())
    counts[rng.choice(spare, size=extra, replace=False)] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == c))[: counts[c]] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subset(ds: Dataset, num: int, *, seed: int = 0) -> Dataset:
    """``ds`` with a class-balanced random subset of ``num`` training images (see subset_indices)."""
    idx = subset_indices(ds.train_labels, num, num_classes=ds.num_classes, seed=seed)
    return dataclasses.replace(
        ds, train_images=ds.train_images[idx], train_labels=ds.train_labels[idx]
    )


# --------------------------------------------------------------------------------------------------
# Device-side transforms (jittable)


def to_float(images: jax.Array | np.ndarray) -> jax.Array:
    """``[..., 3]`` uint8 in ``[0, 255]`` -> float32 in ``[0, 1]``; float input is cast unchanged."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def normalize(
    images: jax.Array | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """``(to_float(images) - mean) / std`` per channel; ``[..., 3]`` -> float32 ``[..., 3]``."""
    mean_a, std_a = _channel_vector(mean, "mean"), _channel_vector(std, "std")
    return (to_float(images) - mean_a) / std_a


def denormalize(
    x: jax.Array | np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> jax.Array:
    """Inverse of :func:`normalize`, clipped to ``[0, 1]``; ``[..., 3]`` -> float32 ``[..., 3]``."""
    mean_a, std_a = _channel_vector(mean, "mean"), _channel_vector(std, "std")
    return jnp.clip(jnp.asarray(x, jnp.float32) * std_a + mean_a, 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("padding", "flip"))
def augment(
    key: jax.Array, images: jax.Array | np.ndarray, *, padding: int = 4, flip: bool = True
) -> jax.Array:
    """Random crop with zero padding and random horizontal flip, independently per image.

    torchvision ``RandomCrop(H, padding=padding)`` + ``RandomHorizontalFlip()`` semantics: the image
    is padded with 0 (black), an ``H x W`` window is cut at an offset drawn uniformly from
    ``[0, 2·padding]²``, then mirrored left-right with probability 1/2. Jittable; ``key`` decides
    everything.

    Args:
      key: a ``jax.random`` key.
      images: ``[B, H, W, C]`` uint8 (or float in ``[0, 1]``).
      padding: zero padding on each side (0 disables the crop).
      flip: whether to flip.

    Returns:
      ``[B, H, W, C]`` float32 in ``[0, 1]``.
    """
    if images.ndim != 4:
        raise ValueError(f"images: got shape {images.shape}; accepted [B, H, W, C].")
    if padding < 0:
        raise ValueError(f"padding={padding}: accepted an integer >= 0.")
    images = jnp.asarray(images)
    _, height, width, channels = images.shape
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

    def one(k: jax.Array, img: jax.Array) -> jax.Array:
        k_off, k_flip = jax.random.split(k)
        off = jax.random.randint(k_off, (2,), 0, 2 * padding + 1)
        crop = jax.lax.dynamic_slice(img, (off[0], off[1], 0), (height, width, channels))
        if flip:
            crop = jnp.where(jax.random.bernoulli(k_flip), crop[:, ::-1], crop)
        return crop

    keys = jax.random.split(key, images.shape[0])
    return to_float(jax.vmap(one)(keys, padded))


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """Index batches of one epoch: a random permutation of ``range(num_examples)`` cut into full
    batches, the short last batch dropped (as the reference does). Returns ``[steps, batch_size]``
    int32 with ``steps = num_examples // batch_size``."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"batch_size={batch_size}: accepted 1 .. num_examples={num_examples}.")
    steps = num_examples // batch_size
    perm = jax.random.permutation(key, num_examples)[: steps * batch_size]
    return perm.reshape(steps, batch_size).astype(jnp.int32)


def _channel_vector(values: Sequence[float], arg: str) -> jax.Array:
    arr = np.asarray(values, np.float32)
    if arr.shape != (3,):
        raise ValueError(f"{arg}={values!r}: accepted 3 per-channel floats.")
    return jnp.asarray(arr)


# --------------------------------------------------------------------------------------------------
# Folder / zip sources


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Where the two splits live: ``kind`` is "folder", "zips" (train.zip + test.zip) or "zip"."""

    kind: str
    path: str


@dataclasses.dataclass
class _Split:
    """A listed (not yet decoded) split: ``names[i]`` is read by ``read(i)``; labels by class."""

    class_names: tuple[str, ...]
    names: list[str]
    labels: np.ndarray
    read: Callable[[int], bytes]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_hidden(path: str) -> bool:
    """Dot files and folders (``.ipynb_checkpoints``, ``._x.jpg``) and macOS ``__MACOSX/``."""
    return any(p.startswith(".") or p == "__MACOSX" for p in path.split("/") if p)


def _describe_path(path: str | None, limit: int = 8) -> str:
    if path is None:
        return "nothing (data_dir=None)"
    if not os.path.exists(path):
        return "no such file or folder"
    if os.path.isfile(path):
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                tops = sorted(
                    {n.split("/", 1)[0] + ("/" if "/" in n else "") for n in zf.namelist()}
                )
            return f"a zip whose top-level entries are {_few(tops, limit)}"
        return "a file that is not a zip"
    entries = sorted(
        e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in os.listdir(path)
    )
    return f"a folder containing {_few(entries, limit)}" if entries else "an empty folder"


def _few(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) or "nothing"
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _detect_layout(data_dir: str) -> _Layout | None:
    """The layout of ``data_dir``, or None if it has none of the accepted ones."""
    path = os.path.abspath(data_dir)
    if os.path.isfile(path):
        return _Layout("zip", path) if zipfile.is_zipfile(path) else None
    if not os.path.isdir(path):
        return None
    if all(os.path.isdir(os.path.join(path, s)) for s in _SPLITS):
        return _Layout("folder", path)
    if all(os.path.isfile(os.path.join(path, s + ".zip")) for s in _SPLITS):
        return _Layout("zips", path)
    if any(
        os.path.isdir(os.path.join(path, s)) or os.path.isfile(os.path.join(path, s + ".zip"))
        for s in _SPLITS
    ):
        # Half a layout is a mistake, not a tfds data_dir.
        raise ValueError(
            f"data_dir={data_dir!r}: found {_describe_path(path)}, which has one split but not "
            f"both. {_LAYOUT_HELP}"
        )
    return None


def _group_by_class(
    pairs: list[tuple[str, str]], where: str
) -> tuple[tuple[str, ...], list[str], np.ndarray]:
    """``pairs`` of (class, name) -> sorted class names, names sorted within class, labels."""
    if not pairs:
        raise ValueError(
            f"{where}: no images (*{', *'.join(IMAGE_EXTENSIONS)}) in class folders. {_LAYOUT_HELP}"
        )
    pairs = sorted(pairs)
    class_names = tuple(sorted({c for c, _ in pairs}))
    index = {c: i for i, c in enumerate(class_names)}
    names = [n for _, n in pairs]
    labels = np.fromiter((index[c] for c, _ in pairs), np.int32, len(pairs))
    return class_names, names, labels


def _list_folder(root: str, where: str) -> _Split:
    pairs: list[tuple[str, str]] = []
    empty: list[str] = []
    classes = sorted(
        e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)) and not _is_hidden(e)
    )
    for cls in classes:
        found = 0
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls)):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for f in filenames:
                if _is_image(f) and not _is_hidden(f):
                    pairs.append((cls, os.path.join(dirpath, f)))
                    found += 1
        if not found:
            empty.append(cls)
    if not classes:
        raise ValueError(
            f"{where}: found {_describe_path(root)} but no class folders. {_LAYOUT_HELP}"
        )
    if empty:
        raise ValueError(f"{where}: class folders without images: {_few(empty)}. {_LAYOUT_HELP}")
    class_names, names, labels = _group_by_class(pairs, where)

    def read(i: int) -> bytes:
        with open(names[i], "rb") as fh:
            return fh.read()

    return _Split(class_names, names, labels, read)


def _list_zip(path: str, prefix: str, where: str, buffer: bytes | None = None) -> _Split:
    """The members ``<prefix><class>/.../<image>`` of the zip at ``path``."""
    with zipfile.ZipFile(path) as zf:
        infos = [
            i
            for i in zf.infolist()
            if not i.is_dir() and i.filename.startswith(prefix) and not _is_hidden(i.filename)
        ]
    by_name = {i.filename: i for i in infos}
    pairs = []
    for info in infos:
        rest = info.filename[len(prefix) :]
        if "/" in rest and _is_image(rest):
            pairs.append((rest.split("/", 1)[0], info.filename))
    if not pairs:
        raise ValueError(
            f"{where}: no images under {prefix or '/'}<class>/ in {path}; found "
            f"{_describe_path(path)}. {_LAYOUT_HELP}"
        )
    class_names, names, labels = _group_by_class(pairs, where)
    data = buffer if buffer is not None else _read_file(path)
    return _Split(class_names, names, labels, lambda i: _zip_member(data, by_name[names[i]], path))


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _zip_member(data: bytes, info: zipfile.ZipInfo, path: str) -> bytes:
    """A member's bytes sliced from the whole zip in memory (stored or deflated, CRC checked)."""
    off = info.header_offset
    if data[off : off + 4] != b"PK\x03\x04" or info.flag_bits & 0x1:
        with zipfile.ZipFile(path) as zf:  # unusual member: let zipfile handle it
            return zf.read(info)
    name_len, extra_len = struct.unpack_from("<HH", data, off + 26)
    start = off + 30 + name_len + extra_len
    raw = data[start : start + info.compress_size]
    if info.compress_type == zipfile.ZIP_STORED:
        out = bytes(raw)
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        out = zlib.decompress(raw, -15)
    else:
        with zipfile.ZipFile(path) as zf:
            return zf.read(info)
    if zlib.crc32(out) != info.CRC:
        raise ValueError(f"{path}: member {info.filename} fails its CRC check (corrupt zip).")
    return out


def _list_splits(layout: _Layout) -> dict[str, _Split]:
    splits: dict[str, _Split] = {}
    if layout.kind == "folder":
        for s in _SPLITS:
            splits[s] = _list_folder(os.path.join(layout.path, s), f"{layout.path}/{s}")
    elif layout.kind == "zips":
        for s in _SPLITS:
            zpath = os.path.join(layout.path, s + ".zip")
            with zipfile.ZipFile(zpath) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/") and not _is_hidden(n)]
            prefix = f"{s}/" if names and all(n.startswith(f"{s}/") for n in names) else ""
            splits[s] = _list_zip(zpath, prefix, zpath)
    else:
        with zipfile.ZipFile(layout.path) as zf:
            names = zf.namelist()
        tops = {n.split("/", 1)[0] for n in names if "/" in n and not _is_hidden(n)}
        root = ""
        if not all(f"{s}" in tops for s in _SPLITS) and len(tops) == 1:
            root = next(iter(tops)) + "/"  # one top-level folder holding train/ and test/
        if not all(any(n.startswith(f"{root}{s}/") for n in names) for s in _SPLITS):
            raise ValueError(
                f"data_dir={layout.path!r}: found {_describe_path(layout.path)}. {_LAYOUT_HELP}"
            )
        data = _read_file(layout.path)
        for s in _SPLITS:
            splits[s] = _list_zip(layout.path, f"{root}{s}/", f"{layout.path}:{root}{s}", data)
    if splits["train"].class_names != splits["test"].class_names:
        tr, te = set(splits["train"].class_names), set(splits["test"].class_names)
        raise ValueError(
            f"{layout.path}: test classes differ from train classes; only in train: "
            f"{_few(sorted(tr - te))}; only in test: {_few(sorted(te - tr))}."
        )
    return splits


def _decode_one(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")  # grayscale, palette, RGBA (alpha dropped), CMYK
            return np.asarray(im)
    except Exception as e:  # re-raised with the file name
        raise ValueError(f"{name}: cannot decode image ({e}).") from e


def _decode_split(
    split: _Split, indices: np.ndarray, size: tuple[int, int], reference: str, workers: int
) -> np.ndarray:
    """Decodes ``split`` members ``indices`` into ``[len(indices), H, W, 3]`` uint8."""
    out = np.empty((len(indices), size[0], size[1], 3), np.uint8)

    def chunk(lo: int, hi: int) -> None:
        for j in range(lo, hi):
            i = int(indices[j])
            arr = _decode_one(split.read(i), split.names[i])
            if arr.shape[:2] != size:
                raise ValueError(
                    f"{split.names[i]}: image size {arr.shape[1]}x{arr.shape[0]} differs from "
                    f"{size[1]}x{size[0]} ({reference}); all images must have the same size."
                )
            out[j] = arr

    step = max(1, min(2048, -(-len(indices) // (4 * workers))))
    bounds = [(lo, min(lo + step, len(indices))) for lo in range(0, len(indices), step)]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(chunk, lo, hi) for lo, hi in bounds]:
            future.result()
    return out


def _cache_path(
    cache_dir: str, name: str, layout: _Layout, splits: dict[str, _Split] | None
) -> str:
    """The cache file for ``layout``: keyed by the source path and the size and mtime of every
    source file (each image for a folder, which needs ``splits``; the zip files otherwise)."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{layout.kind}|{layout.path}".encode())
    if layout.kind == "folder":
        files = [n for s in _SPLITS for n in splits[s].names]
    elif layout.kind == "zips":
        files = [os.path.join(layout.path, s + ".zip") for s in _SPLITS]
    else:
        files = [layout.path]
    for f in files:
        st = os.stat(f)
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return os.path.join(cache_dir, f"{name}-{h.hexdigest()[:20]}.npz")


def _decode_layout(
    name: str, splits: dict[str, _Split], train_idx: np.ndarray, where: str
) -> dict[str, np.ndarray]:
    """Decodes the listed splits (train restricted to ``train_idx``) into arrays."""
    start = time.perf_counter()
    train = splits["train"]
    first_name = train.names[int(train_idx[0])]
    size = _decode_one(train.read(int(train_idx[0])), first_name).shape[:2]
    if size[0] != size[1]:
        raise ValueError(
            f"{first_name}: image size {size[1]}x{size[0]} is not square; accepted square images "
            "of one size."
        )
    reference = f"the first training image {first_name}"
    workers = max(1, min(8, os.cpu_count() or 1))
    arrays = {"class_names": np.asarray(train.class_names, dtype=str)}
    for s in _SPLITS:
        idx = train_idx if s == "train" else np.arange(len(splits[s].names))
        arrays[f"{s}_images"] = _decode_split(splits[s], idx, size, reference, workers)
        arrays[f"{s}_labels"] = splits[s].labels[idx].astype(np.int32)
    logging.info(
        "data: decoded %d images of %s from %s in %.2f s (%d threads)",
        sum(len(arrays[f"{s}_labels"]) for s in _SPLITS),
        name,
        where,
        time.perf_counter() - start,
        workers,
    )
    return arrays


def _load_layout(
    name: str,
    layout: _Layout,
    *,
    train_subset: int | None,
    subset_seed: int,
    cache_dir: str | None,
) -> Dataset:
    splits = _list_splits(layout) if layout.kind == "folder" or cache_dir is None else None
    if cache_dir is None:
        train_idx = np.arange(len(splits["train"].names))
        if train_subset is not None:  # decode only the subset: labels are known from the listing
            train_idx = subset_indices(
                splits["train"].labels,
                train_subset,
                num_classes=len(splits["train"].class_names),
                seed=subset_seed,
            )
        arrays = _decode_layout(name, splits, train_idx, layout.path)
    else:
        cache_file = _cache_path(cache_dir, name, layout, splits)
        if os.path.exists(cache_file):
            start = time.perf_counter()
            with np.load(cache_file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            logging.info(
                "data: %s read from cache %s in %.2f s",
                name,
                cache_file,
                time.perf_counter() - start,
            )
        else:
            splits = splits or _list_splits(layout)
            train_idx = np.arange(len(splits["train"].names))
            arrays = _decode_layout(name, splits, train_idx, layout.path)
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{cache_file}.tmp{os.getpid()}.npz"
            np.savez(tmp, **arrays)
            os.replace(tmp, cache_file)
    ds = Dataset(
        name=name,
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int32),
        class_names=tuple(str(c) for c in arrays["class_names"]),
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        source=f"{layout.kind}:{layout.path}",
    )
    if train_subset is not None and ds.num_train != train_subset:  # full arrays (cache): subset now
        ds = subset(ds, train_subset, seed=subset_seed)
    mean, std = NORMALIZATION[name] if name in NORMALIZATION else channel_stats(ds.train_images)
    return dataclasses.replace(ds, mean=mean, std=std)


# --------------------------------------------------------------------------------------------------
# tensorflow-datasets


def _load_tfds(name: str, data_dir: str | None) -> Dataset:
    """CIFAR through ``tfds.data_source`` (ArrayRecord; no TensorFlow needed to read)."""
    start = time.perf_counter()
    try:
        import tensorflow_datasets as tfds

        sources = tfds.data_source(
            name,
            split=list(_SPLITS),
            data_dir=data_dir,
            builder_kwargs={"file_format": "array_record"},
        )
        class_names = tuple(tfds.builder(name, data_dir=data_dir).info.features["label"].names)
        arrays = {}
        for s, src in zip(_SPLITS, sources):
            records = src.__getitems__(list(range(len(src))))
            arrays[f"{s}_images"] = np.stack([r["image"] for r in records]).astype(np.uint8)
            arrays[f"{s}_labels"] = np.asarray([r["label"] for r in records], np.int32)
    except Exception as e:  # any tfds failure becomes one clear message
        raise ValueError(
            f"data_dir={data_dir!r}: could not load {name!r}. Found {_describe_path(data_dir)}. "
            f"{_LAYOUT_HELP} Otherwise tensorflow-datasets is used; it needs internet the first "
            f"time: run `tfds build {name} --file_format=array_record` (or "
            f"tfds.builder({name!r}).download_and_prepare(file_format='array_record')) with that "
            f"data_dir. tfds said: {type(e).__name__}: {e}"
        ) from e
    logging.info("data: read %s from tfds in %.2f s", name, time.perf_counter() - start)
    mean, std = NORMALIZATION[name]
    return Dataset(
        name=name,
        class_names=class_names,
        mean=mean,
        std=std,
        source=f"tfds:{name}",
        **arrays,
    )
