"""Where a run's files live: a local folder, or a Google Cloud Storage prefix (``gs://bucket/path``).

The few file operations of a run (``results.json``, ``metrics.jsonl``, the workdir lock, the
figures, a sweep's tables, setting a damaged checkpoint aside) go through this module; the
checkpoints themselves go through orbax, which reads and writes ``gs://`` on its own (TensorStore's
GCS driver).

Local paths keep POSIX semantics: a write goes to a fresh temporary file (``mkstemp``, ``O_EXCL``)
that is ``fsync``-ed and swapped in with ``os.replace``, so a reader sees the old or the new content.
On ``gs://`` an object upload is atomic in the same sense (a reader sees the old or the new object,
never part of one), so a write is one upload, with no temporary object. GCS has no rename and no
append: a "move" is a copy then a delete, and files are always rewritten whole.

Remote paths go through `fsspec <https://filesystem-spec.readthedocs.io>`_ (``gcsfs``, which is also
what ``etils.epath`` uses for ``gs://`` when TensorFlow is absent), with its listings cache off:
another process's writes (a sweep collecting runs, a second run checking the lock) are seen at once.
Install the ``gcs`` extra (``pip install -e ".[gcs]"``) for ``gs://``; only ``gs://`` is accepted
and tested (against a local GCS emulator, ``tests/test_storage.py``).

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> write_text(join(d, "a.json"), "{}")
>>> read_text(join(d, "a.json")), exists(join(d, "a.json")), is_remote("gs://bucket/run")
('{}', True, True)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from cem_jax.errors import CemError

#: URL schemes accepted for a workdir or a sweep root (besides local paths).
REMOTE_SCHEMES = ("gs",)
_TMP_SUFFIX = ".tmp"


class StorageError(CemError, ValueError):
    """A path that cannot be used (an unsupported scheme, a missing ``gcsfs``)."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``scheme://...``) rather than a local path."""
    return "://" in os.fspath(path)


def check(path: str | os.PathLike, what: str = "path") -> None:
    """Raises :class:`StorageError` for a URL this module cannot serve, saying what is accepted."""
    path = os.fspath(path)
    if not is_remote(path):
        return
    scheme = path.split("://", 1)[0]
    if scheme not in REMOTE_SCHEMES:
        raise StorageError(
            f"{what} {path}: the {scheme}:// scheme is not supported; accepted: a local or mounted "
            "folder, or gs://bucket/path (Google Cloud Storage)."
        )
    if not path.split("://", 1)[1].strip("/"):
        raise StorageError(f"{what} {path}: name a bucket, e.g. gs://my-bucket/runs/cem.")
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise StorageError(
            f"{what} {path}: gs:// needs gcsfs, which is not installed. Install it with "
            '`pip install -e ".[gcs]"` (or `pip install gcsfs`).'
        ) from None


@functools.cache
def _filesystem(scheme: str) -> Any:
    import fsspec

    # No listings cache: files written by other processes (other hosts, a sweep's other shards)
    # must be seen; a run does a few dozen such reads, not thousands.
    return fsspec.filesystem(scheme, use_listings_cache=False, skip_instance_cache=True)


def _fs(path: str) -> tuple[Any, str]:
    """The fsspec filesystem of a remote ``path`` and the path without its scheme."""
    scheme, rest = path.split("://", 1)
    return _filesystem(scheme), rest


def reset() -> None:
    """Forgets the remote filesystem objects (tests: after pointing ``gs://`` at an emulator)."""
    _filesystem.cache_clear()


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name/...`` (``/`` separators on URLs, ``os.path.join`` locally)."""
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)])
    return os.path.join(base, *names)


def absolute(path: str | os.PathLike) -> str:
    """``os.path.abspath`` for local paths; URLs unchanged (they are absolute already)."""
    path = os.fspath(path)
    return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def parent(path: str | os.PathLike) -> str:
    path = absolute(path)
    return path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(path)


def basename(path: str | os.PathLike) -> str:
    path = absolute(path)
    return path.rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return bool(fs.exists(p))


def isdir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder (on GCS: a prefix with at least one object under it)."""
    path = os.fspath(path)
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return bool(fs.isdir(p))


