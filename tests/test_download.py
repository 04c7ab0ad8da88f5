"""Tests of cem_jax.download: the real download-prepare-load path against a local HTTP server."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pathlib
import pickle
import tarfile
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from cem_jax import data, download

CIFAR10_NAMES = data.KNOWN_CLASS_NAMES["cifar10"]
CIFAR100_NAMES = data.KNOWN_CLASS_NAMES["cifar100"]


def _batch(images: np.ndarray, labels: np.ndarray, label_key: bytes) -> bytes:
    """A batch pickled as the official python version: rows of 3072 bytes, channel-major."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"data": rows, label_key: [int(x) for x in labels]}, protocol=2)


def _tarball(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@dataclasses.dataclass
class FakeCifar:
    archive: bytes
    md5: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def _fake_cifar10(per_batch: int = 4) -> FakeCifar:
    rng = np.random.default_rng(0)
    n_train, n_test = 5 * per_batch, 6
    train = rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8)
    train_labels = rng.integers(0, 10, n_train).astype(np.int32)
    test_labels = rng.integers(0, 10, n_test).astype(np.int32)
    folder = "cifar-10-batches-py"
    members = {
        f"{folder}/batches.meta": pickle.dumps(
            {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}, protocol=2
        )
    }
    for b in range(5):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        members[f"{folder}/data_batch_{b + 1}"] = _batch(train[sl], train_labels[sl], b"labels")
    members[f"{folder}/test_batch"] = _batch(test, test_labels, b"labels")
    archive = _tarball(members)
    md5 = hashlib.md5(archive).hexdigest()
    return FakeCifar(archive, md5, train, train_labels, test, test_labels)


