"""``--dataset=tfds:NAME`` (cem_jax.data.load_tfds) on TFDS datasets prepared here, in the test.

Each dataset is built with a ``tfds.core.GeneratorBasedBuilder`` defined in the test (not registered
in TFDS's catalog, so it is read back the way a user's prepared dataset is: from its files alone),
prepared with ``download_and_prepare`` in the ``array_record`` (or ``parquet``) file format. Neither
preparing (images handed to TFDS as Pillow images) nor reading needs TensorFlow or the network.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cem_jax import config as config_lib
from cem_jax import data

NAME = "tiny_shapes"
CLASSES = ("circle", "square", "triangle")


def _split(n: int, seed: int, shape=(32, 32, 3)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random images (known pixel values, all distinct) and labels cycling the classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return images, (np.arange(n) % len(CLASSES)).astype(np.int64)


def _default_splits() -> dict[str, tuple]:
    return {"train": _split(30, 0), "test": _split(12, 1)}


def _prepare(
    root: pathlib.Path,
    splits: dict[str, tuple] | None = None,
    *,
    name: str = NAME,
    version: str = "1.0.0",
    file_format: str = "array_record",
    shape: tuple = (32, 32, 3),
    image_key: str = "image",
    label_key: str = "label",
    label_feature=None,
) -> pathlib.Path:
    """Prepares ``splits`` ({split: (images, labels)}, an image per example, any sizes) as TFDS
    dataset ``name`` in ``root``; returns the version's folder."""
    splits = _default_splits() if splits is None else splits
    ds_name = name

    class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = ds_name
        VERSION = tfds.core.Version(version)

        def _info(self):
            label = label_feature or tfds.features.ClassLabel(names=list(CLASSES))
            features = {image_key: tfds.features.Image(shape=shape), label_key: label}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict(features)
            )

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in splits}

        def _generate_examples(self, split):
            images, labels = splits[split]
            for i, (image, label) in enumerate(zip(images, labels)):
                pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
                yield f"{split}-{i}", {image_key: pil, label_key: int(label)}

    _Builder(data_dir=str(root), file_format=file_format).download_and_prepare()
    return root / name / version


