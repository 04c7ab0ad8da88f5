"""CIFAR-10/100 from the official archives, without TensorFlow (DESIGN §2.1).

:func:`fetch_cifar` downloads ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` from the
University of Toronto (or ``$CEM_DATASET_MIRROR``), verifies the md5 published there, and prepares a
``<name>.npz`` of uint8 arrays that later runs read offline in a fraction of a second:

* **where**: ``root`` if given, else ``$CEM_DOWNLOAD_DIR``, else ``~/.cache/cem_jax/datasets``
  (:func:`default_root`);
* **atomic**: bytes go to ``<archive>.part``; only a file whose md5 matches is renamed to the archive
  name, and the ``.npz`` is written to a temporary name and renamed, so a killed process never
  leaves a file that looks finished;
* **resumable**: a ``.part`` left by an interrupted download is continued with an HTTP ``Range``
  request (a dropped connection is also resumed, up to ``retries`` times, within one call);
* **checked**: an md5 mismatch deletes the ``.part`` and raises, naming the URL and both sums;
* **one at a time**: a lock file next to the archive keeps two processes from writing one ``.part``.

The archive is deleted once the ``.npz`` is prepared (``keep_archive=True`` keeps it). The ``.npz``
holds ``train_images [N,32,32,3] uint8``, ``train_labels [N] int32``, the same for ``test``,
``class_names`` and the archive's md5. The pickles inside the archives are read with an unpickler
that only accepts plain containers and numpy arrays.

From the command line: ``python -m cem_jax.download cifar10 [cifar100] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import http.client
import io
import os
import pickle
import sys
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

import numpy as np

from cem_jax.errors import DownloadError
from cem_jax.progress import ProgressBar

ROOT_ENV = "CEM_DOWNLOAD_DIR"
MIRROR_ENV = "CEM_DATASET_MIRROR"
_PREPARED_VERSION = 1
_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "class_names")


@dataclasses.dataclass(frozen=True)
class Archive:
    """An official dataset archive: where it is, its md5, and its layout inside the tarball."""

    url: str
    md5: str
    folder: str  # top-level folder inside the tarball
    train_members: tuple[str, ...]
    test_member: str
    meta_member: str
    label_key: bytes  # labels inside each batch
    names_key: bytes  # class names inside meta
    num_classes: int


ARCHIVES: dict[str, Archive] = {
    "cifar10": Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_member="test_batch",
        meta_member="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": Archive(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_members=("train",),
        test_member="test",
        meta_member="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}


def default_root() -> str:
    """``$CEM_DOWNLOAD_DIR`` if set, else ``~/.cache/cem_jax/datasets``."""
    return os.environ.get(ROOT_ENV) or os.path.join(
        os.path.expanduser("~"), ".cache", "cem_jax", "datasets"
    )


def archive_filename(name: str) -> str:
    """``"cifar10"`` -> ``"cifar-10-python.tar.gz"`` (the official archive's file name)."""
    return _archive(name).url.rsplit("/", 1)[-1]


def prepared_filename(name: str) -> str:
    """``"cifar10"`` -> ``"cifar10.npz"``."""
    _archive(name)
    return f"{name}.npz"


def fetch_cifar(
    name: str,
    root: str | None = None,
    *,
    url: str | None = None,
    md5: str | None = None,
    stream: TextIO | None = None,
    keep_archive: bool = False,
    timeout: float = 60.0,
    retries: int = 3,
) -> str:
    """The path of ``<root>/<name>.npz``, downloading and preparing it first if needed.

    Args:
      name: ``"cifar10"`` or ``"cifar100"``.
      root: folder to download into (default :func:`default_root`); created if missing.
      url: archive URL (default: the official one, or ``$CEM_DATASET_MIRROR/<archive file>``).
      md5: expected md5 of the archive (default: the official one).
      stream: where the progress bar goes (default stderr).
      keep_archive: keep the ``.tar.gz`` after preparing.
      timeout: seconds without data before a connection counts as dropped.
      retries: how many times a dropped connection is resumed within this call.

    Raises:
      ValueError: md5 mismatch, or an archive that is not in the official format.
      DownloadError: (an ``OSError``) the download failed (offline, HTTP error); the message says
        how to go on.
    """
    spec = _archive(name)
    root = os.path.abspath(root or default_root())
    md5 = (md5 or spec.md5).lower()
    if url is None:
        mirror = os.environ.get(MIRROR_ENV)
        url = f"{mirror.rstrip('/')}/{archive_filename(name)}" if mirror else spec.url
    prepared = os.path.join(root, prepared_filename(name))
    if _prepared_ok(prepared, name, md5):
        return prepared
    os.makedirs(root, exist_ok=True)
    archive = os.path.join(root, archive_filename(name))
    with _lock(archive + ".lock"):
        if _prepared_ok(prepared, name, md5):  # another process finished while we waited
            return prepared
        if not (os.path.isfile(archive) and file_md5(archive) == md5):
            download_file(url, archive, md5=md5, stream=stream, timeout=timeout, retries=retries)
        arrays = read_cifar_archive(name, archive)
        arrays["archive_md5"] = np.asarray(md5)
        arrays["version"] = np.asarray(_PREPARED_VERSION)
        tmp = f"{prepared}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, prepared)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        if not keep_archive:
            os.remove(archive)
    return prepared


def load_prepared(path: str, name: str, md5: str | None = None) -> dict[str, np.ndarray]:
    """The arrays of a prepared ``.npz`` (see module docstring), checked.

    Raises:
      ValueError: the file is missing, damaged, or not a prepared ``name`` (saying which).
    """
    spec = _archive(name)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # truncated, empty, not an npz
        raise ValueError(
            f"{path}: not a readable prepared {name} file ({type(e).__name__}: {e}). Delete it; "
            f"it is rebuilt from the official archive."
        ) from e
    missing = [k for k in (*_KEYS, "archive_md5") if k not in arrays]
    if missing:
        raise ValueError(f"{path}: not a prepared {name} file (missing {', '.join(missing)}).")
    if md5 is not None and str(arrays["archive_md5"]) != md5.lower():
        raise ValueError(
            f"{path}: prepared from an archive with md5 {arrays['archive_md5']}, not {md5}."
        )
    _check_arrays(arrays, spec, path)
    return {k: arrays[k] for k in _KEYS}


def file_md5(path: str, chunk_size: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(
    url: str,
    dest: str,
    *,
    md5: str | None = None,
    stream: TextIO | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    chunk_size: int = 1 << 16,
) -> str:
    """Downloads ``url`` to ``dest`` through ``dest + ".part"`` (resumed with HTTP Range if present).

    ``dest`` appears only complete and, when ``md5`` is given, verified. Returns ``dest``.

    Raises:
      ValueError: md5 mismatch (the ``.part`` is deleted).
      DownloadError: (an ``OSError``) no connection, an HTTP error, or more than ``retries``
        dropped connections (the ``.part`` is kept, so calling again resumes).
    """
    part = dest + ".part"
    drops = 0
    while True:
        try:
            done = _download_once(url, part, stream=stream, timeout=timeout, chunk_size=chunk_size)
        except (urllib.error.HTTPError, urllib.error.URLError) as e:
            why = e if isinstance(e, urllib.error.HTTPError) else e.reason
            raise DownloadError(
                f"download of {url} failed ({why}). Check the connection (or set ${MIRROR_ENV} to "
                f"a mirror of the archive), or copy the dataset to this machine and pass it as "
                f"--data_dir: the archive, or the .npz that `python -m cem_jax.download "
                f"{' '.join(ARCHIVES)} --root DIR` prepares in DIR on a machine with network access."
            ) from e
        except (OSError, EOFError, http.client.HTTPException) as e:  # dropped: resume
            drops += 1
            have = os.path.getsize(part) if os.path.exists(part) else 0
            if drops > retries:
                raise DownloadError(
                    f"download of {url} was interrupted {drops} times ({e}); {have} bytes are "
                    f"kept in {part} and the next attempt resumes from there."
                ) from e
            time.sleep(min(0.5 * drops, 5.0))
            continue
        if done:
            break
    if md5 is not None:
        got = file_md5(part)
        if got != md5.lower():
            os.remove(part)
            raise ValueError(
                f"{url}: md5 of the downloaded file is {got}, expected {md5.lower()}; the file is "
                f"not the expected archive (deleted). Check the URL or ${MIRROR_ENV}."
            )
    os.replace(part, dest)
    return dest


def read_cifar_archive(name: str, path: str) -> dict[str, np.ndarray]:
    """The arrays (see module docstring) of an official CIFAR ``.tar.gz`` at ``path``.

    Raises:
      ValueError: the file is not a tarball in the official layout, naming what is missing.
    """
    spec = _archive(name)
    try:
        with tarfile.open(path, "r:*") as tar:

            def member(base: str) -> dict:
                fh = tar.extractfile(f"{spec.folder}/{base}")
                if fh is None:
                    raise KeyError(f"{spec.folder}/{base}")
                return _SafeUnpickler(io.BytesIO(fh.read()), encoding="bytes").load()

            meta = member(spec.meta_member)
            train = [member(b) for b in spec.train_members]
            test = member(spec.test_member)
    except (tarfile.TarError, KeyError, EOFError, OSError, pickle.UnpicklingError) as e:
        raise ValueError(
            f"{path}: not the official {name} archive ({type(e).__name__}: {e}); accepted the "
            f"python version, {archive_filename(name)}, holding {spec.folder}/"
            f"{{{','.join((*spec.train_members, spec.test_member, spec.meta_member))}}}."
        ) from e

    def images_labels(batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        data = np.concatenate([np.asarray(b[b"data"], np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[spec.label_key], np.int64) for b in batches])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return np.ascontiguousarray(images), labels.astype(np.int32)

    arrays: dict[str, np.ndarray] = {}
    arrays["train_images"], arrays["train_labels"] = images_labels(train)
    arrays["test_images"], arrays["test_labels"] = images_labels([test])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    arrays["class_names"] = np.asarray(names, dtype=str)
    _check_arrays(arrays, spec, path)
    return arrays


# --------------------------------------------------------------------------------------------------


def _archive(name: str) -> Archive:
    if name not in ARCHIVES:
        raise ValueError(f"name={name!r}: downloadable datasets are {', '.join(ARCHIVES)}.")
    return ARCHIVES[name]


def _check_arrays(arrays: dict[str, Any], spec: Archive, where: str) -> None:
    if len(arrays["class_names"]) != spec.num_classes:
        raise ValueError(
            f"{where}: {len(arrays['class_names'])} class names, expected {spec.num_classes}."
        )
    for s in ("train", "test"):
        images, labels = arrays[f"{s}_images"], arrays[f"{s}_labels"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 3):
            raise ValueError(f"{where}: {s} images have shape {images.shape} {images.dtype}.")
        if labels.shape != images.shape[:1] or labels.size == 0:
            raise ValueError(f"{where}: {s} labels have shape {labels.shape}.")
        if labels.min() < 0 or labels.max() >= spec.num_classes:
            raise ValueError(f"{where}: {s} labels outside 0..{spec.num_classes - 1}.")


def _prepared_ok(path: str, name: str, md5: str) -> bool:
    if not os.path.isfile(path):
        return False
    try:
        load_prepared(path, name, md5)
    except ValueError:
        return False  # damaged or from another archive: prepared again
    return True


def _download_once(
    url: str, part: str, *, stream: TextIO | None, timeout: float, chunk_size: int
) -> bool:
    """One HTTP request appending to ``part``. True when the file is complete."""
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={"User-Agent": "cem_jax"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the .part is complete
            return True
        raise
    with response:
        if have and response.status == 206:
            mode = "ab"
            start = int(response.headers.get("Content-Range", "bytes 0-").split()[1].split("-")[0])
            if start != have:
                raise urllib.error.URLError(f"server resumed at byte {start}, not {have}")
        else:  # 200: the server sent the whole file
            mode, have = "wb", 0
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        mib = 1 << 20
        bar = ProgressBar(
            max(1, -(-(total or 0) // mib)),
            f"download {url.rsplit('/', 1)[-1]}",
            stream=stream,
            unit="MiB",
        )
        reported = have // mib
        bar.count = reported
        got = have
        with open(part, mode) as out:
            while True:
                chunk = response.read(chunk_size)
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
                if got // mib > reported:
                    bar.update(got // mib - reported)
                    reported = got // mib
        if total is not None and got < total:
            raise EOFError(f"connection closed after {got} of {total} bytes")
        if bar.count < bar.total:
            bar.update(bar.total - bar.count)
        bar.close()
    return True


@contextlib.contextmanager
def _lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class _SafeUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only (the CIFAR pickles hold nothing else)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"),
        ("copyreg", "_reconstructor"),
        ("__builtin__", "object"),
        ("builtins", "object"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset pickle")
        if module.startswith(("numpy.core.", "numpy._core.")):
            module = _NUMPY_CORE + "." + module.split(".", 2)[2]
        elif module == "__builtin__":
            module = "builtins"
        elif module == "copy_reg":
            module = "copyreg"
        return super().find_class(module, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cem_jax.download",
        description="Download and prepare CIFAR-10/100 for offline use.",
    )
    parser.add_argument("names", nargs="+", choices=sorted(ARCHIVES))
    parser.add_argument("--root", default=None, help=f"default ${ROOT_ENV} or {default_root()}")
    args = parser.parse_args(argv)
    for name in args.names:
        print(fetch_cifar(name, args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
