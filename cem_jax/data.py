"""Datasets in memory as uint8 arrays, and device-side normalisation and augmentation (DESIGN §2.1).

Sources, chosen by ``data_dir`` in :func:`load_dataset`:

* an image folder ``<data_dir>/{train,test}/<class>/*.{png,jpg,jpeg}`` (images may sit in
  subfolders of a class folder);
* a folder holding ``train.zip`` and ``test.zip`` whose members are ``train/<class>/...`` and
  ``test/<class>/...`` (or ``<class>/...``);
* a single ``.zip`` file holding both ``train/<class>/...`` and ``test/<class>/...`` (optionally under
  one top-level folder);
* Tiny ImageNet's own layout, extracted or as the original ``tiny-imagenet-200.zip``:
  ``train/<wnid>/images/*.JPEG``, ``val/images/*`` labelled by ``val/val_annotations.txt`` (the val
  split is the test split; the unlabelled ``test/`` is ignored; ``wnids.txt``, if present, must list
  the train classes);
* ``cifar10`` / ``cifar100``: the official python archive (``cifar-10-python.tar.gz``), or the
  ``<name>.npz`` prepared from it by :mod:`cem_jax.download`, or a folder holding either; with
  ``data_dir=None`` they are downloaded and prepared on first use (:func:`cem_jax.download.fetch_cifar`);
* ``"synthetic"``: class-dependent smooth patterns plus noise, generated from a seed;
* ``"tfds:NAME"`` (``NAME`` as TFDS spells it: ``mnist``, ``my_set/config:1.0.0``): a dataset prepared
  with tensorflow-datasets (the optional extra ``cem_jax[tfds]``) in the ``array_record`` or
  ``parquet`` file format, read from ``data_dir`` as the TFDS data dir without TensorFlow (see
  :func:`load_tfds`). Only this source imports ``tensorflow_datasets``.

A given ``data_dir`` in none of these layouts is an error that says what it holds; nothing is ever
downloaded into it. Class names are the sorted class folder names and labels index them
(``torchvision.ImageFolder`` order); files that are not images are skipped with a warning that
counts them, and a class folder without images is an error. Images are decoded once, with Pillow in
a thread pool, into ``[N, H, W, 3]`` uint8 arrays that stay on the host; :func:`epoch_batches` gives
the index batches, and :func:`augment` / :func:`normalize` run on the device inside the jitted step.

Decode cache (``cache_dir``): one ``decoded-<key>.npz`` per dataset, keyed by content — every
member's path inside the dataset, its label and its bytes (a zip's CRC-32 and size from its central
directory; a hash of each file of a folder) — so renaming, moving or re-timestamping files does not
matter and swapped contents are never read under old labels. The :data:`CACHE_KEEP` most recently
used entries are kept, older ones (also those of earlier cache versions) are deleted when a new one
is written. A damaged entry is decoded again; an unwritable ``cache_dir`` is a warning.

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
import contextlib
import dataclasses
import difflib
import functools
import glob
import hashlib
import io
import os
import re
import struct
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from PIL import Image

from cem_jax import download

DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "facescrub", "tinyimagenet", "synthetic")
#: ``tfds:NAME`` names a dataset prepared with tensorflow-datasets (:func:`load_tfds`).
TFDS_PREFIX = "tfds:"

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

# Class names (label order) that identify a folder dataset as a known one (see load_dataset).
KNOWN_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),  # fmt: skip
    "cifar100": tuple(
        """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
        butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch
        crab crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo
        keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain
        mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
        plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk
        skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank
        telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf
        woman worm""".split()
    ),
}

# Decode cache: entries are decoded-<content key>.npz; the CACHE_KEEP most recently used are kept.
CACHE_KEEP = 3
_CACHE_VERSION = 2
_CACHE_FILE_RE = re.compile(
    r"decoded-[0-9a-f]{32}\.npz|(?:cifar10|cifar100|facescrub|tinyimagenet)-[0-9a-f]{20}\.npz"
)
_SPLITS = ("train", "test")
_TINY_ANNOTATIONS = "val_annotations.txt"
_WNID_RE = re.compile(r"n\d{8}")

_LAYOUT_HELP = (
    "Accepted: a folder with train/<class>/*.{png,jpg,jpeg} and test/<class>/...; a folder "
    "holding train.zip and test.zip whose members are train/<class>/... and test/<class>/...; a "
    "single .zip holding train/<class>/... and test/<class>/...; Tiny ImageNet's own layout "
    "(train/<wnid>/images/*.JPEG, val/images/* and val/val_annotations.txt), extracted or as "
    "tiny-imagenet-200.zip; for cifar10/cifar100 also the official python archive "
    "(cifar-10-python.tar.gz, cifar-100-python.tar.gz) or a prepared <name>.npz, or a folder "
    "holding one. Without --data_dir, cifar10/cifar100 are downloaded."
)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A dataset in host memory.

    Attributes:
      name: what the data is (one of :data:`DATASETS`, else a folder dataset's own name; see
        :func:`load_dataset` for the rule).
      train_images: ``[N, H, W, 3]`` uint8, square images (``H == W``).
      train_labels: ``[N]`` int32 in ``[0, num_classes)``.
      test_images: ``[M, H, W, 3]`` uint8.
      test_labels: ``[M]`` int32.
      class_names: ``num_classes`` names; label ``i`` is ``class_names[i]``.
      mean, std: per-channel normalisation constants for images on ``[0, 1]``.
      source: where the arrays came from, e.g. ``"zip:/path"``, ``"download:/path/cifar10.npz"``,
        ``"synthetic:seed=0"``.
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
      name: one of :data:`DATASETS`, or ``tfds:NAME`` (:func:`load_tfds`; ``data_dir`` is then the
        TFDS data dir, ``None`` TFDS's default, and ``cache_dir`` is not used).
      data_dir: a dataset in one of the layouts of the module docstring. A given ``data_dir`` that
        holds none of them is an error (never a download). ``None``: ``cifar10``/``cifar100`` are
        read from :func:`cem_jax.download.fetch_cifar`'s folder, downloaded there on first use;
        other datasets need a ``data_dir``. Ignored for ``synthetic``.
      train_subset: keep a class-balanced random subset of this many training images.
      subset_seed: seed of that subset.
      cache_dir: if given, decoded folder/zip arrays are stored there as ``.npz`` keyed by content
        (see the module docstring) and reused; damaged entries are decoded again, an unwritable
        ``cache_dir`` only loses the cache.
      synthetic_shape: ``(num_train, num_test, image_size, num_classes)`` for ``synthetic``.

    Returns:
      The :class:`Dataset`. Its ``name`` is ``name`` only where the data is that dataset: a folder
      or zip is named ``cifar10``/``cifar100`` only when its class names are those datasets'
      classes, ``tinyimagenet`` when it is in Tiny ImageNet's layout (or has wnid class names),
      ``facescrub`` when asked (it cannot be checked); otherwise it is named after the folder or
      zip (``/data/fashion_mnist.zip`` -> ``fashion_mnist``), with a warning. ``mean``/``std`` are
      the reference constants of that name (:data:`NORMALIZATION`), otherwise the statistics of
      the training images (after ``train_subset``).
    """
    if is_tfds(name):
        return load_tfds(name, data_dir, train_subset=train_subset, subset_seed=subset_seed)
    if name not in DATASETS:
        raise ValueError(
            f"name={name!r}: accepted datasets are {', '.join(DATASETS)}, or {TFDS_PREFIX}NAME (a "
            "dataset prepared with tensorflow-datasets)."
        )
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
    elif data_dir is None:
        if name not in download.ARCHIVES:
            raise ValueError(
                f"data_dir=None: dataset {name!r} is read from a folder or zip only (only "
                f"{', '.join(download.ARCHIVES)} are downloaded). {_LAYOUT_HELP}"
            )
        ds = _load_cifar(name, None)
    else:
        layout = _detect_layout(data_dir, name)
        if layout is None:
            raise ValueError(
                f"data_dir={data_dir!r}: found {_describe_path(data_dir)}. {_LAYOUT_HELP}"
            )
        if layout.kind in ("prepared", "archive"):
            ds = _load_cifar(name, layout)
        else:
            return _load_layout(  # the subset is taken before decoding
                name,
                layout,
                train_subset=train_subset,
                subset_seed=subset_seed,
                cache_dir=cache_dir,
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

    ``name=None``: a known dataset when its class names are that dataset's, else the folder's or
    zip's name. ``mean``/``std`` as in :func:`load_dataset`.
    """
    layout = _detect_layout(data_dir)
    if layout is None or layout.kind in ("prepared", "archive"):
        raise ValueError(f"data_dir={data_dir!r}: found {_describe_path(data_dir)}. {_LAYOUT_HELP}")
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
    """Where the splits live. ``kind``: "folder", "zips" (train.zip + test.zip), "zip" (one zip,
    splits under ``root``), "tiny_folder" / "tiny_zip" (Tiny ImageNet's own layout under ``root``),
    "prepared" (a ``<name>.npz`` from :mod:`cem_jax.download`), "archive" (an official CIFAR
    ``.tar.gz``)."""

    kind: str
    path: str
    root: str = ""


@dataclasses.dataclass
class _Split:
    """A listed (not yet decoded) split: ``names[i]`` is read by ``read(i)``; labels by class.

    ``keys[i]`` names member ``i`` independently of where the dataset lies (its path relative to the
    dataset), and ``content_id(i)`` identifies its bytes (CRC and size for a zip member, a hash of
    the file for a folder): together they key the decode cache.
    """

    class_names: tuple[str, ...]
    names: list[str]
    labels: np.ndarray
    read: Callable[[int], bytes]
    keys: list[str]
    content_id: Callable[[int], bytes]


class _FolderSource:
    """Files under a folder, by ``/``-separated path relative to it (hidden entries left out)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def list(self, prefix: str) -> list[str]:
        """Files under ``prefix``; its direct subfolders may be symlinks (deeper ones are not
        followed)."""
        top = os.path.join(self.path, prefix)
        out = []
        for entry in sorted(os.listdir(top)):
            if _is_hidden(entry):
                continue
            if not os.path.isdir(os.path.join(top, entry)):
                out.append(prefix + entry)
                continue
            for dirpath, dirnames, filenames in os.walk(os.path.join(top, entry)):
                dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
                rel = prefix + os.path.relpath(dirpath, top).replace(os.sep, "/") + "/"
                out.extend(rel + f for f in sorted(filenames) if not _is_hidden(f))
        return sorted(out)

    def is_dir(self, rel: str) -> bool:
        return os.path.isdir(os.path.join(self.path, rel))

    def full(self, rel: str) -> str:
        return os.path.join(self.path, *rel.split("/"))

    def read(self, rel: str) -> bytes:
        with open(self.full(rel), "rb") as fh:
            return fh.read()

    def content_id(self, rel: str) -> bytes:
        return hashlib.blake2b(self.read(rel), digest_size=16).digest()


class _ZipSource:
    """Members of a zip, read from the whole file in memory (read once, on first use).

    A member name stored twice with the same CRC and size counts once (with a warning); twice with
    different contents is an error. A zip that cannot be opened is an error naming the path.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError) as e:
            raise ValueError(
                f"{path}: cannot open this zip ({type(e).__name__}: {e}); the file is truncated "
                "(an interrupted copy or download?), damaged, or not a zip. Copy it again."
            ) from e
        self.infos: dict[str, zipfile.ZipInfo] = {}
        dups: list[str] = []
        for info in infos:
            if info.is_dir() or _is_hidden(info.filename):
                continue
            old = self.infos.get(info.filename)
            if old is not None:
                if (old.CRC, old.file_size) != (info.CRC, info.file_size):
                    raise ValueError(
                        f"{path}: member {info.filename} is stored twice with different contents; "
                        "accepted each member name once. Rebuild the zip."
                    )
                dups.append(info.filename)
            self.infos[info.filename] = info
        if dups:
            logging.warning(
                "data: %s stores %d member names twice with the same contents (%s); each is "
                "counted once.",
                path,
                len(dups),
                _few(sorted(set(dups)), 3),
            )
        self.duplicates = len(dups)
        self._data: bytes | None = None
        self._lock = threading.Lock()

    def list(self, prefix: str) -> list[str]:
        return sorted(n for n in self.infos if n.startswith(prefix))

    def is_dir(self, rel: str) -> bool:
        rel = rel.rstrip("/") + "/"
        return any(n.startswith(rel) for n in self.infos)

    def full(self, rel: str) -> str:
        return f"{self.path}:{rel}"

    def read(self, rel: str) -> bytes:
        with self._lock:
            if self._data is None:
                self._data = _read_file(self.path)
        return _zip_member(self._data, self.infos[rel], self.path)

    def content_id(self, rel: str) -> bytes:
        info = self.infos[rel]
        return struct.pack("<IQ", info.CRC, info.file_size)


_Source = _FolderSource | _ZipSource


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
        return "a file that is not a readable zip (not a zip, or a truncated or damaged one)"
    entries = sorted(
        e + ("/" if os.path.isdir(os.path.join(path, e)) else "") for e in os.listdir(path)
    )
    return f"a folder containing {_few(entries, limit)}" if entries else "an empty folder"


def _few(items: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit]) or "nothing"
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def _detect_layout(data_dir: str, name: str | None = None) -> _Layout | None:
    """The layout of ``data_dir``, or None if it has none of the accepted ones.

    With ``name`` one of the downloadable datasets, a folder holding its prepared ``<name>.npz`` or
    its official archive also counts.
    """
    path = os.path.abspath(data_dir)
    if os.path.isfile(path):
        low = path.lower()
        if low.endswith(".npz"):
            return _Layout("prepared", path)
        if low.endswith((".tar.gz", ".tgz")):
            return _Layout("archive", path)
        if low.endswith(".zip") or zipfile.is_zipfile(path):
            return _Layout("zip", path)
        return None
    if not os.path.isdir(path):
        return None
    if os.path.isdir(os.path.join(path, "train")) and os.path.isfile(
        os.path.join(path, "val", _TINY_ANNOTATIONS)
    ):
        return _Layout("tiny_folder", path)
    if all(os.path.isdir(os.path.join(path, s)) for s in _SPLITS):
        return _Layout("folder", path)
    if all(os.path.isfile(os.path.join(path, s + ".zip")) for s in _SPLITS):
        return _Layout("zips", path)
    if any(
        os.path.isdir(os.path.join(path, s)) or os.path.isfile(os.path.join(path, s + ".zip"))
        for s in _SPLITS
    ):
        # Half a layout is a mistake.
        raise ValueError(
            f"data_dir={data_dir!r}: found {_describe_path(path)}, which has one split but not "
            f"both. {_LAYOUT_HELP}"
        )
    if name in download.ARCHIVES:
        for fname, kind in (
            (download.prepared_filename(name), "prepared"),
            (download.archive_filename(name), "archive"),
        ):
            if os.path.isfile(os.path.join(path, fname)):
                return _Layout(kind, os.path.join(path, fname))
    return None


def _class_split(src: _Source, prefix: str, where: str) -> _Split:
    """The images ``<prefix><class>/.../<image>`` of ``src``, labelled by sorted class name.

    Files that are not images are skipped and counted (a warning names a few); a class folder
    without any image is an error.
    """
    members = src.list(prefix)
    pairs: list[tuple[str, str]] = []
    skipped: list[str] = []
    classes: dict[str, int] = {}
    for rel in members:
        rest = rel[len(prefix) :]
        if "/" not in rest:
            skipped.append(rel)
            continue
        cls = rest.split("/", 1)[0]
        classes.setdefault(cls, 0)
        if _is_image(rest):
            pairs.append((cls, rel))
            classes[cls] += 1
        else:
            skipped.append(rel)
    if isinstance(src, _FolderSource):  # empty class folders have no members to list
        top = os.path.join(src.path, prefix)
        for e in os.listdir(top):
            if not _is_hidden(e) and os.path.isdir(os.path.join(top, e)):
                classes.setdefault(e, 0)
    if not classes:
        found = _describe_path(src.full(prefix)) if isinstance(src, _FolderSource) else None
        found = found or f"{_few([m[len(prefix) :] for m in members])} in {src.path}"
        raise ValueError(f"{where}: found {found} but no class folders. {_LAYOUT_HELP}")
    empty = sorted(c for c, n in classes.items() if n == 0)
    if empty:
        raise ValueError(
            f"{where}: class folders without images (*{', *'.join(IMAGE_EXTENSIONS)}): "
            f"{_few(empty)}. {_LAYOUT_HELP}"
        )
    _report_skipped(where, skipped)
    pairs.sort()
    class_names = tuple(sorted(classes))
    index = {c: i for i, c in enumerate(class_names)}
    names = [rel for _, rel in pairs]
    labels = np.fromiter((index[c] for c, _ in pairs), np.int32, len(pairs))
    return _make_split(src, class_names, names, labels)


def _make_split(
    src: _Source, class_names: tuple[str, ...], rels: list[str], labels: np.ndarray
) -> _Split:
    return _Split(
        class_names=class_names,
        names=[src.full(r) for r in rels],
        labels=labels,
        read=lambda i: src.read(rels[i]),
        keys=rels,
        content_id=lambda i: src.content_id(rels[i]),
    )


def _report_skipped(where: str, skipped: list[str]) -> None:
    if skipped:
        logging.warning(
            "data: %s: skipped %d files that are not images (*%s): %s",
            where,
            len(skipped),
            ", *".join(IMAGE_EXTENSIONS),
            _few(skipped, 5),
        )


def _tiny_splits(src: _Source, root: str, where: str) -> dict[str, _Split]:
    """Tiny ImageNet: ``train/<wnid>/images/*.JPEG`` and ``val/images/*`` labelled by
    ``val/val_annotations.txt`` (the val split becomes the test split; ``test/`` has no labels)."""
    train = _class_split(src, f"{root}train/", f"{where}/train")
    wnids_file = f"{root}wnids.txt"
    try:
        wnids = sorted(src.read(wnids_file).decode().split())
    except (KeyError, FileNotFoundError):
        wnids = None
    if wnids is not None and tuple(wnids) != train.class_names:
        only_w, only_t = set(wnids) - set(train.class_names), set(train.class_names) - set(wnids)
        raise ValueError(
            f"{where}: wnids.txt lists other classes than train/: only in wnids.txt: "
            f"{_few(sorted(only_w))}; only in train/: {_few(sorted(only_t))}."
        )
    index = {c: i for i, c in enumerate(train.class_names)}
    ann = f"{root}val/{_TINY_ANNOTATIONS}"
    rels, labels = [], []
    for lineno, line in enumerate(src.read(ann).decode().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2 or fields[1] not in index:
            raise ValueError(
                f"{src.full(ann)}:{lineno}: {line.strip()!r}; accepted '<file>\\t<wnid>\\t...' with "
                f"a wnid of train/ ({_few(list(train.class_names), 3)})."
            )
        rels.append(f"{root}val/images/{fields[0]}")
        labels.append(index[fields[1]])
    listed = set(src.list(f"{root}val/images/"))
    missing = [r for r in rels if r not in listed]
    if missing or not rels:
        raise ValueError(
            f"{where}: {_TINY_ANNOTATIONS} names {len(rels)} images, {len(missing)} of them "
            f"missing from val/images/ ({_few(missing, 3)})."
        )
    _report_skipped(f"{where}/val/images", sorted(listed - set(rels)))
    order = np.argsort(np.asarray(rels), kind="stable")
    rels = [rels[i] for i in order]
    test = _make_split(src, train.class_names, rels, np.asarray(labels, np.int32)[order])
    return {"train": train, "test": test}


def _read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _zip_member(data: bytes, info: zipfile.ZipInfo, path: str) -> bytes:
    """A member's bytes sliced from the whole zip in memory (stored or deflated, CRC checked)."""
    off = info.header_offset
    try:
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
    except (zlib.error, struct.error, zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(
            f"{path}: member {info.filename} cannot be read ({type(e).__name__}: {e}); the zip is "
            "damaged or truncated. Copy it again."
        ) from e
    if zlib.crc32(out) != info.CRC:
        raise ValueError(f"{path}: member {info.filename} fails its CRC check (corrupt zip).")
    return out


def _list_splits(layout: _Layout) -> tuple[dict[str, _Split], _Layout]:
    """The listed splits, and ``layout`` (kind "tiny_zip" for a zip in Tiny ImageNet's layout)."""
    splits: dict[str, _Split] = {}
    if layout.kind == "folder":
        src = _FolderSource(layout.path)
        for s in _SPLITS:
            splits[s] = _class_split(src, f"{s}/", f"{layout.path}/{s}")
    elif layout.kind == "tiny_folder":
        splits = _tiny_splits(_FolderSource(layout.path), "", layout.path)
    elif layout.kind == "zips":
        for s in _SPLITS:
            zsrc = _ZipSource(os.path.join(layout.path, s + ".zip"))
            names = list(zsrc.infos)
            prefix = f"{s}/" if names and all(n.startswith(f"{s}/") for n in names) else ""
            splits[s] = _class_split(zsrc, prefix, zsrc.path)
    else:  # "zip": one archive, maybe Tiny ImageNet's
        zsrc = _ZipSource(layout.path)
        names = list(zsrc.infos)
        tops = {n.split("/", 1)[0] for n in names if "/" in n}
        roots = [""] + ([next(iter(tops)) + "/"] if len(tops) == 1 else [])
        for root in roots:
            if f"{root}val/{_TINY_ANNOTATIONS}" in zsrc.infos and zsrc.is_dir(f"{root}train"):
                where = f"{layout.path}:{root}".rstrip(":/")
                return _tiny_splits(zsrc, root, where), _Layout("tiny_zip", layout.path, root)
        root = next((r for r in roots if all(zsrc.is_dir(f"{r}{s}") for s in _SPLITS)), None)
        if root is None:
            raise ValueError(
                f"data_dir={layout.path!r}: found {_describe_path(layout.path)}. {_LAYOUT_HELP}"
            )
        for s in _SPLITS:
            splits[s] = _class_split(zsrc, f"{root}{s}/", f"{layout.path}:{root}{s}")
    if splits["train"].class_names != splits["test"].class_names:
        tr, te = set(splits["train"].class_names), set(splits["test"].class_names)
        raise ValueError(
            f"{layout.path}: test classes differ from train classes; only in train: "
            f"{_few(sorted(tr - te))}; only in test: {_few(sorted(te - tr))}."
        )
    return splits, layout


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


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


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
    workers = _workers()
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


# Decode cache -------------------------------------------------------------------------------------


def _cache_key(layout: _Layout, splits: dict[str, _Split]) -> str:
    """A key of the listed content: for every member of both splits its path inside the dataset,
    its label and the identity of its bytes (zip: CRC-32 + size from the central directory; folder:
    a hash of the file). Independent of where the dataset lies and of file times."""
    h = hashlib.sha256(f"cem_jax.decode_cache.v{_CACHE_VERSION}|{layout.kind}".encode())
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for s in _SPLITS:
            split = splits[s]
            h.update(f"|{s}|{len(split.names)}|{'/'.join(split.class_names)}|".encode())
            n = len(split.names)
            chunks = [range(lo, min(lo + 1024, n)) for lo in range(0, n, 1024)]
            parts = pool.map(lambda r, sp=split: [sp.content_id(i) for i in r], chunks)
            ids = (cid for part in parts for cid in part)
            for key, label, cid in zip(split.keys, split.labels.tolist(), ids):
                h.update(f"{key}\0{label}\0".encode())
                h.update(cid)
    return h.hexdigest()[:32]


def _cache_entries(cache_dir: str) -> list[str]:
    """This module's cache files in ``cache_dir`` (also those of older cache versions), newest
    use first."""
    try:
        names = os.listdir(cache_dir)
    except OSError:
        return []
    paths = [os.path.join(cache_dir, n) for n in names if _CACHE_FILE_RE.fullmatch(n)]
    stamped = []
    for p in paths:
        with contextlib.suppress(OSError):
            stamped.append((os.stat(p).st_mtime, p))
    return [p for _, p in sorted(stamped, reverse=True)]


def _read_cache(path: str, splits: dict[str, _Split]) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path``, or None when absent; a damaged entry (truncated, empty, other
    contents) is removed and counts as absent."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        for s in _SPLITS:
            images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
            if (
                images.dtype != np.uint8
                or images.ndim != 4
                or images.shape[-1] != 3
                or labels.shape != (len(splits[s].names),)
                or images.shape[0] != labels.shape[0]
            ):
                raise ValueError(f"{s} arrays {images.shape} {images.dtype} / {labels.shape}")
        if tuple(str(c) for c in arrays["class_names"]) != splits["train"].class_names:
            raise ValueError("other class names")
    except Exception as e:  # any damage: decode again
        logging.warning(
            "data: cache entry %s is damaged (%s: %s); decoding again.", path, type(e).__name__, e
        )
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # most recently used
    return arrays


def _write_cache(cache_dir: str, path: str, arrays: dict[str, np.ndarray]) -> None:
    """Stores ``arrays`` at ``path`` atomically, then keeps only the :data:`CACHE_KEEP` most
    recently used entries. An unwritable cache is a warning: the run goes on uncached."""
    tmp = f"{path}.tmp{os.getpid()}.npz"
    try:
        os.makedirs(cache_dir, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        logging.warning(
            "data: cannot write the decode cache in %s (%s); going on without it (pass "
            "--cache_dir='' to skip it, or a writable folder).",
            cache_dir,
            e,
        )
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return
    for old in _cache_entries(cache_dir)[CACHE_KEEP:]:
        with contextlib.suppress(OSError):
            os.remove(old)
            logging.info("data: removed old cache entry %s", old)


def _load_layout(
    name: str,
    layout: _Layout,
    *,
    train_subset: int | None,
    subset_seed: int,
    cache_dir: str | None,
) -> Dataset:
    splits, layout = _list_splits(layout)
    arrays = None
    if cache_dir is not None:
        start = time.perf_counter()
        cache_file = os.path.join(cache_dir, f"decoded-{_cache_key(layout, splits)}.npz")
        arrays = _read_cache(cache_file, splits)
        if arrays is not None:
            logging.info(
                "data: %s read from cache %s in %.2f s",
                layout.path,
                cache_file,
                time.perf_counter() - start,
            )
        else:
            arrays = _decode_layout(
                name, splits, np.arange(len(splits["train"].names)), layout.path
            )
            _write_cache(cache_dir, cache_file, arrays)
    else:
        train_idx = np.arange(len(splits["train"].names))
        if train_subset is not None:  # decode only the subset: labels are known from the listing
            train_idx = subset_indices(
                splits["train"].labels,
                train_subset,
                num_classes=len(splits["train"].class_names),
                seed=subset_seed,
            )
        arrays = _decode_layout(name, splits, train_idx, layout.path)
    class_names = tuple(str(c) for c in arrays["class_names"])
    ds = Dataset(
        name=_dataset_name(name, layout, class_names),
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int32),
        class_names=class_names,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        source=f"{layout.kind}:{layout.path}",
    )
    if train_subset is not None and ds.num_train != train_subset:  # full arrays (cache): subset now
        ds = subset(ds, train_subset, seed=subset_seed)
    return _with_stats(ds)


def _with_stats(ds: Dataset) -> Dataset:
    """``ds`` with the reference constants of its name, or statistics of its training images."""
    if ds.name in NORMALIZATION:
        mean, std = NORMALIZATION[ds.name]
    else:
        mean, std = channel_stats(ds.train_images)
    return dataclasses.replace(ds, mean=mean, std=std)


def _dataset_name(requested: str | None, layout: _Layout, class_names: Sequence[str]) -> str:
    """The name a folder/zip dataset is reported under (see :func:`load_dataset`)."""
    classes = tuple(class_names)
    base = os.path.basename(os.path.normpath(layout.path))
    for ext in (".zip", ".npz", ".tar.gz", ".tgz"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
    if layout.kind.startswith("tiny"):
        name = "tinyimagenet"
    elif requested in KNOWN_CLASS_NAMES:
        name = requested if classes == KNOWN_CLASS_NAMES[requested] else ""
    elif requested == "tinyimagenet":
        name = requested if all(_WNID_RE.fullmatch(c) for c in classes) else ""
    else:
        name = requested or ""  # facescrub, or a name given to load_image_folder
    if not name:
        name = next((k for k, v in KNOWN_CLASS_NAMES.items() if classes == v), base or "folder")
    if requested and name != requested:
        logging.warning(
            "data: %s is named %r, not %r: its %d classes (%s) are not %s's.",
            layout.path,
            name,
            requested,
            len(classes),
            _few(list(classes), 4),
            requested,
        )
    return name


# --------------------------------------------------------------------------------------------------
# Official CIFAR archives (cem_jax.download)


def _load_cifar(name: str, layout: _Layout | None) -> Dataset:
    """CIFAR from a prepared ``.npz`` or an official archive (``layout``), or, with ``layout=None``,
    downloaded and prepared under :func:`cem_jax.download.default_root` on first use."""
    start = time.perf_counter()
    if layout is None:
        path = download.fetch_cifar(name)
        arrays = download.load_prepared(path, name)
        source = f"download:{path}"
    else:
        base = os.path.basename(layout.path)
        for known in download.ARCHIVES:  # the file's own name says which CIFAR it is
            if base in (download.prepared_filename(known), download.archive_filename(known)):
                name = known
        if name not in download.ARCHIVES:
            raise ValueError(
                f"data_dir={layout.path!r}: a {layout.kind} CIFAR file, but dataset {name!r}; "
                f"accepted for {', '.join(download.ARCHIVES)}."
            )
        if layout.kind == "prepared":
            arrays = download.load_prepared(layout.path, name)
        else:
            arrays = download.read_cifar_archive(name, layout.path)
        source = f"{layout.kind}:{layout.path}"
    logging.info("data: read %s from %s in %.2f s", name, source, time.perf_counter() - start)
    mean, std = NORMALIZATION[name]
    return Dataset(
        name=name,
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"].astype(np.int32),
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"].astype(np.int32),
        class_names=tuple(str(c) for c in arrays["class_names"]),
        mean=mean,
        std=std,
        source=source,
    )


# --------------------------------------------------------------------------------------------------
# TFDS: datasets prepared with tensorflow-datasets (the optional extra cem_jax[tfds])

_TFDS_INSTALL = "pip install 'cem_jax[tfds]'"
_TFDS_FORMATS = ("array_record", "parquet")  # the formats TFDS reads without TensorFlow


class _MissingExtraError(ImportError, ValueError):
    """An optional dependency is missing: an ``ImportError`` that the CLI reports as a
    ``ValueError`` (a one-line error, not a traceback)."""


def is_tfds(name: str) -> bool:
    """Whether ``name`` names a TFDS dataset (``tfds:NAME``; see :func:`load_tfds`).

    >>> is_tfds("tfds:mnist"), is_tfds("cifar10")
    (True, False)
    """
    return isinstance(name, str) and name.startswith(TFDS_PREFIX)


def load_tfds(
    name: str,
    data_dir: str | None = None,
    *,
    train_subset: int | None = None,
    subset_seed: int = 0,
) -> Dataset:
    """A dataset prepared with tensorflow-datasets, read without TensorFlow.

    Needs the optional extra (``pip install 'cem_jax[tfds]'``); ``tensorflow_datasets`` is
    imported here only, never by the other sources.

    Args:
      name: ``tfds:NAME`` or ``NAME``, as TFDS spells it: ``mnist``, ``mnist:3.0.1``,
        ``my_set/config:1.0.0``. Read through ``tfds.builder(NAME, data_dir=data_dir)`` and
        ``builder.as_data_source(split)``: the dataset must be prepared in ``data_dir`` in the
        ``array_record`` or ``parquet`` file format (TFDS's ``tfrecord`` default needs TensorFlow
        to read; the error says how to prepare or convert it).
      data_dir: the TFDS data dir (the folder holding ``<name>/[<config>/]<version>/``);
        ``None``: TFDS's default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
      train_subset, subset_seed: as in :func:`load_dataset` (only the subset is decoded).

    Splits: ``train`` and ``test``; a dataset without ``test`` uses its ``validation`` split as
    the test split (logged). Features: the image is the ``Image`` feature ``image`` (else the
    supervised input, else the first ``Image`` feature), uint8; the label is the ``ClassLabel``
    feature ``label`` (else the supervised target, else the only ``ClassLabel``), whose names
    are the class names. Images are decoded with Pillow as in the folder source (grayscale
    replicated to RGB, alpha dropped) and must all have one square size. Examples keep TFDS's
    stored order.

    Returns:
      The :class:`Dataset` named ``tfds:<name>[/<config>]/<version>`` (TFDS's full name), with
      ``source`` ``tfds:<the version's folder>`` and ``mean``/``std`` of its training images.

    Raises:
      ImportError: tensorflow-datasets is not installed (also a ``ValueError``).
      ValueError: no such dataset prepared in ``data_dir`` (the message says what was looked
        for, where, what is there, and how to prepare it), a malformed name, another file
        format, no test split, no usable image or label feature, images of other sizes, or
        damaged files.
    """
    spec = (name[len(TFDS_PREFIX) :] if is_tfds(name) else name).strip()
    if not spec:
        raise ValueError(
            f"dataset {name!r}: name a TFDS dataset after {TFDS_PREFIX!r}, e.g. {TFDS_PREFIX}mnist."
        )
    tfds = _import_tfds(name)
    builder = _tfds_builder(tfds, spec, data_dir)
    info = builder.info
    where = f"{TFDS_PREFIX}{info.full_name} ({builder.data_dir})"
    formats = sorted(f.value for f in info.available_file_formats())
    if not set(formats) & set(_TFDS_FORMATS):
        raise ValueError(
            f"{where}: prepared in the {', '.join(formats) or 'unknown'} file format, which TFDS "
            f"reads only with TensorFlow; accepted: {', '.join(_TFDS_FORMATS)}. Prepare it again "
            f"with `tfds build {_tfds_base(spec)} --file_format=array_record --data_dir=<dir>`, "
            "or convert it in place with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format=array_record` (both need "
            "TensorFlow, once; reading it then does not)."
        )
    image_key, label_key = _tfds_features(tfds, info, where)
    splits = _tfds_splits(info, where)
    class_names = tuple(str(c) for c in info.features[label_key].names)
    start = time.perf_counter()
    listed = {
        s: _tfds_split(tfds, builder, split, image_key, label_key, class_names, where)
        for s, split in splits.items()
    }
    logging.info(
        "data: read %s (splits %s) in %.2f s",
        where,
        ", ".join(f"{s}={split}" for s, split in splits.items()),
        time.perf_counter() - start,
    )
    train_idx = np.arange(len(listed["train"].names))
    if train_subset is not None:  # decode only the subset: the labels are read already
        train_idx = subset_indices(
            listed["train"].labels, train_subset, num_classes=len(class_names), seed=subset_seed
        )
    arrays = _decode_layout(f"{TFDS_PREFIX}{info.full_name}", listed, train_idx, where)
    mean, std = channel_stats(arrays["train_images"])
    return Dataset(
        name=f"{TFDS_PREFIX}{info.full_name}",
        train_images=arrays["train_images"],
        train_labels=arrays["train_labels"],
        test_images=arrays["test_images"],
        test_labels=arrays["test_labels"],
        class_names=class_names,
        mean=mean,
        std=std,
        source=f"{TFDS_PREFIX}{builder.data_dir}",
    )


def _import_tfds(name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise _MissingExtraError(
            f"dataset {name!r} needs tensorflow-datasets, which is not installed ({e}). Install "
            f'the extra: {_TFDS_INSTALL} (from a checkout: pip install -e ".[tfds]"). TensorFlow '
            "itself is not needed to read a prepared dataset."
        ) from None
    return tfds


def _tfds_base(spec: str) -> str:
    """The dataset (and config) part of a TFDS name: ``"a/b:1.0.0"`` -> ``"a/b"``."""
    return spec.split(":", 1)[0]


def _tfds_root(data_dir: str | None) -> str:
    """The TFDS data dir that ``data_dir`` stands for (TFDS's own default rule for ``None``)."""
    if data_dir is not None:
        return data_dir
    return os.environ.get("TFDS_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), "tensorflow_datasets"
    )


def _tfds_prepared(root: str) -> list[str]:
    """``<name>/<version>`` and ``<name>/<config>/<version>`` prepared under a local ``root``."""
    found = []
    for pattern in ("*/*/dataset_info.json", "*/*/*/dataset_info.json"):
        for path in glob.glob(os.path.join(glob.escape(root), pattern)):
            found.append(os.path.relpath(os.path.dirname(path), root).replace(os.sep, "/"))
    return sorted(found)


def _tfds_holds(root: str) -> str:
    """What a TFDS data dir holds, for error messages."""
    if "://" in root:
        return "a remote data dir"
    if not os.path.isdir(root):
        return "no such folder" if not os.path.exists(root) else "not a folder"
    prepared = _tfds_prepared(root)
    return f"prepared there: {_few(prepared)}" if prepared else "no prepared TFDS dataset there"


def _tfds_prepare_help(spec: str, root: str) -> str:
    return (
        "Prepare it once in the array_record format (reading it needs no TensorFlow; preparing a "
        "TFDS catalog dataset generally does, e.g. pip install tensorflow-cpu): "
        f"`tfds build {_tfds_base(spec)} --file_format=array_record --data_dir={root}`, or in "
        f"Python `tfds.builder({spec!r}, data_dir={root!r}, "
        "file_format='array_record').download_and_prepare()`; or pass --data_dir=<the TFDS data dir "
        "that holds it> (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)."
    )


def _tfds_builder(tfds, spec: str, data_dir: str | None):
    """``tfds.builder(spec)`` of a prepared dataset, or an error saying what is missing."""
    root = _tfds_root(data_dir)
    kwargs = {} if data_dir is None else {"data_dir": data_dir}
    try:
        builder = tfds.builder(spec, **kwargs)
    except tfds.core.DatasetNotFoundError:
        base = _tfds_base(spec).split("/", 1)[0]
        prepared = _tfds_prepared(root) if os.path.isdir(root) else []
        versions = [p for p in prepared if p.startswith(f"{base}/")]
        if versions:  # another version or config of it is there
            hint = f" Prepared there as {_few(versions)}: name one of those."
        else:
            known = {p.split("/", 1)[0] for p in prepared}
            with contextlib.suppress(Exception):  # the catalog, not the (online) community index
                known |= set(tfds.list_builders(with_community_datasets=False))
            close = difflib.get_close_matches(base, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"dataset {TFDS_PREFIX}{spec}: not prepared in {root} and not in TFDS's catalog "
            f"(looked for {root}/{base}/[<config>/]<version>/dataset_info.json; "
            f"{_tfds_holds(root)}).{hint} {_tfds_prepare_help(spec, root)}"
        ) from None
    except (ValueError, AssertionError) as e:  # a malformed name, an unknown version or config
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"dataset {TFDS_PREFIX}{spec}: TFDS cannot open it in {root}: {first} "
            f"({_tfds_holds(root)}). Accepted: {TFDS_PREFIX}<name>[/<config>][:<version>]."
        ) from None
    if not builder.is_prepared():
        raise ValueError(
            f"dataset {TFDS_PREFIX}{spec}: TFDS knows {builder.info.full_name}, but it is not "
            f"prepared in {root} (looked for {builder.data_dir}/dataset_info.json; "
            f"{_tfds_holds(root)}). {_tfds_prepare_help(spec, root)}"
        )
    return builder


def _tfds_features(tfds, info, where: str) -> tuple[str, str]:
    """The keys of the image and the label feature (see :func:`load_tfds`)."""
    features = dict(info.features.items())
    listing = ", ".join(f"{k}: {type(f).__name__}" for k, f in features.items()) or "none"
    supervised = info.supervised_keys if isinstance(info.supervised_keys, tuple) else ()
    supervised = tuple(k if isinstance(k, str) else None for k in supervised[:2]) + (None, None)

    def pick(kind, preferred: str, sup: str | None, what: str) -> str:
        found = [k for k, f in features.items() if isinstance(f, kind)]
        for key in (preferred, sup):
            if key in found:
                return key
        if len(found) == 1 or (found and kind is tfds.features.Image):
            if len(found) > 1:
                logging.info("data: %s: image feature %r of %s", where, found[0], found)
            return found[0]
        raise ValueError(
            f"{where}: no {what} feature to use (features: {listing}); accepted: a "
            f"{kind.__name__} feature named {preferred!r}, the supervised key, or the only one."
        )

    image_key = pick(tfds.features.Image, "image", supervised[0], "image")
    label_key = pick(tfds.features.ClassLabel, "label", supervised[1], "label")
    feature = features[image_key]
    dtype = np.dtype(getattr(feature, "np_dtype", None) or np.uint8)
    if dtype != np.uint8:
        raise ValueError(
            f"{where}: image feature {image_key!r} holds {dtype} images; accepted uint8 images."
        )
    return image_key, label_key


def _tfds_splits(info, where: str) -> dict[str, str]:
    """``{"train": "train", "test": "test" (else "validation")}`` of the TFDS splits."""
    available = list(info.splits.keys())
    test = next((s for s in ("test", "validation") if s in available), None)
    if "train" not in available or test is None:
        raise ValueError(
            f"{where}: splits {_few(sorted(available))}; accepted a 'train' split and a 'test' "
            "split (or, without 'test', a 'validation' split as the test split)."
        )
    if test != "test":
        logging.info("data: %s has no 'test' split: its %r split is the test split", where, test)
    return {"train": "train", "test": test}


def _tfds_split(
    tfds,
    builder,
    split: str,
    image_key: str,
    label_key: str,
    class_names: tuple[str, ...],
    where: str,
) -> _Split:
    """A TFDS split read (images still encoded) as a :class:`_Split` for :func:`_decode_layout`."""
    try:
        source = builder.as_data_source(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        n = len(source)
        encoded: list[bytes] = []
        labels = np.empty(n, np.int64)
        for lo in range(0, n, 1024):
            for j, example in enumerate(source.__getitems__(list(range(lo, min(lo + 1024, n))))):
                encoded.append(bytes(example[image_key]))
                labels[lo + j] = int(example[label_key])
    except Exception as e:  # missing or damaged files, whatever the file format's error
        raise ValueError(
            f"{where}: cannot read split {split!r} ({type(e).__name__}: {e}); its prepared files "
            "are missing or damaged. Prepare the dataset again."
        ) from e
    if n == 0:
        raise ValueError(f"{where}: split {split!r} has no examples.")
    bad = np.flatnonzero((labels < 0) | (labels >= len(class_names)))
    if bad.size:
        raise ValueError(
            f"{where}: split {split!r} example {bad[0]} has label {labels[bad[0]]} ({bad.size} "
            f"such); accepted labels 0..{len(class_names) - 1} of {label_key!r}."
        )
    names = [f"{where} {split}[{i}]" for i in range(n)]
    return _Split(
        class_names=class_names,
        names=names,
        labels=labels.astype(np.int32),
        read=lambda i: encoded[i],
        keys=names,
        content_id=lambda i: b"",  # no decode cache for TFDS datasets
    )