def _by_image(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    """Examples as sorted (image bytes, label) pairs: comparable whatever the stored order."""
    return sorted((img.tobytes(), int(lab)) for img, lab in zip(images, labels))


@pytest.mark.parametrize("file_format", ["array_record", "parquet"])
def test_prepared_dataset_roundtrip(tmp_path, file_format):
    splits = _default_splits()
    folder = _prepare(tmp_path, splits, file_format=file_format)
    assert NAME not in tfds.list_builders(with_community_datasets=False)  # read from its files

    ds = data.load_dataset(f"tfds:{NAME}", str(tmp_path))

    assert ds.name == f"tfds:{NAME}/1.0.0"
    assert ds.source == f"tfds:{folder}"
    assert ds.class_names == CLASSES
    assert (ds.num_train, ds.num_test, ds.image_size) == (30, 12, 32)
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    for split in ("train", "test"):
        got = _by_image(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
        assert got == _by_image(*splits[split])
    assert (ds.mean, ds.std) == data.channel_stats(ds.train_images)
    # A version named explicitly, and load_tfds directly, read the same data.
    again = data.load_tfds(f"{NAME}:1.0.0", str(tmp_path))
    assert data.dataset_identity(again) == data.dataset_identity(ds)


def test_identity_changes_when_the_data_change(tmp_path):
    splits = _default_splits()
    _prepare(tmp_path / "a", splits)
    _prepare(tmp_path / "b", splits)  # the same data elsewhere
    changed = {s: (imgs.copy(), labs) for s, (imgs, labs) in splits.items()}
    changed["train"][0][5, 0, 0, 0] ^= 1  # one pixel
    _prepare(tmp_path / "c", changed)
    relabelled = {s: (imgs, labs.copy()) for s, (imgs, labs) in splits.items()}
    relabelled["test"][1][0] = (relabelled["test"][1][0] + 1) % 3
    _prepare(tmp_path / "d", relabelled)

    ids = {
        k: data.dataset_identity(data.load_dataset(f"tfds:{NAME}", str(tmp_path / k)))
        for k in "abcd"
    }

    assert ids["a"]["digest"] == ids["b"]["digest"]
    assert ids["a"]["source"] != ids["b"]["source"]
    assert len({ids[k]["digest"] for k in "acd"}) == 3


def test_train_subset_decodes_the_same_images_as_subsetting_after(tmp_path):
    _prepare(tmp_path)
    full = data.load_dataset(f"tfds:{NAME}", str(tmp_path))

    ds = data.load_dataset(f"tfds:{NAME}", str(tmp_path), train_subset=9, subset_seed=3)

    expected = data.subset(full, 9, seed=3)
    np.testing.assert_array_equal(ds.train_images, expected.train_images)
    np.testing.assert_array_equal(ds.train_labels, expected.train_labels)
    assert np.bincount(ds.train_labels).tolist() == [3, 3, 3]
    assert (ds.mean, ds.std) == data.channel_stats(ds.train_images)  # of the subset


def test_grayscale_is_replicated_to_rgb(tmp_path):
    shape = (32, 32, 1)
    splits = {"train": _split(6, 0, shape), "test": _split(3, 1, shape)}
    _prepare(tmp_path, splits, shape=shape)

    ds = data.load_dataset(f"tfds:{NAME}", str(tmp_path))

    assert ds.train_images.shape == (6, 32, 32, 3)
    for split in ("train", "test"):
        rgb = np.repeat(splits[split][0], 3, axis=-1)
        got = _by_image(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
        assert got == _by_image(rgb, splits[split][1])


def test_validation_split_is_the_test_split_without_test(tmp_path, caplog):
    splits = {"train": _split(6, 0), "validation": _split(4, 1)}
    _prepare(tmp_path, splits)

    with caplog.at_level(logging.INFO):
        ds = data.load_dataset(f"tfds:{NAME}", str(tmp_path))

    assert _by_image(ds.test_images, ds.test_labels) == _by_image(*splits["validation"])
    assert "'validation' split is the test split" in caplog.text


def test_other_feature_names_are_found(tmp_path):
    _prepare(tmp_path, image_key="picture", label_key="target")

    ds = data.load_dataset(f"tfds:{NAME}", str(tmp_path))

    assert _by_image(ds.train_images, ds.train_labels) == _by_image(*_default_splits()["train"])


def test_config_accepts_tfds_names():
    config_lib.RunConfig(dataset=f"tfds:{NAME}").validate()
    config_lib.RunConfig(dataset="tfds:my_set/config:1.0.0").validate()
    with pytest.raises(ValueError, match="name a TFDS dataset after 'tfds:'"):
        config_lib.RunConfig(dataset="tfds:").validate()
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; accepted: .*tfds:NAME"):
        config_lib.RunConfig(dataset="imagenet").validate()


# Errors ---------------------------------------------------------------------------------------------


def test_unknown_name_says_what_was_looked_for_and_how_to_prepare(tmp_path):
    _prepare(tmp_path)
    with pytest.raises(ValueError) as err:
        data.load_dataset("tfds:tiny_shapez", str(tmp_path))
    msg = str(err.value)
    assert f"not prepared in {tmp_path}" in msg
    assert f"{tmp_path}/tiny_shapez/[<config>/]<version>/dataset_info.json" in msg
    assert f"prepared there: {NAME}/1.0.0" in msg
    assert f"Did you mean {NAME}" in msg
    assert "tfds build tiny_shapez --file_format=array_record" in msg
    assert "download_and_prepare()" in msg


def test_other_version_names_the_prepared_ones(tmp_path):
    _prepare(tmp_path)
    with pytest.raises(ValueError, match=rf"Prepared there as {NAME}/1\.0\.0"):
        data.load_dataset(f"tfds:{NAME}:2.0.0", str(tmp_path))


def test_catalog_dataset_not_prepared(tmp_path):
    with pytest.raises(ValueError) as err:
        data.load_dataset("tfds:mnist", str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "TFDS knows mnist/" in msg and "no such folder" in msg
    assert "tfds build mnist --file_format=array_record" in msg
    assert not (tmp_path / "nowhere").exists()  # nothing is downloaded or written


def test_malformed_name(tmp_path):
    with pytest.raises(ValueError, match="TFDS cannot open it"):
        data.load_dataset("tfds:Bad Name", str(tmp_path))
    with pytest.raises(ValueError, match="name a TFDS dataset"):
        data.load_dataset("tfds: ", str(tmp_path))


def test_tfrecord_format_says_how_to_convert(tmp_path):
    folder = _prepare(tmp_path)
    info_file = folder / "dataset_info.json"
    info = json.loads(info_file.read_text())
    info["fileFormat"] = "tfrecord"  # as `tfds build` writes by default (writing it needs TF)
    info_file.write_text(json.dumps(info))
    with pytest.raises(ValueError) as err:
        data.load_dataset(f"tfds:{NAME}", str(tmp_path))
    msg = str(err.value)
    assert "tfrecord file format" in msg and "accepted: array_record, parquet" in msg
    assert f"--dataset_version_dir={folder} --out_file_format=array_record" in msg


def test_no_test_split_names_the_splits(tmp_path):
    _prepare(tmp_path, {"train": _split(6, 0), "extra": _split(3, 1)})
    with pytest.raises(
        ValueError, match=r"splits extra, train; accepted a 'train' split and a 'test'"
    ):
        data.load_dataset(f"tfds:{NAME}", str(tmp_path))


def test_images_of_other_sizes(tmp_path):
    mixed = list(_split(4, 0)[0]) + [np.zeros((16, 16, 3), np.uint8)]
    splits = {"train": (mixed, np.arange(5) % 3), "test": _split(3, 1)}
    _prepare(tmp_path, splits, shape=(None, None, 3))
    with pytest.raises(
        ValueError, match=r"train\[\d\]: image size (16x16|32x32) differs from (32x32|16x16)"
    ):
        data.load_dataset(f"tfds:{NAME}", str(tmp_path))


def test_non_square_images(tmp_path):
    splits = {"train": _split(3, 0, (16, 32, 3)), "test": _split(3, 1, (16, 32, 3))}
    _prepare(tmp_path, splits, shape=(16, 32, 3))
    with pytest.raises(ValueError, match="image size 32x16 is not square"):
        data.load_dataset(f"tfds:{NAME}", str(tmp_path))


def test_label_without_class_names(tmp_path):
    _prepare(tmp_path, label_feature=tfds.features.Scalar(np.int64))
    with pytest.raises(ValueError, match="no label feature to use .*label: Scalar"):
        data.load_dataset(f"tfds:{NAME}", str(tmp_path))


def test_damaged_files(tmp_path):
    folder = _prepare(tmp_path)
    (shard,) = folder.glob(f"{NAME}-train.array_record-*")
    shard.write_bytes(shard.read_bytes()[:2000])
    with pytest.raises(ValueError, match="cannot read split 'train'.*missing or damaged"):
        data.load_dataset(f"tfds:{NAME}", str(tmp_path))


def test_missing_extra_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'cem_jax\[tfds\]'") as err:
        data.load_dataset(f"tfds:{NAME}")
    assert isinstance(err.value, ValueError)  # the CLI reports it as a one-line error


def test_other_sources_import_neither_tfds_nor_tensorflow(tmp_path):
    """``import cem_jax.data``, the CIFAR default (a prepared cifar10.npz where it is downloaded to)
    and the synthetic data load without importing tensorflow_datasets or tensorflow."""
    from cem_jax import download

    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8),
        "train_labels": np.arange(10) % 10,
        "test_images": rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
        "test_labels": np.arange(5),
        "class_names": np.asarray(data.KNOWN_CLASS_NAMES["cifar10"]),
        "archive_md5": np.asarray(download.ARCHIVES["cifar10"].md5),
        "version": np.asarray(1),
    }
    np.savez(tmp_path / "cifar10.npz", **arrays)
    script = textwrap.dedent(
        """
        import sys
        from cem_jax import config, data
        config.RunConfig(dataset="tfds:mnist").validate()
        ds = data.load_dataset("cifar10")
        assert ds.source.startswith("download:") and ds.num_train == 10, ds.source
        data.load_dataset("synthetic")
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
        assert not loaded, loaded
        print("ok")
        """
    )
    env = {**os.environ, "CEM_DOWNLOAD_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