def _fake_cifar100() -> FakeCifar:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    train_labels = np.asarray([0, 99, 5, 42, 42, 7, 1], np.int32)
    test_labels = np.asarray([99, 0, 3], np.int32)
    folder = "cifar-100-python"
    members = {
        f"{folder}/meta": pickle.dumps(
            {
                b"fine_label_names": [n.encode() for n in CIFAR100_NAMES],
                b"coarse_label_names": [b"x"] * 20,
            },
            protocol=2,
        ),
        f"{folder}/train": _batch(train, train_labels, b"fine_labels"),
        f"{folder}/test": _batch(test, test_labels, b"fine_labels"),
    }
    archive = _tarball(members)
    return FakeCifar(
        archive, hashlib.md5(archive).hexdigest(), train, train_labels, test, test_labels
    )


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.files`` with HTTP Range support; ``server.cut_after`` drops the connection
    of the next response after that many body bytes."""

    def do_GET(self) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append((self.path, rng))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if start >= len(body) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.cut_after is not None:
            payload, srv.cut_after = payload[: srv.cut_after], None
            self.close_connection = True
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.requests, srv.cut_after = {}, [], None
    srv.base = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(120.0, srv.shutdown)  # bounded even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    try:
        yield srv
    finally:
        watchdog.cancel()
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _serve(srv, name: str, fake: FakeCifar) -> str:
    path = "/mirror/" + download.archive_filename(name)
    srv.files[path] = fake.archive
    return srv.base + path


def _assert_same(ds: data.Dataset, fake: FakeCifar) -> None:
    np.testing.assert_array_equal(ds.train_images, fake.train_images)
    np.testing.assert_array_equal(ds.train_labels, fake.train_labels)
    np.testing.assert_array_equal(ds.test_images, fake.test_images)
    np.testing.assert_array_equal(ds.test_labels, fake.test_labels)
    assert ds.train_labels.dtype == np.int32


def test_cifar10_download_prepare_then_offline_load(server, tmp_path, monkeypatch):
    fake = _fake_cifar10()
    url = _serve(server, "cifar10", fake)
    spec = dataclasses.replace(download.ARCHIVES["cifar10"], url=url, md5=fake.md5)
    monkeypatch.setitem(download.ARCHIVES, "cifar10", spec)
    root = tmp_path / "downloads"
    monkeypatch.setenv(download.ROOT_ENV, str(root))
    ds = data.load_dataset("cifar10")  # the runner's path without --data_dir
    _assert_same(ds, fake)
    assert ds.name == "cifar10" and ds.class_names == CIFAR10_NAMES
    assert (ds.mean, ds.std) == data.NORMALIZATION["cifar10"]
    assert ds.source == f"download:{root / 'cifar10.npz'}"
    files = sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock"))
    assert files == ["cifar10.npz"]  # archive removed, no .part
    assert len(server.requests) == 1
    # Later runs read the prepared file offline: no request.
    server.files.clear()
    again = data.load_dataset("cifar10", train_subset=10)
    assert len(server.requests) == 1
    assert again.num_train == 10
    # The prepared folder or file works as --data_dir (an offline copy).
    for data_dir in (root, root / "cifar10.npz"):
        _assert_same(data.load_dataset("cifar10", str(data_dir)), fake)
    assert len(server.requests) == 1


def test_cifar100_prepare_and_read_archive_as_data_dir(server, tmp_path):
    fake = _fake_cifar100()
    url = _serve(server, "cifar100", fake)
    out = io.StringIO()
    path = download.fetch_cifar(
        "cifar100", str(tmp_path), url=url, md5=fake.md5, stream=out, keep_archive=True
    )
    assert "download cifar-100-python.tar.gz" in out.getvalue()
    arrays = download.load_prepared(path, "cifar100", fake.md5)
    assert tuple(arrays["class_names"]) == CIFAR100_NAMES
    np.testing.assert_array_equal(arrays["train_labels"], fake.train_labels)
    # The official archive itself as --data_dir: the file name says it is CIFAR-100.
    ds = data.load_dataset("cifar10", str(tmp_path / "cifar-100-python.tar.gz"))
    assert ds.name == "cifar100" and ds.num_classes == 100
    _assert_same(ds, fake)
    assert (ds.mean, ds.std) == data.NORMALIZATION["cifar100"]


def test_wrong_checksum_errors_and_leaves_nothing(server, tmp_path):
    fake = _fake_cifar10()
    url = _serve(server, "cifar10", fake)
    with pytest.raises(ValueError, match=rf"md5 of the downloaded file is {fake.md5}, expected 0+"):
        download.fetch_cifar("cifar10", str(tmp_path), url=url, md5="0" * 32)
    left = [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_partial_file_is_resumed_with_range(server, tmp_path):
    fake = _fake_cifar10()
    url = _serve(server, "cifar10", fake)
    part = tmp_path / "cifar-10-python.tar.gz.part"
    part.write_bytes(fake.archive[:1000])
    path = download.fetch_cifar("cifar10", str(tmp_path), url=url, md5=fake.md5)
    assert [r for _, r in server.requests] == ["bytes=1000-"]
    np.testing.assert_array_equal(
        download.load_prepared(path, "cifar10")["test_images"], fake.test_images
    )
    assert not part.exists()


def test_dropped_connection_resumes_or_keeps_the_part(server, tmp_path):
    fake = _fake_cifar10()
    url = _serve(server, "cifar10", fake)
    server.cut_after = 700
    path = download.fetch_cifar("cifar10", str(tmp_path / "a"), url=url, md5=fake.md5)
    assert [r for _, r in server.requests] == [None, "bytes=700-"]
    assert os.path.isfile(path)
    # With no retries left the .part stays, and the next call continues it.
    server.requests.clear()
    server.cut_after = 900
    with pytest.raises(OSError, match=r"interrupted 1 times.*900 bytes are kept"):
        download.fetch_cifar("cifar10", str(tmp_path / "b"), url=url, md5=fake.md5, retries=0)
    assert (tmp_path / "b" / "cifar-10-python.tar.gz.part").stat().st_size == 900
    path = download.fetch_cifar("cifar10", str(tmp_path / "b"), url=url, md5=fake.md5)
    assert [r for _, r in server.requests] == [None, "bytes=900-"]
    _assert_same(data.load_dataset("cifar10", path), fake)


def test_damaged_prepared_file_is_prepared_again(server, tmp_path):
    fake = _fake_cifar10()
    url = _serve(server, "cifar10", fake)
    (tmp_path / "cifar10.npz").write_bytes(b"truncated")
    path = download.fetch_cifar("cifar10", str(tmp_path), url=url, md5=fake.md5)
    assert len(server.requests) == 1
    _assert_same(data.load_dataset("cifar10", path), fake)
    # As --data_dir, a damaged file is an error naming it (never rewritten there).
    pathlib.Path(path).write_bytes(b"")
    with pytest.raises(ValueError, match=r"cifar10\.npz: not a readable prepared cifar10 file"):
        data.load_dataset("cifar10", str(tmp_path))


def test_offline_error_says_what_to_do(tmp_path):
    with pytest.raises(
        OSError, match=r"download of http://127\.0\.0\.1:9/x\.tar\.gz failed.*--data_dir"
    ):
        download.fetch_cifar("cifar10", str(tmp_path), url="http://127.0.0.1:9/x.tar.gz", timeout=5)
    assert not (tmp_path / "cifar10.npz").exists()


def test_archive_pickles_may_hold_only_arrays(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    members = {
        "cifar-10-batches-py/batches.meta": pickle.dumps({b"label_names": Evil()}, protocol=2)
    }
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(_tarball(members))
    with pytest.raises(ValueError, match=r"not the official cifar10 archive.*refusing to load"):
        download.read_cifar_archive("cifar10", str(path))
    other = tmp_path / "other.tar.gz"
    other.write_bytes(_tarball({"readme": b"x"}))
    with pytest.raises(ValueError, match=r"cifar-10-batches-py/batches\.meta"):
        download.read_cifar_archive("cifar10", str(other))