def listdir(path: str | os.PathLike) -> list[str]:
    """The names in folder ``path``, sorted (``[]`` for a missing remote prefix)."""
    path = os.fspath(path)
    if not is_remote(path):
        return sorted(os.listdir(path))
    fs, p = _fs(path)
    try:
        entries = fs.ls(p, detail=False)
    except FileNotFoundError:
        return []
    return sorted({e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != p})


def makedirs(path: str | os.PathLike) -> None:
    """Creates folder ``path`` and its parents (nothing to do on GCS: prefixes need no creation)."""
    path = os.fspath(path)
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The content of file ``path``; ``FileNotFoundError`` if there is none."""
    path = os.fspath(path)
    if not is_remote(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = _fs(path)
    return bytes(fs.cat_file(p))


def read_text(path: str | os.PathLike) -> str:
    return read_bytes(path).decode()


def write_bytes(
    path: str | os.PathLike, data: bytes, *, before_commit: Callable[[], None] | None = None
) -> None:
    """Replaces file ``path`` with ``data``, atomically: a reader sees the old or the new content.

    Locally through a fresh temporary file beside it (:func:`tempfile.mkstemp`: a new, unique name
    opened with ``O_EXCL``, so a planted file or symlink is never written through), ``fsync``-ed,
    then ``os.replace``; on GCS one upload. ``before_commit`` runs just before the new content
    becomes visible (a test hook).
    """
    path = os.fspath(path)
    if is_remote(path):
        if before_commit is not None:
            before_commit()
        fs, p = _fs(path)
        fs.pipe_file(p, data)
        return
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(
    path: str | os.PathLike, text: str, *, before_commit: Callable[[], None] | None = None
) -> None:
    """:func:`write_bytes` of ``text`` (UTF-8)."""
    write_bytes(path, text.encode(), before_commit=before_commit)


def remove_stale_temp_files(folder: str | os.PathLike, names: tuple[str, ...]) -> None:
    """Removes the temporary files that killed writers of ``names`` left in a local ``folder``
    (call it only while no writer can be running, e.g. under the workdir lock). Remote writes
    leave none."""
    folder = os.fspath(folder)
    if is_remote(folder):
        return
    for entry in os.listdir(folder):
        if entry.endswith(_TMP_SUFFIX) and any(entry.startswith(f".{n}.") for n in names):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, entry))


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Creates file ``path`` holding ``text`` only if it does not exist; returns whether it did.

    Locally ``O_CREAT | O_EXCL``. On GCS an upload with the precondition ``ifGenerationMatch=0``
    (GCS refuses it if the object exists, so two racing creators cannot both win), after an
    existence check (which also covers stores that ignore the precondition, such as emulators).
    """
    path = os.fspath(path)
    if not is_remote(path):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    fs, p = _fs(path)
    if fs.exists(p):
        return False
    try:
        fs.pipe_file(p, text.encode(), mode="create")
    except FileExistsError:
        return False
    except OSError as e:  # gcsfs reports a failed precondition as an HTTP 412
        if "412" in str(e) or "precondition" in str(e).lower():
            return False
        raise
    return True


def remove(path: str | os.PathLike) -> None:
    """Deletes file ``path`` if it exists."""
    path = os.fspath(path)
    if not is_remote(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    fs, p = _fs(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(p)


def remove_tree(path: str | os.PathLike) -> None:
    """Deletes folder ``path`` and everything in it, if it exists."""
    path = os.fspath(path)
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path)
        return
    from etils import epath

    p = epath.Path(path)
    if p.exists():
        p.rmtree()  # through epath, like move_tree, so orbax's cached listings see it at once


def move_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Moves folder ``src`` to ``dst`` (creating ``dst``'s parents); on GCS a copy, then a delete."""
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_remote(src):
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        shutil.move(src, dst)
        return
    from etils import epath

    fs, s = _fs(src)
    _, d = _fs(dst)
    fs.copy(s, d, recursive=True)
    # deleted through etils.epath, whose GCS client (orbax's) caches listings: this way the
    # deletion also clears its cache, and orbax stops listing the moved step at once
    epath.Path(src).rmtree()


def orbax_path(path: str | os.PathLike) -> Any:
    """The path as orbax takes it (an ``etils.epath.Path``, which serves ``gs://`` as well)."""
    from etils import epath

    return epath.Path(absolute(path))
