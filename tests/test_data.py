"""Tests of cem_jax.data: folder/zip sources, cache, subsets, normalisation, augmentation, batches."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats
from PIL import Image

from cem_jax import data

CIFAR10_DIR = (
    pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "cifar10_jpeg"
)
CIFAR10_CLASSES = (
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
)

# Created in this (unsorted) order on purpose; labels must follow the sorted names.
CLASSES = ("zebra", "ant", "mole")
COUNTS = {"train": (3, 4, 2), "test": (2, 1, 2)}


def _rng_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str, mode: str = "RGB") -> bytes:
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _make_tree(size: int = 6, seed: int = 0, fmt: str = "PNG") -> dict[str, dict[str, list]]:
    """{split: {class: [(filename, bytes, expected_rgb_array)]}} of random images."""
    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    tree: dict[str, dict[str, list]] = {}
    for split in ("train", "test"):
        tree[split] = {}
        for cls, n in zip(CLASSES, COUNTS[split]):
            items = []
            for i, arr in enumerate(_rng_images(rng, n, size)):
                items.append((f"{i:03d}.{ext}", _encode(arr, fmt), arr))
            tree[split][cls] = items
    return tree


def _write_folder(root: pathlib.Path, tree) -> pathlib.Path:
    for split, classes in tree.items():
        for cls, items in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for fname, payload, _ in items:
                (root / split / cls / fname).write_bytes(payload)
    return root


def _write_zip(path: pathlib.Path, tree, splits, prefix: str = "", compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compression) as zf:
        for split in splits:
            zf.writestr(f"{prefix}{split}/", b"")
            for cls, items in tree[split].items():
                for fname, payload, _ in items:
                    zf.writestr(f"{prefix}{split}/{cls}/{fname}", payload)
    return path


def _expected(tree, split: str) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """ImageFolder order: sorted classes, files sorted by name within a class."""
    images, labels, payloads = [], [], []
    for label, cls in enumerate(sorted(tree[split])):
        for _, payload, arr in sorted(tree[split][cls], key=lambda t: t[0]):
            images.append(arr)
            labels.append(label)
            payloads.append(payload)
    return np.stack(images), np.asarray(labels, np.int32), payloads


def _numpy_stats(images: np.ndarray):
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))


# --------------------------------------------------------------------------------------------------
# Folder and zip sources


def test_folder_png_roundtrip_and_labels(tmp_path):
    tree = _make_tree(size=6, fmt="PNG")
    root = _write_folder(tmp_path / "ds", tree)
    ds = data.load_dataset("facescrub", str(root))
    assert ds.class_names == tuple(sorted(CLASSES))
    for split in ("train", "test"):
        images, labels, _ = _expected(tree, split)
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)
        assert getattr(ds, f"{split}_labels").dtype == np.int32
    assert ds.mean == data.NORMALIZATION["facescrub"][0]
    assert ds.std == data.NORMALIZATION["facescrub"][1]
    assert ds.source == f"folder:{root}"
    assert (ds.num_classes, ds.image_size, ds.num_train, ds.num_test) == (3, 6, 9, 5)


def test_unknown_folder_name_computes_stats(tmp_path):
    tree = _make_tree(size=5, fmt="PNG", seed=3)
    root = _write_folder(tmp_path / "mydata", tree)
    ds = data.load_image_folder(str(root))
    assert ds.name == "mydata"
    mean, std = _numpy_stats(_expected(tree, "train")[0])
    np.testing.assert_allclose(ds.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(ds.std, std, rtol=1e-10)


def test_grayscale_and_rgba_become_rgb(tmp_path):
    rng = np.random.default_rng(1)
    arrs = _rng_images(rng, 3, 4)
    for split in ("train", "test"):
        d = tmp_path / split / "only"
        d.mkdir(parents=True)
        (d / "gray.png").write_bytes(_encode(arrs[0], "PNG", "L"))
        (d / "rgba.png").write_bytes(_encode(arrs[1], "PNG", "RGBA"))
        (d / "rgb.png").write_bytes(_encode(arrs[2], "PNG"))
        (d / "notes.txt").write_text("not an image")
    ds = data.load_image_folder(str(tmp_path), name="x")
    gray = np.asarray(Image.fromarray(arrs[0]).convert("L"))
    np.testing.assert_array_equal(ds.train_images[0], np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_array_equal(ds.train_images[1], arrs[2])  # "rgb" sorts before "rgba"
    np.testing.assert_array_equal(ds.train_images[2], arrs[1])
    assert ds.num_train == 3  # the .txt file is ignored


def test_train_test_zips_jpeg_stored_and_deflated(tmp_path):
    tree = _make_tree(size=8, fmt="JPEG", seed=5)
    _write_zip(tmp_path / "train.zip", tree, ["train"], compression=zipfile.ZIP_STORED)
    _write_zip(tmp_path / "test.zip", tree, ["test"], compression=zipfile.ZIP_DEFLATED)
    ds = data.load_dataset("cifar10", str(tmp_path))
    assert ds.source == f"zips:{tmp_path}"
    assert ds.class_names == tuple(sorted(CLASSES))
    assert ds.mean == data.NORMALIZATION["cifar10"][0]
    for split in ("train", "test"):
        _, labels, payloads = _expected(tree, split)
        decoded = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), decoded)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)


def test_zips_with_class_members_at_top(tmp_path):
    """train.zip may also hold <class>/... directly (no train/ prefix)."""
    tree = _make_tree(size=4, seed=6)
    for split in ("train", "test"):
        with zipfile.ZipFile(tmp_path / f"{split}.zip", "w") as zf:
            for cls, items in tree[split].items():
                for fname, payload, _ in items:
                    zf.writestr(f"{cls}/{fname}", payload)
    ds = data.load_dataset("tinyimagenet", str(tmp_path))
    np.testing.assert_array_equal(ds.train_images, _expected(tree, "train")[0])
    np.testing.assert_array_equal(ds.test_labels, _expected(tree, "test")[1])


def test_hidden_entries_ignored(tmp_path):
    """.ipynb_checkpoints, dot files and __MACOSX/ are neither classes nor images."""
    tree = _make_tree(size=4, seed=9)
    root = _write_folder(tmp_path / "ds", tree)
    png = tree["train"]["ant"][0][1]
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / ".ipynb_checkpoints" / "x.png").write_bytes(png)
    (root / "train" / "ant" / "._000.png").write_bytes(b"resource fork")
    ds = data.load_dataset("facescrub", str(root))
    assert ds.class_names == tuple(sorted(CLASSES))
    np.testing.assert_array_equal(ds.train_images, _expected(tree, "train")[0])
    zdir = tmp_path / "zips"
    zdir.mkdir()
    for split in ("train", "test"):
        _write_zip(zdir / f"{split}.zip", tree, [split])
        with zipfile.ZipFile(zdir / f"{split}.zip", "a") as zf:
            zf.writestr(f"__MACOSX/{split}/ant/._000.png", b"resource fork")
    ds = data.load_dataset("facescrub", str(zdir))
    np.testing.assert_array_equal(ds.test_images, _expected(tree, "test")[0])


@pytest.mark.parametrize("prefix", ["", "facescrub48/"])
def test_single_zip(tmp_path, prefix):
    tree = _make_tree(size=6, seed=7)
    path = _write_zip(tmp_path / "all.zip", tree, ["train", "test"], prefix=prefix)
    ds = data.load_dataset("facescrub", str(path))
    assert ds.source == f"zip:{path}"
    for split in ("train", "test"):
        images, labels, _ = _expected(tree, split)
        np.testing.assert_array_equal(getattr(ds, f"{split}_images"), images)
        np.testing.assert_array_equal(getattr(ds, f"{split}_labels"), labels)


@pytest.mark.parametrize("kind", ["folder", "zips"])
def test_cache_hit_equal_and_invalidated(tmp_path, monkeypatch, kind):
    tree = _make_tree(size=5, seed=8)
    src = tmp_path / "src"
    if kind == "folder":
        _write_folder(src, tree)
        touched = src / "train" / "ant" / "000.png"
    else:
        src.mkdir()
        _write_zip(src / "train.zip", tree, ["train"])
        _write_zip(src / "test.zip", tree, ["test"])
        touched = src / "test.zip"
    cache = tmp_path / "cache"
    first = data.load_dataset("facescrub", str(src), cache_dir=str(cache))
    assert len(list(cache.glob("*.npz"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although the cache should have been used")

    with monkeypatch.context() as m:
        m.setattr(data, "_decode_split", no_decode)
        second = data.load_dataset("facescrub", str(src), cache_dir=str(cache))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
        assert getattr(first, field).dtype == getattr(second, field).dtype
    assert first.class_names == second.class_names
    # A source file with a new mtime is a new cache key: decoded again.
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    third = data.load_dataset("facescrub", str(src), cache_dir=str(cache))
    np.testing.assert_array_equal(third.train_images, first.train_images)
    assert len(list(cache.glob("*.npz"))) == 2


# --------------------------------------------------------------------------------------------------
# Errors


def test_unknown_name_lists_datasets():
    with pytest.raises(ValueError, match="name='imagenet'") as err:
        data.load_dataset("imagenet")
    for name in data.DATASETS:
        assert name in str(err.value)


def test_missing_test_split(tmp_path):
    _write_folder(tmp_path, {"train": _make_tree()["train"]})
    with pytest.raises(ValueError, match=r"train/.*not both.*test/<class>"):
        data.load_dataset("facescrub", str(tmp_path))


def test_no_class_folders(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.png").write_bytes(_encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.raises(ValueError, match=r"a\.png.*no class folders.*Expected"):
        data.load_dataset("facescrub", str(tmp_path))


def test_empty_class_folder(tmp_path):
    _write_folder(tmp_path, _make_tree())
    (tmp_path / "train" / "empty_cls").mkdir()
    with pytest.raises(ValueError, match="without images: empty_cls"):
        data.load_dataset("facescrub", str(tmp_path))


def test_test_classes_must_match(tmp_path):
    tree = _make_tree()
    del tree["test"]["mole"]
    _write_folder(tmp_path, tree)
    with pytest.raises(ValueError, match=r"only in train: mole; only in test: nothing"):
        data.load_dataset("facescrub", str(tmp_path))


def test_mixed_sizes_name_file_and_sizes(tmp_path):
    _write_folder(tmp_path, _make_tree(size=6))
    odd = tmp_path / "test" / "mole" / "001.png"
    odd.write_bytes(_encode(np.zeros((7, 7, 3), np.uint8), "PNG"))
    with pytest.raises(ValueError, match=r"mole/001\.png: image size 7x7 differs from 6x6"):
        data.load_dataset("facescrub", str(tmp_path))


def test_non_square(tmp_path):
    for split in ("train", "test"):
        (tmp_path / split / "c").mkdir(parents=True)
        (tmp_path / split / "c" / "a.png").write_bytes(
            _encode(np.zeros((4, 6, 3), np.uint8), "PNG")
        )
    with pytest.raises(ValueError, match="6x4 is not square"):
        data.load_dataset("facescrub", str(tmp_path))


def test_undecodable_image(tmp_path):
    _write_folder(tmp_path, _make_tree())
    (tmp_path / "train" / "ant" / "zzz.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"zzz\.png: cannot decode"):
        data.load_dataset("facescrub", str(tmp_path))


def test_folder_only_datasets_need_a_layout(tmp_path):
    with pytest.raises(ValueError, match="data_dir=None.*train/<class>"):
        data.load_dataset("tinyimagenet")
    (tmp_path / "images").mkdir()
    (tmp_path / "readme.txt").write_text("")
    with pytest.raises(ValueError, match=r"found a folder containing images/, readme\.txt"):
        data.load_dataset("facescrub", str(tmp_path))


def test_single_zip_without_splits(tmp_path):
    path = tmp_path / "bad.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("images/a/1.png", _encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
        zf.writestr("other/b/1.png", _encode(np.zeros((4, 4, 3), np.uint8), "PNG"))
    with pytest.raises(ValueError, match=r"top-level entries are images/, other/.*Expected"):
        data.load_dataset("facescrub", str(path))


def test_tfds_failure_is_explained(tmp_path, monkeypatch):
    """Offline, tfds cannot download: the error says what data_dir held and what to do."""
    import tensorflow_datasets as tfds

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    monkeypatch.setattr(tfds, "data_source", offline)
    (tmp_path / "something_else").mkdir()
    with pytest.raises(ValueError) as err:
        data.load_dataset("cifar100", str(tmp_path))
    msg = str(err.value)
    for part in (
        "something_else/",
        "train/<class>",
        "train.zip",
        "internet",
        "tfds build cifar100",
    ):
        assert part in msg, part
    assert "no internet" in msg


# --------------------------------------------------------------------------------------------------
# Subsets


def test_subset_balanced_deterministic_and_decodes_same_images(tmp_path):
    rng = np.random.default_rng(0)
    sizes = (7, 7, 7)
    tree = {"train": {}, "test": {}}
    for cls, n in zip(CLASSES, sizes):
        tree["train"][cls] = [
            (f"{i:02d}.png", _encode(a, "PNG"), a) for i, a in enumerate(_rng_images(rng, n, 4))
        ]
        tree["test"][cls] = tree["train"][cls][:1]
    root = _write_folder(tmp_path / "ds", tree)
    full = data.load_dataset("facescrub", str(root))
    sub = data.load_dataset("facescrub", str(root), train_subset=12, subset_seed=3)
    np.testing.assert_array_equal(np.bincount(sub.train_labels, minlength=3), [4, 4, 4])
    # The subset is a sub-multiset of the full set with matching labels.
    idx = data.subset_indices(full.train_labels, 12, num_classes=3, seed=3)
    np.testing.assert_array_equal(sub.train_images, full.train_images[idx])
    np.testing.assert_array_equal(sub.train_labels, full.train_labels[idx])
    again = data.load_dataset("facescrub", str(root), train_subset=12, subset_seed=3)
    np.testing.assert_array_equal(again.train_images, sub.train_images)
    cached = data.load_dataset(
        "facescrub", str(root), train_subset=12, subset_seed=3, cache_dir=str(tmp_path / "c")
    )
    np.testing.assert_array_equal(cached.train_images, sub.train_images)
    other = data.load_dataset("facescrub", str(root), train_subset=12, subset_seed=4)
    assert not np.array_equal(other.train_images, sub.train_images)
    np.testing.assert_array_equal(sub.test_images, full.test_images)


def test_subset_indices_water_filling():
    labels = np.repeat(np.arange(4), [2, 10, 10, 5])
    for num in range(4, 28):
        for seed in range(3):
            idx = data.subset_indices(labels, num, num_classes=4, seed=seed)
            assert len(idx) == num == len(np.unique(idx))
            counts = np.bincount(labels[idx], minlength=4)
            avail = np.bincount(labels, minlength=4)
            assert np.all(counts <= avail)
            # Every class that still has images left is within one of the largest count.
            assert np.all(counts[counts < avail] >= counts.max() - 1)
    with pytest.raises(ValueError, match=r"train_subset=3: accepted 4 \(num_classes\) \.\. 27"):
        data.subset_indices(labels, 3, num_classes=4)
    with pytest.raises(ValueError, match="train_subset=28"):
        data.subset_indices(labels, 28, num_classes=4)


def test_subset_on_synthetic():
    ds = data.load_dataset("synthetic", train_subset=20, synthetic_shape=(100, 10, 4, 5))
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [4] * 5)
    with pytest.raises(ValueError, match="train_subset=4"):
        data.load_dataset("synthetic", train_subset=4, synthetic_shape=(100, 10, 4, 5))


# --------------------------------------------------------------------------------------------------
# Synthetic data


def test_synthetic_deterministic_and_shapes():
    a = data.synthetic_dataset(num_train=50, num_test=20, image_size=12, num_classes=5, seed=1)
    b = data.synthetic_dataset(num_train=50, num_test=20, image_size=12, num_classes=5, seed=1)
    c = data.synthetic_dataset(num_train=50, num_test=20, image_size=12, num_classes=5, seed=2)
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.train_images, c.train_images)
    assert a.train_images.shape == (50, 12, 12, 3) and a.test_images.shape == (20, 12, 12, 3)
    np.testing.assert_array_equal(np.bincount(a.train_labels), [10] * 5)
    mean, std = _numpy_stats(a.train_images)
    np.testing.assert_allclose(a.mean, mean, rtol=1e-10)
    np.testing.assert_allclose(a.std, std, rtol=1e-10)
    s = data.load_dataset("synthetic", synthetic_shape=(50, 20, 12, 5))
    assert (s.num_train, s.num_test, s.image_size, s.num_classes) == (50, 20, 12, 5)


def test_synthetic_is_learnable():
    """A linear softmax on normalised pixels learns it far above chance (0.1) in 40 Adam steps."""
    ds = data.synthetic_dataset(num_train=512, num_test=256, image_size=16, num_classes=10)
    x_tr = normalize_flat(ds.train_images, ds)
    x_te = normalize_flat(ds.test_images, ds)
    params = {"w": jnp.zeros((x_tr.shape[1], 10)), "b": jnp.zeros(10)}
    opt = optax.adam(1e-2)
    state = opt.init(params)

    def loss_fn(p, x, y):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(p, s, x, y):
        g = jax.grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s)
        return optax.apply_updates(p, u), s

    batches = data.epoch_batches(jax.random.key(0), ds.num_train, 64)
    for i in range(40):
        b = batches[i % batches.shape[0]]
        params, state = step(params, state, x_tr[b], ds.train_labels[np.asarray(b)])
    acc = float(jnp.mean(jnp.argmax(x_te @ params["w"] + params["b"], -1) == ds.test_labels))
    assert acc > 0.6, acc


def normalize_flat(images, ds):
    return data.normalize(images, ds.mean, ds.std).reshape(images.shape[0], -1)


# --------------------------------------------------------------------------------------------------
# Device transforms


def test_normalize_denormalize_against_numpy():
    rng = np.random.default_rng(0)
    images = _rng_images(rng, 4, 5)
    mean, std = data.NORMALIZATION["cifar100"]
    expected = (images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std)
    out = data.normalize(images, mean, std)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # float input in [0, 1] gives the same result as uint8 input
    np.testing.assert_allclose(data.normalize(images / 255.0, mean, std), out, atol=1e-5)
    np.testing.assert_allclose(data.denormalize(out, mean, std), images / 255.0, atol=1e-6)
    np.testing.assert_allclose(data.to_float(images), images / 255.0, atol=1e-7)
    # out-of-range values are clipped to [0, 1]
    far = np.asarray([[-10.0, 0.0, 10.0]], np.float32)
    expected_clip = np.clip(far * np.asarray(std) + np.asarray(mean), 0.0, 1.0)
    np.testing.assert_allclose(data.denormalize(far, mean, std), expected_clip, atol=1e-7)
    with pytest.raises(ValueError, match="mean="):
        data.normalize(images, (0.5, 0.5), std)


def _augment_candidates(images: np.ndarray, pad: int) -> np.ndarray:
    """[B, (2·pad+1)²·2, H, W, 3]: every crop of the zero-padded image, unflipped then flipped."""
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crops = []
    for flip in (False, True):
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                crop = padded[:, dy : dy + h, dx : dx + w]
                crops.append(crop[:, :, ::-1] if flip else crop)
    return np.stack(crops, axis=1)


def _match(out: np.ndarray, images: np.ndarray, pad: int) -> np.ndarray:
    """For each output, the index of the unique candidate it equals (asserts exactly one)."""
    cands = _augment_candidates(images, pad)
    out_u8 = np.round(np.asarray(out) * 255.0).astype(np.uint8)
    eq = np.all(cands == out_u8[:, None], axis=(2, 3, 4))
    np.testing.assert_array_equal(eq.sum(axis=1), 1)
    return np.argmax(eq, axis=1)


@pytest.mark.parametrize("size", [8, 11])
def test_augment_is_a_crop_of_padded_maybe_flipped(size):
    rng = np.random.default_rng(size)
    images = _rng_images(rng, 64, size)
    key = jax.random.key(1)
    out = jax.jit(data.augment)(key, images)
    chex.assert_shape(out, (64, size, size, 3))
    assert out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    which = _match(out, images, 4)
    flips = which >= 81
    assert 0 < flips.sum() < 64
    assert len(np.unique(which % 81)) >= 20
    np.testing.assert_array_equal(data.augment(key, images), out)
    assert not np.array_equal(data.augment(jax.random.key(2), images), out)


def test_augment_distribution_uniform():
    """Offsets uniform on the 81 positions and flips fair (chi-square, fixed key)."""
    rng = np.random.default_rng(0)
    images = _rng_images(rng, 1024, 9)  # larger than 2·4, so no two crops coincide
    which = _match(data.augment(jax.random.key(3), images), images, 4)
    counts = np.bincount(which % 81, minlength=81)
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    assert scipy.stats.binomtest(int((which >= 81).sum()), 1024, 0.5).pvalue > 1e-3


def test_augment_options():
    rng = np.random.default_rng(0)
    images = _rng_images(rng, 16, 6)
    ident = data.augment(jax.random.key(0), images, padding=0, flip=False)
    np.testing.assert_allclose(ident, images / 255.0, atol=1e-7)
    which = _match(data.augment(jax.random.key(0), images, padding=2, flip=False), images, 2)
    assert np.all(which < 25)
    with pytest.raises(ValueError, match="images: got shape"):
        data.augment(jax.random.key(0), images[0])


def test_epoch_batches():
    key = jax.random.key(4)
    batches = data.epoch_batches(key, 103, 10)
    chex.assert_shape(batches, (10, 10))
    assert batches.dtype == jnp.int32
    flat = np.asarray(batches).ravel()
    assert len(np.unique(flat)) == 100
    assert flat.min() >= 0 and flat.max() < 103
    np.testing.assert_array_equal(data.epoch_batches(key, 103, 10), batches)
    assert not np.array_equal(data.epoch_batches(jax.random.key(5), 103, 10), batches)
    # not the identity order
    assert not np.array_equal(np.sort(flat), flat)
    np.testing.assert_array_equal(
        np.sort(np.asarray(data.epoch_batches(key, 8, 8)).ravel()), range(8)
    )
    with pytest.raises(ValueError, match="batch_size=11"):
        data.epoch_batches(key, 10, 11)


def test_dataset_validates_shapes():
    ds = data.synthetic_dataset(num_train=8, num_test=4, image_size=4, num_classes=2)
    with pytest.raises(ValueError, match="train_labels"):
        data.Dataset(**{**ds.__dict__, "train_labels": ds.train_labels[:3]})


# --------------------------------------------------------------------------------------------------
# Real data (optional)


@pytest.mark.skipif(
    not (CIFAR10_DIR / "train.zip").exists(),
    reason=f"real CIFAR-10 JPEG zips not present at {CIFAR10_DIR}",
)
def test_real_cifar10_zips():
    ds = data.load_dataset("cifar10", str(CIFAR10_DIR), train_subset=500)
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.train_images.shape == (500, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [50] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)
    # The reference CIFAR-10 mean, recomputed on the test set, agrees to JPEG precision.
    np.testing.assert_allclose(_numpy_stats(ds.test_images)[0], ds.mean, atol=0.01)


def test_dataset_identity_is_json_and_tracks_content():
    ds = data.synthetic_dataset(num_train=40, num_test=20, image_size=8, num_classes=4)
    ident = data.dataset_identity(ds)
    assert set(ident) == {"name", "source", "class_names", "num_train", "num_test", "digest"}
    assert json.loads(json.dumps(ident)) == ident
    assert (ident["num_train"], ident["num_test"]) == (40, 20)
    assert ident["class_names"] == list(ds.class_names)
    assert len(ident["digest"]) == 64
    # Same data (fresh copies of the arrays) -> same dict.
    again = data.synthetic_dataset(num_train=40, num_test=20, image_size=8, num_classes=4)
    assert data.dataset_identity(again) == ident

    def changed(**kw) -> str:
        return data.dataset_identity(dataclasses.replace(ds, **kw))["digest"]

    px = ds.test_images.copy()
    px[3, 1, 2, 0] ^= 1
    lab = ds.train_labels.copy()
    lab[0] = (lab[0] + 1) % 4
    swapped = ds.train_images.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    digests = {
        ident["digest"],
        changed(test_images=px),
        changed(train_labels=lab),
        changed(train_images=swapped),
        # The same bytes moved from train to test are other data.
        changed(
            train_images=ds.train_images[:-1],
            train_labels=ds.train_labels[:-1],
            test_images=np.concatenate([ds.train_images[-1:], ds.test_images]),
            test_labels=np.concatenate([ds.train_labels[-1:], ds.test_labels]),
        ),
    }
    assert len(digests) == 5
