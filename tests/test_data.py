"""Tests of cem_jax.data: folder/zip sources, cache, subsets, normalisation, augmentation, batches."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import shutil
import zipfile
from collections.abc import Sequence

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
    # Not CIFAR-10's classes: named after the folder, normalised with its own statistics.
    assert ds.name == tmp_path.name
    np.testing.assert_allclose(ds.mean, _numpy_stats(ds.train_images)[0], rtol=1e-10)
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


def _no_decode(*args, **kwargs):
    raise AssertionError("decoded although the cache should have been used")


@pytest.mark.parametrize("kind", ["folder", "zips"])
def test_cache_hit_equal_and_keyed_by_content(tmp_path, monkeypatch, kind):
    tree = _make_tree(size=5, seed=8)
    src = tmp_path / "src"
    if kind == "folder":
        _write_folder(src, tree)
    else:
        src.mkdir()
        _write_zip(src / "train.zip", tree, ["train"])
        _write_zip(src / "test.zip", tree, ["test"])
    cache = tmp_path / "cache"
    first = data.load_dataset("facescrub", str(src), cache_dir=str(cache))
    assert len(list(cache.glob("decoded-*.npz"))) == 1
    with monkeypatch.context() as m:
        m.setattr(data, "_decode_split", _no_decode)
        second = data.load_dataset("facescrub", str(src), cache_dir=str(cache))
        # New file times, or the dataset moved elsewhere: same content, still a hit.
        for f in src.rglob("*"):
            os.utime(f, ns=(10**18, 10**18))
        moved = tmp_path / "moved"
        src.rename(moved)
        src = moved
        data.load_dataset("facescrub", str(src), cache_dir=str(cache))
    for field in ("train_images", "train_labels", "test_images", "test_labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
        assert getattr(first, field).dtype == getattr(second, field).dtype
    assert first.class_names == second.class_names
    # Swap two images between classes, keeping every file's size and mtime (cp -p / rsync -a):
    # a new key, decoded again, labels follow the content.
    tree["train"]["ant"][0], tree["train"]["mole"][0] = (
        tree["train"]["mole"][0],
        tree["train"]["ant"][0],
    )
    if kind == "folder":
        _write_folder(src, tree)
    else:
        _write_zip(src / "train.zip", tree, ["train"])
    for f in src.rglob("*"):
        os.utime(f, ns=(10**18, 10**18))
    third = data.load_dataset("facescrub", str(src), cache_dir=str(cache))
    uncached = data.load_dataset("facescrub", str(src))
    np.testing.assert_array_equal(third.train_images, uncached.train_images)
    np.testing.assert_array_equal(third.train_images, _expected(tree, "train")[0])
    assert not np.array_equal(third.train_images, first.train_images)
    assert len(list(cache.glob("decoded-*.npz"))) == 2


def test_cache_keeps_the_most_recently_used(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CACHE_KEEP", 2)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "unrelated.npz").write_bytes(b"not ours")
    (cache / "cifar10-0123456789abcdef0123.npz").write_bytes(b"old cache version")
    os.utime(cache / "cifar10-0123456789abcdef0123.npz", (0, 0))
    roots = [_write_folder(tmp_path / f"ds{i}", _make_tree(size=4, seed=i)) for i in range(3)]

    def entries() -> set[str]:
        return {p.name for p in cache.glob("decoded-*.npz")}

    data.load_dataset("facescrub", str(roots[0]), cache_dir=str(cache))
    (a,) = entries()
    os.utime(cache / a, (1, 1))  # make the order unambiguous on coarse clocks
    data.load_dataset("facescrub", str(roots[1]), cache_dir=str(cache))
    (b,) = entries() - {a}
    os.utime(cache / b, (2, 2))
    assert not (cache / "cifar10-0123456789abcdef0123.npz").exists()  # old version evicted
    data.load_dataset("facescrub", str(roots[0]), cache_dir=str(cache))  # hit: a is now newest
    data.load_dataset("facescrub", str(roots[2]), cache_dir=str(cache))
    assert a in entries() and b not in entries() and len(entries()) == 2
    assert (cache / "unrelated.npz").read_bytes() == b"not ours"


@pytest.mark.parametrize("damage", ["truncated", "empty", "other_arrays"])
def test_damaged_cache_entry_is_a_miss_and_rewritten(tmp_path, damage):
    root = _write_folder(tmp_path / "ds", _make_tree(size=4))
    cache = tmp_path / "cache"
    first = data.load_dataset("facescrub", str(root), cache_dir=str(cache))
    (entry,) = cache.glob("decoded-*.npz")
    good = entry.read_bytes()
    if damage == "truncated":
        entry.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:
        np.savez(entry, train_images=np.zeros((1, 4, 4, 3), np.uint8))
    again = data.load_dataset("facescrub", str(root), cache_dir=str(cache))
    np.testing.assert_array_equal(again.train_images, first.train_images)
    np.testing.assert_array_equal(again.test_labels, first.test_labels)
    assert entry.read_bytes() == good  # rewritten


def test_unwritable_cache_runs_uncached_with_a_warning(tmp_path, caplog):
    root = _write_folder(tmp_path / "ds", _make_tree(size=4))
    blocker = tmp_path / "file"
    blocker.write_text("")
    ds = data.load_dataset("facescrub", str(root), cache_dir=str(blocker / "cache"))
    np.testing.assert_array_equal(ds.train_images, _expected(_make_tree(size=4), "train")[0])
    assert "cannot write the decode cache" in caplog.text


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
    with pytest.raises(ValueError, match=r"a\.png but no class folders.*Accepted"):
        data.load_dataset("facescrub", str(tmp_path))


def test_empty_class_folder(tmp_path):
    _write_folder(tmp_path, _make_tree())
    (tmp_path / "train" / "empty_cls").mkdir()
    with pytest.raises(ValueError, match=r"without images \(\*\.png.*\): empty_cls"):
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
    with pytest.raises(ValueError, match=r"top-level entries are images/, other/.*Accepted"):
        data.load_dataset("facescrub", str(path))


def test_wrong_data_dir_is_an_error_never_a_download(tmp_path, monkeypatch):
    """A given data_dir without a dataset layout errors, saying what it holds and what is
    accepted; nothing is downloaded or written into it."""

    def no_download(*args, **kwargs):
        raise AssertionError("a given data_dir must never trigger a download")

    monkeypatch.setattr(data.download, "fetch_cifar", no_download)
    (tmp_path / "something_else").mkdir()
    for name in ("cifar10", "cifar100"):
        with pytest.raises(ValueError) as err:
            data.load_dataset(name, str(tmp_path))
        msg = str(err.value)
        for part in ("something_else/", "train/<class>", "train.zip", "val_annotations.txt"):
            assert part in msg, part
    with pytest.raises(ValueError, match="no such file or folder"):
        data.load_dataset("cifar10", str(tmp_path / "missing"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something_else"]


def test_zip_class_without_supported_images_is_an_error(tmp_path):
    tree = _make_tree()
    path = _write_zip(tmp_path / "all.zip", tree, ["train", "test"])
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("train/gifs_only/1.gif", b"GIF89a")
        zf.writestr("train/gifs_only/2.bmp", b"BM")
    with pytest.raises(
        ValueError, match=r"all\.zip:train: class folders without images.*gifs_only"
    ):
        data.load_dataset("facescrub", str(path))


def test_zip_duplicates_counted_once_and_skipped_files_reported(tmp_path, caplog):
    tree = _make_tree()
    path = _write_zip(tmp_path / "all.zip", tree, ["train", "test"])
    fname, payload, _ = tree["train"]["ant"][0]
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as zf:
        zf.writestr(f"train/ant/{fname}", payload)  # the same member again
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("train/ant/notes.txt", b"x")
        zf.writestr("test/readme.md", b"x")
    ds = data.load_dataset("facescrub", str(path))
    images, labels, _ = _expected(tree, "train")
    np.testing.assert_array_equal(ds.train_images, images)  # counted once
    np.testing.assert_array_equal(ds.train_labels, labels)
    assert "stores 1 member names twice" in caplog.text
    assert "skipped 1 files that are not images" in caplog.text
    assert "notes.txt" in caplog.text and "readme.md" in caplog.text
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(path, "a") as zf:
        zf.writestr(f"train/ant/{fname}", tree["train"]["ant"][1][1])  # other contents
    with pytest.raises(ValueError, match=rf"train/ant/{fname} is stored twice with different"):
        data.load_dataset("facescrub", str(path))


@pytest.mark.parametrize("layout", ["zip", "zips"])
def test_truncated_zip_names_its_path(tmp_path, layout):
    tree = _make_tree()
    if layout == "zip":
        path = _write_zip(tmp_path / "all.zip", tree, ["train", "test"])
        data_dir = path
    else:
        _write_zip(tmp_path / "train.zip", tree, ["train"])
        path = _write_zip(tmp_path / "test.zip", tree, ["test"])
        data_dir = tmp_path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{path}: cannot open this zip.*truncated"):
        data.load_dataset("facescrub", str(data_dir))


FASHION_CLASSES = ("Ankle_boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt")


def _class_folder(root: pathlib.Path, classes: Sequence[str], size: int = 4) -> pathlib.Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            (root / split / cls / "0.png").write_bytes(_encode(_rng_images(rng, 1, size)[0], "PNG"))
    return root


def test_folder_named_by_its_classes_or_folder(tmp_path, caplog):
    cifar = _class_folder(tmp_path / "my_cifar_copy", CIFAR10_CLASSES)
    ds = data.load_dataset("cifar10", str(cifar))
    assert ds.name == "cifar10"
    assert (ds.mean, ds.std) == data.NORMALIZATION["cifar10"]
    # Asked for cifar100 but holding CIFAR-10's classes: it is CIFAR-10.
    assert data.load_dataset("cifar100", str(cifar)).name == "cifar10"
    # Fashion-MNIST under the default --dataset=cifar10 is never called cifar10.
    fashion = _class_folder(tmp_path / "fashion_mnist", FASHION_CLASSES)
    ds = data.load_dataset("cifar10", str(fashion))
    assert ds.name == "fashion_mnist"
    np.testing.assert_allclose(ds.mean, _numpy_stats(ds.train_images)[0], rtol=1e-10)
    assert "named 'fashion_mnist', not 'cifar10'" in caplog.text
    zpath = shutil.make_archive(str(tmp_path / "fmnist"), "zip", fashion)
    assert data.load_dataset("cifar100", zpath).name == "fmnist"
    assert data.load_image_folder(str(fashion)).name == "fashion_mnist"
    assert data.load_image_folder(str(fashion), name="fmnist28").name == "fmnist28"
    assert data.load_image_folder(str(cifar)).name == "cifar10"
    # tinyimagenet is claimed only for wnid classes.
    assert data.load_dataset("tinyimagenet", str(fashion)).name == "fashion_mnist"
    wnids = _class_folder(tmp_path / "tiny_as_classes", ("n01443537", "n01629819"))
    assert data.load_dataset("tinyimagenet", str(wnids)).name == "tinyimagenet"


WNIDS = ("n02000003", "n01000001", "n01000002")


def _tiny_tree(root: str, size: int = 6) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """Tiny ImageNet's layout as {member path: bytes}; expected train images and test labels."""
    rng = np.random.default_rng(4)
    files: dict[str, bytes] = {}
    train = []
    for wnid in sorted(WNIDS):
        files[f"{root}train/{wnid}/{wnid}_boxes.txt"] = b"boxes"
        for i, arr in enumerate(_rng_images(rng, 2, size)):
            files[f"{root}train/{wnid}/images/{wnid}_{i}.JPEG"] = _encode(arr, "PNG")
            train.append(arr)
    val_labels = [2, 0, 1, 2, 1]  # indices into sorted WNIDS
    lines = []
    for i, lab in enumerate(val_labels):
        files[f"{root}val/images/val_{i}.JPEG"] = _encode(_rng_images(rng, 1, size)[0], "PNG")
        lines.append(f"val_{i}.JPEG\t{sorted(WNIDS)[lab]}\t0\t0\t5\t5")
    files[f"{root}val/val_annotations.txt"] = ("\n".join(lines) + "\n").encode()
    files[f"{root}test/images/test_0.JPEG"] = _encode(_rng_images(rng, 1, size)[0], "PNG")
    files[f"{root}wnids.txt"] = "\n".join(WNIDS).encode()
    files[f"{root}words.txt"] = "\n".join(f"{w}\tthing {w}" for w in WNIDS).encode()
    return files, np.stack(train), np.asarray(val_labels, np.int32)


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_tiny_imagenet_own_layout(tmp_path, kind):
    if kind == "folder":
        files, train, val_labels = _tiny_tree("")
        data_dir = tmp_path / "tiny-imagenet-200"
        for rel, payload in files.items():
            (data_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (data_dir / rel).write_bytes(payload)
    else:
        files, train, val_labels = _tiny_tree("tiny-imagenet-200/")
        data_dir = tmp_path / "tiny-imagenet-200.zip"
        with zipfile.ZipFile(data_dir, "w") as zf:
            for rel, payload in files.items():
                zf.writestr(rel, payload)
    ds = data.load_dataset("cifar10", str(data_dir), cache_dir=str(tmp_path / "cache"))
    assert ds.name == "tinyimagenet"
    assert ds.class_names == tuple(sorted(WNIDS))
    np.testing.assert_array_equal(ds.train_images, train)
    np.testing.assert_array_equal(ds.train_labels, np.repeat(np.arange(3), 2))
    np.testing.assert_array_equal(
        ds.test_labels, val_labels
    )  # val -> test, unlabelled test/ unused
    assert ds.num_test == 5
    assert (ds.mean, ds.std) == data.NORMALIZATION["tinyimagenet"]
    cached = data.load_dataset("tinyimagenet", str(data_dir), cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(cached.test_images, ds.test_images)


def test_tiny_imagenet_bad_annotations(tmp_path):
    files, _, _ = _tiny_tree("")
    files["val/val_annotations.txt"] += b"val_9.JPEG\tn99999999\t0\t0\t1\t1\n"
    for rel, payload in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(payload)
    with pytest.raises(ValueError, match=r"val_annotations\.txt:6: .*n99999999.*accepted"):
        data.load_dataset("tinyimagenet", str(tmp_path))
    files["val/val_annotations.txt"] = b"val_7.JPEG\tn01000001\t0\t0\t1\t1\n"
    (tmp_path / "val/val_annotations.txt").write_bytes(files["val/val_annotations.txt"])
    with pytest.raises(ValueError, match=r"1 of them missing from val/images/ \(.*val_7\.JPEG"):
        data.load_dataset("tinyimagenet", str(tmp_path))


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


def test_symlinked_class_folders(tmp_path):
    tree = _make_tree()
    real = _write_folder(tmp_path / "real", tree)
    linked = tmp_path / "linked"
    for split in ("train", "test"):
        (linked / split).mkdir(parents=True)
        for cls in CLASSES:
            (linked / split / cls).symlink_to(real / split / cls, target_is_directory=True)
    ds = data.load_dataset("facescrub", str(linked))
    np.testing.assert_array_equal(ds.train_images, _expected(tree, "train")[0])
    np.testing.assert_array_equal(ds.test_labels, _expected(tree, "test")[1])
