"""One whole run, as ``experiments/run.py`` drives it: data → train → attacks → report.

Everything here takes a :class:`~cem_jax.config.RunConfig` and a workdir; nothing reads flags. The
workdir receives ``checkpoints/`` (orbax, resumable), ``attack_checkpoints/`` (the attacks' progress,
removed once the results are saved), ``metrics.jsonl`` (one line per epoch, rebuilt
from the checkpoint's history on resume), ``results.json`` (written atomically, only complete) and
``reconstructions.png``. The workdir is a local folder or ``gs://bucket/path``
(:mod:`cem_jax.storage`). A run holds ``<workdir>/.lock`` while it works (on ``gs://`` a renewed
lease): a second run on the same workdir is refused, naming the process that holds it. A workdir is
never reused for another configuration or other data: its ``results.json`` and ``metrics.jsonl`` are
never overwritten by them.

On several processes (:func:`cem_jax.parallel.initialize_distributed`) every process runs the same
code on the same workdir; process 0 holds the lock and alone writes ``metrics.jsonl``,
``results.json`` and the figure (the others wait for it at a barrier); orbax checkpoints are saved
by all of them together.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import io
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import jax
import numpy as np
from jax.sharding import Mesh

from cem_jax import config as config_lib
from cem_jax import data as data_lib
from cem_jax import errors, parallel, storage, train
from cem_jax.checkpoint import Checkpointer, CheckpointError, fault_point
from cem_jax.progress import ProgressBar, format_duration

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
#: A lock on a remote (gs://) workdir is a lease: its holder renews it every LEASE_RENEW_S seconds,
#: and a lock not renewed for LEASE_S seconds is stale (its holder was killed or preempted).
LEASE_S = 300.0
LEASE_RENEW_S = 60.0


class RunError(errors.CemError, RuntimeError):
    """A run cannot go on (incompatible workdir, NaN loss, unfinished run for an attack)."""


def load_data(cfg: config_lib.RunConfig, cache_dir: str | None = None) -> data_lib.Dataset:
    """The dataset of ``cfg`` with its train/test subsets applied.

    Raises :class:`cem_jax.errors.InputError` for data that are missing, unreadable, damaged or in
    no accepted layout (the messages of :mod:`cem_jax.data` and :mod:`cem_jax.download`), and
    :class:`cem_jax.errors.DownloadError` when the download fails.
    """
    try:
        ds = data_lib.load_dataset(
            cfg.dataset,
            cfg.data_dir,
            train_subset=cfg.train_subset,
            subset_seed=cfg.seed,
            cache_dir=cache_dir,
        )
    except ValueError as e:  # cem_jax's own messages; a ValueError from numpy & co. is a bug
        if isinstance(e, errors.CemError) or not errors.raised_by(e, "cem_jax"):
            raise
        raise errors.InputError(str(e)) from e
    except OSError as e:  # a file or folder that cannot be read (or the download folder written)
        if isinstance(e, errors.CemError) or not e.filename:
            raise
        raise errors.InputError(
            f"loading the {cfg.dataset} data failed: {e.strerror or e}: {e.filename}. Check "
            "--data_dir (or, where CIFAR is downloaded, $CEM_DOWNLOAD_DIR)."
        ) from e
    if cfg.test_subset is not None and cfg.test_subset < ds.num_test:
        rng = np.random.default_rng(cfg.seed)
        idx = np.sort(rng.permutation(ds.num_test)[: cfg.test_subset])
        ds = _replace(ds, test_images=ds.test_images[idx], test_labels=ds.test_labels[idx])
    return ds


def _replace(ds: data_lib.Dataset, **kw: Any) -> data_lib.Dataset:
    import dataclasses

    return dataclasses.replace(ds, **kw)


def check_workdir(workdir: str) -> None:
    """Refuses (:class:`RunError`) a workdir URL that :mod:`cem_jax.storage` cannot serve (a scheme
    other than ``gs://``, or ``gs://`` without ``gcsfs``), saying what is accepted."""
    try:
        storage.check(workdir, "--workdir")
    except storage.StorageError as e:
        raise RunError(str(e)) from None


def _workdir_mesh(workdir: str, num_devices: int | None, device_index: int | None) -> Mesh:
    """:func:`check_workdir`, then the run's mesh; a bad device choice is a :class:`RunError`."""
    check_workdir(workdir)
    try:
        return parallel.make_mesh(num_devices, device_index=device_index)
    except ValueError as e:
        raise RunError(str(e)) from e


def write_text_atomic(path: str, text: str) -> None:
    """Replaces ``path`` (local or ``gs://``) with ``text`` atomically (:func:`cem_jax.storage.write_text`):
    readers see the old or the new content, never a partial one."""
    hook = (
        (lambda: fault_point("results_write")) if storage.basename(path) == RESULTS_FILE else None
    )
    storage.write_text(path, text, before_commit=hook)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default))


def write_metrics(path: str, history: list[dict[str, Any]]) -> None:
    """``metrics.jsonl``: one line per epoch of ``history``, rewritten whole (atomically)."""
    write_text_atomic(path, "".join(json.dumps(m, default=_json_default) + "\n" for m in history))


def _remove_stale_temp_files(workdir: str) -> None:
    """Temporary files of writers that were killed (only called while holding the lock)."""
    storage.remove_stale_temp_files(workdir, (RESULTS_FILE, METRICS_FILE))


# ------------------------------------------------------------------------------------------ lock
def _holder_text(info: dict[str, Any]) -> str:
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
        f"{info.get('started', '?')}" + (f" ({info['command']})" if info.get("command") else "")
    )


def _writable_problem(workdir: str) -> str | None:
    """Why ``workdir`` cannot be written (None if it can, or does not exist yet). A remote workdir
    is not probed: a write that is refused fails with the store's own error."""
    if storage.is_remote(workdir):
        return None
    target = workdir
    while not os.path.exists(target):
        parent = os.path.dirname(os.path.abspath(target))
        if parent == os.path.abspath(target):
            break
        target = parent
    if not os.path.isdir(target):
        return f"{target} is not a folder"
    if not os.access(target, os.W_OK | os.X_OK):
        return f"{target} is not writable (permission denied or a read-only file system)"
    return None


@contextlib.contextmanager
def lock_workdir(workdir: str, *, stream: TextIO | None = None) -> Iterator[dict[str, Any]]:
    """Holds ``<workdir>/.lock`` (an exclusive ``flock``) for the duration of the block.

    Creates ``workdir``. Raises :class:`RunError` if the workdir cannot be written, or if another
    process holds the lock (naming its pid, host and start time). The kernel releases a ``flock``
    when its process dies, so the lock of a killed run is stale by construction and is taken over
    (with a note naming the dead holder). Yields the holder record written into the file.

    On a remote (``gs://``) workdir, where nothing is released when a process dies, the lock is a
    lease (:func:`_lease_lock`): renewed every :data:`LEASE_RENEW_S` seconds by its holder, taken
    over once its holder's process on this host is gone or it has not been renewed for
    :data:`LEASE_S` seconds, deleted on exit.
    """
    out = stream if stream is not None else sys.stderr
    if storage.is_remote(workdir):
        with _lease_lock(workdir, out) as me:
            yield me
        return
    problem = _writable_problem(workdir)
    if problem is not None:
        raise RunError(
            f"cannot use --workdir={workdir}: {problem}. A run writes its checkpoints, "
            "metrics.jsonl and results.json there: pass a writable --workdir."
        )
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise RunError(
            f"cannot use --workdir={workdir}: creating {path} failed ({e.strerror}). A run writes "
            "its checkpoints, metrics.jsonl and results.json there: pass a writable --workdir."
        ) from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunError(
                f"{workdir} is in use by another run: {_holder_text(_read_holder(fd))}. Wait for "
                f"it to end (or stop it), or use another --workdir; the lock ({path}) is released "
                "when that process exits."
            ) from None
        stale = _read_holder(fd)
        if stale:
            print(
                f"note: taking over the stale lock of {workdir} from {_holder_text(stale)}, which "
                "no longer holds it (killed or crashed).",
                file=out,
                flush=True,
            )
        me = _holder_record()
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    finally:
        os.close(fd)  # releases the flock


def _holder_record(lease: bool = False) -> dict[str, Any]:
    me: dict[str, Any] = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv)),
    }
    if lease:
        me.update(token=uuid.uuid4().hex, lease_s=LEASE_S, renewed=time.time())
    return me


def _read_lease(path: str) -> dict[str, Any] | None:
    """The record of a remote lock (``None`` if there is none; ``{}`` if it does not parse)."""
    try:
        info = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _dead_here(info: dict[str, Any]) -> bool:
    """Whether the lock's holder ran on this host and its process is gone."""
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, another user's
        return False
    return False


def _lease_age(info: dict[str, Any]) -> float:
    """Seconds since the lease was last renewed (infinite for a record without a renewal time)."""
    renewed = info.get("renewed")
    return time.time() - float(renewed) if isinstance(renewed, int | float) else float("inf")


@contextlib.contextmanager
def _lease_lock(workdir: str, out: TextIO) -> Iterator[dict[str, Any]]:
    """The lock of a remote workdir: ``<workdir>/.lock``, an object naming its holder, created only
    if absent (:func:`cem_jax.storage.create_exclusive`), renewed by a background thread, deleted
    on exit. A lock is stale, and a restarted run takes it over with a note, when its holder ran on
    this host and its process is gone, or when it has not been renewed for its ``lease_s`` (default
    :data:`LEASE_S`: the holder's host was preempted or lost), so a preempted TPU job resumes
    without anyone deleting files. The holder's and the reader's clocks are compared, so hosts
    whose clocks differ by minutes would misjudge a lease.
    """
    path = storage.join(workdir, LOCK_FILE)
    me = _holder_record(lease=True)
    text = json.dumps(me)
    if not storage.create_exclusive(path, text):
        held = _read_lease(path)
        if held is not None:
            age, lease = _lease_age(held), float(held.get("lease_s", LEASE_S))
            dead = _dead_here(held)
            if age <= lease and not dead:
                raise RunError(
                    f"{workdir} is in use by another run: {_holder_text(held)}, lock renewed "
                    f"{age:.0f} s ago. Wait for it to end (or stop it), or use another --workdir; "
                    f"the lock ({path}) is deleted when that run ends, and taken over once it has "
                    f"not been renewed for {lease:.0f} s (its run killed or preempted)."
                )
            why = (
                "whose process on this host is gone (killed or crashed)"
                if dead
                else f"not renewed for {age:.0f} s (> {lease:.0f} s: killed or preempted)"
            )
            print(
                f"note: taking over the stale lock of {workdir} from {_holder_text(held)}, {why}.",
                file=out,
                flush=True,
            )
        storage.write_text(path, text)
    time.sleep(0.5)  # a racing taker writes within this window; the last write wins ...
    held = _read_lease(path) or {}
    if held.get("token") != me["token"]:  # ... and the others step back
        raise RunError(
            f"{workdir} was locked by another run at the same moment "
            f"({_holder_text(held)}); use another --workdir or retry."
        )
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_RENEW_S):
            try:
                held = _read_lease(path)
                if (held or {}).get("token") != me["token"]:
                    print(
                        f"warning: the lock of {workdir} was taken over by "
                        f"{_holder_text(held or {})}; this run no longer holds it.",
                        file=out,
                        flush=True,
                    )
                    return
                me["renewed"] = time.time()
                storage.write_text(path, json.dumps(me))
            except Exception as e:  # noqa: BLE001 - a transient store error: retry next period
                print(f"warning: renewing the lock of {workdir} failed ({e})", file=out, flush=True)

    thread = threading.Thread(target=renew, name="cem_jax-lease", daemon=True)
    thread.start()
    try:
        yield me
    finally:
        stop.set()
        thread.join()
        if (_read_lease(path) or {}).get("token") == me["token"]:
            storage.remove(path)


@contextlib.contextmanager
def _run_lock(workdir: str, out: TextIO) -> Iterator[None]:
    """The workdir lock of a run; on several processes, process 0 holds it for all of them.

    The other processes learn from process 0 whether it got the lock (a broadcast), so a refused
    run stops on every process instead of leaving the others waiting at their first collective.
    """
    if jax.process_count() == 1:
        with lock_workdir(workdir, stream=out):
            yield
        return
    if not parallel.is_main_process():
        if not parallel.broadcast_from_main(0):
            raise RunError(
                f"process 0 could not take the lock of --workdir={workdir} (its output says why); "
                "this process stops too."
            )
        yield
        return
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(lock_workdir(workdir, stream=out))
    except BaseException:
        parallel.broadcast_from_main(0)
        raise
    with stack:
        parallel.broadcast_from_main(1)
        yield


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode()) if raw.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "? (unreadable lock file)"}
    return info if isinstance(info, dict) else {}


def _read_results(path: str) -> dict[str, Any] | None:
    try:
        out = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise RunError(
            f"{path} is unreadable ({e}); it is not overwritten. Move it away to run again in "
            "this workdir, or use another --workdir."
        ) from e
    if not isinstance(out, dict):
        raise RunError(
            f"{path} does not hold a results object; move it away or use another --workdir."
        )
    return out


def _config_diff(changed: dict[str, tuple[Any, Any]]) -> str:
    """:func:`cem_jax.config.fingerprint_diff`'s differences in words."""
    return ", ".join(
        f"{k}: {a!r} there vs {b!r} requested" for k, (a, b) in sorted(changed.items())
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray | jax.Array):
        return np.asarray(o).tolist()
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def _fmt(v: Any, spec: str = ".4f") -> str:
    if isinstance(v, float | int | np.floating):
        return format(float(v), spec)
    return "-" if v is None else str(v)


def run(
    cfg: config_lib.RunConfig,
    *,
    workdir: str,
    num_devices: int | None = None,
    device_index: int | None = None,
    cache_dir: str | None = None,
    stream: TextIO | None = None,
) -> dict[str, Any]:
    """Trains (or resumes), attacks and reports; returns the ``results.json`` content.

    The mesh: ``num_devices`` devices (all by default), from device ``device_index`` on when given
    (one device unless ``num_devices`` says more: :func:`cem_jax.parallel.make_mesh`).

    Holds the workdir's lock throughout (:func:`lock_workdir`). Refused with :class:`RunError`: a
    workdir of another configuration or other data (checkpoint or ``results.json``), one whose
    outputs have no checkpoint to resume, a damaged checkpoint with no valid one to fall back to, a
    non-finite loss or state, an unwritable workdir. Settings the data or the model refuse are a
    :class:`cem_jax.errors.UsageError`, data that cannot be loaded a :class:`cem_jax.errors.InputError`
    or :class:`~cem_jax.errors.DownloadError` (all expected failures: :class:`cem_jax.errors.CemError`).
    """
    out = stream if stream is not None else sys.stdout
    source_commit()  # the code this process imported, read before anything runs
    mesh = _workdir_mesh(workdir, num_devices, device_index)
    with _run_lock(workdir, out):
        try:
            return _run_locked(cfg, workdir=workdir, mesh=mesh, cache_dir=cache_dir, out=out)
        except (train.NaNLossError, train.IncompatibleCheckpointError, CheckpointError) as e:
            raise RunError(str(e)) from e
        except OSError as e:
            if not _inside(e.filename, workdir):
                raise  # not a write into the workdir (e.g. a missing dataset): its own message
            raise RunError(
                f"writing into --workdir={workdir} failed: {e.strerror or e} "
                f"({e.filename or 'no file name'}); the last complete checkpoint is kept."
            ) from e


def _run_locked(
    cfg: config_lib.RunConfig,
    *,
    workdir: str,
    mesh: Mesh,
    cache_dir: str | None,
    out: TextIO,
) -> dict[str, Any]:
    results_path = storage.join(workdir, RESULTS_FILE)
    metrics_path = storage.join(workdir, METRICS_FILE)
    ckpt_dir = storage.join(workdir, "checkpoints")
    main = parallel.is_main_process()  # the one writer of metrics.jsonl and results.json
    if main:
        _remove_stale_temp_files(workdir)
    previous = _read_results(results_path)
    # Refuse a workdir of another configuration before doing anything expensive.
    has_checkpoint = False
    if storage.isdir(ckpt_dir):
        ckpt = Checkpointer(ckpt_dir, writable=False, stream=io.StringIO())  # train reports
        try:
            if ckpt.all_steps():
                has_checkpoint = True
                train.check_compatible(ckpt.read_meta(), cfg, ckpt.directory)
        finally:
            ckpt.close()
    fingerprint = cfg.training_fingerprint()
    changed = (
        config_lib.fingerprint_diff(previous.get("fingerprint") or {}, fingerprint)
        if previous is not None
        else {}
    )
    if changed:
        raise RunError(
            f"{results_path} holds the results of another configuration "
            f"({_config_diff(changed)})"
            + ("" if has_checkpoint else " and the workdir has no checkpoint (deleted?)")
            + ". Refusing to overwrite them or to mix two runs in one metrics.jsonl: use another "
            "--workdir, or repeat the original flags."
        )
    if not has_checkpoint and previous is None and _count_lines(metrics_path):
        raise RunError(
            f"{metrics_path} holds {_count_lines(metrics_path)} epoch line(s) of an earlier run but "
            f"{ckpt_dir} holds no checkpoint to resume it (deleted?). Refusing to mix two runs in "
            "one metrics.jsonl: use another --workdir, or move the old files away."
        )

    # every process has read the workdir before any of them writes into it (checkpoints/)
    parallel.barrier("cem_jax:run_checked")
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    ds = load_data(cfg, cache_dir)
    identity = data_lib.dataset_identity(ds)
    load_s = time.perf_counter() - t0
    _check_attacks(cfg, ds, mesh.shape[parallel.DATA_AXIS])  # before any training
    if previous is not None:
        train.check_same_dataset(previous.get("dataset"), identity, results_path)
        if previous.get("attack_config") == attack_config(cfg):
            if main:  # left behind only by a kill between results.json and their removal
                _clear_attack_checkpoints(workdir)
            print(f"{workdir} already holds a finished run; its summary:", file=out)
            print(summary(previous), file=out)
            return previous
    defense = cfg.defense_spec()
    scaled = " x lr0/lr" if cfg.lambda_schedule == "inverse_lr" else ""
    lambd = f"{defense.lambd}{scaled}" if defense.cem else "0"
    print(
        f"cem_jax | {cfg.dataset} ({ds.num_train} train / {ds.num_test} test, {ds.image_size}px, "
        f"loaded in {load_s:.1f}s from {ds.source}) | {cfg.arch} cut {cfg.resolved_cut_layer} | "
        f"defense {cfg.defense} (sigma={defense.sigma}, lambda={lambd}, mode={cfg.cem_mode}) | "
        f"{cfg.epochs} epochs, batch {cfg.batch_size} | "
        f"{mesh.shape[parallel.DATA_AXIS]} x {jax.devices()[0].platform} | workdir {workdir}",
        file=out,
        flush=True,
    )
    bars: dict[str, ProgressBar] = {}
    run_start = time.perf_counter()
    epochs_done_here = [0]
    history: list[dict[str, Any]] = []

    def on_resume(restored: list[dict[str, float]]) -> None:
        # the checkpoint is the truth: a kill between its save and the metrics line loses nothing
        history[:] = restored
        if main:
            write_metrics(metrics_path, history)

    def on_epoch_start(epoch: int, trainer: train.Trainer) -> None:
        bars["bar"] = ProgressBar(
            trainer.steps_per_epoch, f"epoch {epoch}/{cfg.epochs}", stream=out
        )

    def on_step(epoch: int, i: int, m: dict[str, float]) -> None:
        bar = bars["bar"]
        fault_point("step", (epoch - 1) * bar.total + i)
        extra = f"loss {m['loss']:.3f}"
        if "cem" in m:
            extra += f" L_C {m['cem']:.4f}"
        rate = bar.rate()
        if rate > 0:
            steps_left = (bar.total - bar.count - 1) + (cfg.epochs - epoch) * bar.total
            extra += f" | run ETA {format_duration(steps_left / rate)}"
        bar.update(1, extra)

    def on_epoch_end(m: dict[str, float]) -> None:
        bars["bar"].close()
        epochs_done_here[0] += 1
        elapsed = time.perf_counter() - run_start
        left = cfg.epochs - m["epoch"]
        eta = elapsed / epochs_done_here[0] * left
        line = (
            f"epoch {m['epoch']}/{cfg.epochs}: loss {m['loss']:.4f} ce {m['ce']:.4f}"
            + (f" L_C {m['cem']:.4f}" if "cem" in m else "")
            + f" | test acc clean {m['clean_acc']:.4f} defended {m['defended_acc']:.4f}"
            + (f" | leakage estimate {m['leakage_bits']:.1f} bits" if "leakage_bits" in m else "")
            + f" | {m['steps_per_s']:.2f} steps/s ({m['steps_per_s'] * cfg.batch_size:.0f} img/s)"
            + f" | run ETA {format_duration(eta)}"
        )
        print(line, file=out, flush=True)
        history.append(m)
        if main:  # one line per epoch, whatever happened before
            write_metrics(metrics_path, history)

    try:
        result = train.train(
            cfg,
            ds,
            workdir=workdir,
            mesh=mesh,
            on_epoch_start=on_epoch_start,
            on_step=on_step,
            on_epoch_end=on_epoch_end,
            on_resume=on_resume,
            dataset_identity=identity,
        )
    except ValueError as e:  # settings the data or the model refuse (a batch larger than the
        # training set, a cut layer the architecture lacks); a ValueError from a library is a bug
        known = (errors.CemError, train.IncompatibleCheckpointError)  # wrapped by run()
        if isinstance(e, known) or not errors.raised_by(e, train, "cem_jax.models"):
            raise
        raise errors.UsageError(str(e)) from e
    if result.resumed_from_epoch:
        print(f"(resumed after epoch {result.resumed_from_epoch})", file=out)
    results = finish(cfg, result.trainer, result.state, result.history, workdir=workdir, stream=out)
    results["dataset"] = {**(results.get("dataset") or {}), **identity}
    results["train_wall_time_s"] = result.wall_time_s
    # a resumed run counts the training done before the resume too (the attacks' own partial
    # time before a resume is not counted: an attack restarts from its last checkpoint)
    results["wall_time_s"] = time.perf_counter() - t_start + result.prior_wall_time_s
    if main:
        write_json_atomic(results_path, results)
        _clear_attack_checkpoints(workdir)  # needed only to resume the attacks
    parallel.barrier("cem_jax:results_written")  # no process ends before results.json is there
    print(summary(results), file=out, flush=True)
    return results


def _clear_attack_checkpoints(workdir: str) -> None:
    from cem_jax import report

    report.clear_attack_checkpoints(workdir)


def _count_lines(path: str) -> int:
    try:
        return sum(1 for line in storage.read_text(path).splitlines() if line.strip())
    except FileNotFoundError:
        return 0


def _inside(filename: Any, workdir: str) -> bool:
    if not filename:
        return False
    if storage.is_remote(workdir):  # gcsfs names objects without their scheme
        path, root = os.fsdecode(filename).split("://")[-1], workdir.split("://")[-1].rstrip("/")
        return path == root or path.startswith(root + "/")
    path, root = os.path.abspath(os.fsdecode(filename)), os.path.abspath(workdir)
    return path == root or path.startswith(root + os.sep)


#: Confidence level of the per-variance upper limits in the leakage certificate.
CERTIFICATE_CONFIDENCE = 0.95


def leakage_report(
    features: Callable[[np.ndarray], jax.Array],
    mixture: Any,
    dataset: data_lib.Dataset,
    *,
    sigma: float,
    mesh: Mesh,
) -> dict[str, Any]:
    """The leakage bound of a client on the training and on the held-out test features.

    ``features`` maps images to the client's clean ``[N', D]`` features (e.g.
    :meth:`cem_jax.train.Trainer.features_fn`; rows past ``N`` are padding, labelled ``-1`` here by
    :func:`cem_jax.train.feature_labels`); ``mixture`` is the training set's clusters. Per split:
    ``certificate`` (the diagonal bound with 95 % upper-confidence variances,
    :func:`cem_jax.entropy.leakage_certificate`), ``diagonal`` (maximum-likelihood variances) and
    ``full_estimate`` (full covariance where a cluster has more than 10 samples per dimension, an
    estimate, not a guarantee). ``certificate_bits`` is the larger certificate of the two splits.
    ``None`` without noise.
    """
    from cem_jax import entropy

    if sigma <= 0:
        return {
            "certificate_bits": None,
            "note": "no Gaussian noise: the transmitted features can carry unbounded information",
        }
    out: dict[str, Any] = {"sigma": sigma, "confidence": CERTIFICATE_CONFIDENCE}
    for split, images, labels in (
        ("train", dataset.train_images, dataset.train_labels),
        ("test", dataset.test_images, dataset.test_labels),
    ):
        feats = features(images)
        y = train.feature_labels(labels, mesh)
        with jax.set_mesh(mesh):
            kw = dict(sigma=sigma)
            out[split] = {
                "num_images": len(labels),
                "certificate": float(
                    entropy.leakage_certificate(
                        feats, y, mixture, confidence=CERTIFICATE_CONFIDENCE, **kw
                    )
                ),
                "diagonal": float(entropy.leakage_upper_bound(feats, y, mixture, **kw)),
                "full_estimate": float(
                    entropy.leakage_upper_bound(feats, y, mixture, covariance="full", **kw)
                ),
            }
    out["certificate_bits"] = max(out["train"]["certificate"], out["test"]["certificate"])
    return out


def finish(
    cfg: config_lib.RunConfig,
    trainer: train.Trainer,
    state: train.TrainState,
    history: list[dict[str, float]],
    *,
    workdir: str | None,
    stream: TextIO,
) -> dict[str, Any]:
    """The final leakage certificate and the attacks, as the ``results.json`` dictionary."""
    ds = trainer.dataset
    t0 = time.perf_counter()
    final = dict(history[-1]) if history else {}
    leakage = leakage_report(
        trainer.features_fn(state),
        state.mixture,
        trainer.dataset,
        sigma=trainer.defense.sigma,
        mesh=trainer.mesh,
    )
    results: dict[str, Any] = {
        "status": "finished",
        "format_version": train.FORMAT_VERSION,
        "config": cfg.to_dict(),
        "fingerprint": cfg.training_fingerprint(),
        "attack_config": attack_config(cfg),
        "commit": source_commit(),
        "dataset": {
            "name": ds.name,
            "source": ds.source,
            "num_train": ds.num_train,
            "num_test": ds.num_test,
            "class_names": list(ds.class_names),
            "mean": [float(v) for v in ds.mean],  # the normalisation the client was trained with
            "std": [float(v) for v in ds.std],
        },
        "devices": f"{trainer.mesh.shape[parallel.DATA_AXIS]} x {jax.devices()[0].platform}",
        "history": history,
        "final": {
            "clean_acc": final.get("clean_acc"),
            "defended_acc": final.get("defended_acc"),
            # the certificate: max over the training and held-out features (see leakage_report)
            "leakage_bits": leakage.get("certificate_bits"),
            "leakage": leakage,
            "leakage_time_s": time.perf_counter() - t0,
        },
        "attacks": {},
    }
    if cfg.attacks:
        from cem_jax import attacks as attacks_lib
        from cem_jax import report

        results["attacks"] = report.run_attacks(
            cfg,
            trainer.dataset,
            trainer.client_fn(state, noise_only=cfg.threat_model == "noise_only"),
            trainer.client_fn(state, clean=True),
            feature_shape=trainer.feature_shape,
            mesh=trainer.mesh,
            workdir=workdir,
            stream=stream,
            # a checkpointed attack resumes only against these very weights
            client_identity=attacks_lib.tree_digest((state.params, state.batch_stats)),
        )
    return results


def attack_workdir(
    workdir: str,
    *,
    overrides: dict[str, Any] | None = None,
    cache_dir: str | None = None,
    stream: TextIO | None = None,
    num_devices: int | None = None,
    device_index: int | None = None,
) -> dict[str, Any]:
    """Re-runs the attacks of a finished run (``experiments.attack``); updates ``results.json``.

    ``num_devices`` / ``device_index`` choose the mesh as in :func:`run`.

    The file is replaced atomically once every attack is done, so an interrupted attack never
    leaves partial numbers behind; re-running it resumes the trained attacks from their
    checkpoints (:func:`cem_jax.report.run_attacks`). The data must be the data the run was trained
    on. On a workdir that cannot be written, the attacks still run and their summary is printed,
    then :class:`RunError` says that (and where) nothing was saved.
    """
    out = stream if stream is not None else sys.stdout
    mesh = _workdir_mesh(workdir, num_devices, device_index)
    if not storage.isdir(workdir):  # refused before the lock would create it
        raise RunError(
            f"{workdir}: no such folder; expected the --workdir of a run of experiments.run."
        )
    problem = _writable_problem(workdir)
    if problem is not None:
        print(
            f"note: {problem}; the attacks will run and print their results, but cannot save them.",
            file=out,
            flush=True,
        )
        return _attack_locked(workdir, overrides, cache_dir, out, problem, mesh)
    with _run_lock(workdir, out):
        return _attack_locked(workdir, overrides, cache_dir, out, None, mesh)


def _attack_locked(
    workdir: str,
    overrides: dict[str, Any] | None,
    cache_dir: str | None,
    out: TextIO,
    unwritable: str | None,
    mesh: Mesh,
) -> dict[str, Any]:
    import dataclasses

    from cem_jax import client

    t_start = time.perf_counter()
    try:
        cfg, meta, ckpt = client.read_run(workdir, stream=out)
    except client.RunNotFoundError as e:
        raise RunError(str(e)) from e
    try:
        cfg = dataclasses.replace(cfg, **(overrides or {}))
        cfg.validate()
    except ValueError as e:  # an override the run's config does not accept
        raise errors.UsageError(str(e)) from e
    ds = load_data(cfg, cache_dir)
    identity = data_lib.dataset_identity(ds)
    _check_attacks(cfg, ds, mesh.shape[parallel.DATA_AXIS])
    try:
        train.check_same_dataset(meta.get("dataset"), identity, f"the run in {workdir}")
        trainer = train.Trainer(cfg, ds, mesh=mesh)  # host loops; the compiled steps are shared
        _, state = client.restore_state(cfg, meta, ckpt, workdir, mesh=trainer.mesh)
    except (train.IncompatibleCheckpointError, client.RunNotFoundError) as e:
        raise RunError(str(e)) from e
    finally:
        ckpt.close()
    print(f"attacking the client of {workdir} ({cfg.defense}, {meta['epoch']} epochs)", file=out)
    results_path = storage.join(workdir, RESULTS_FILE)
    results = finish(
        cfg,
        trainer,
        state,
        list(meta["history"]),
        workdir=None if unwritable else workdir,  # no figure into a read-only workdir
        stream=out,
    )
    results["dataset"] = {**(results.get("dataset") or {}), **identity}
    previous = None
    with contextlib.suppress(RunError):
        previous = _read_results(results_path)
    if previous is not None:
        results["train_wall_time_s"] = previous.get("train_wall_time_s")
    results["wall_time_s"] = time.perf_counter() - t_start
    print(summary(results), file=out, flush=True)
    if unwritable is not None:
        raise RunError(
            f"the results above were NOT saved: {unwritable}, so {results_path} (and the "
            "reconstructions figure) could not be written and are unchanged."
        )
    try:
        if parallel.is_main_process():
            write_json_atomic(results_path, results)
            _clear_attack_checkpoints(workdir)  # needed only to resume the attacks
    except OSError as e:
        raise RunError(
            f"the results above were NOT saved: writing {results_path} failed ({e.strerror or e}); "
            "the previous file is unchanged."
        ) from e
    parallel.barrier("cem_jax:attack_results_written")
    print(f"results written to {results_path}", file=out, flush=True)
    return results


def _check_attacks(cfg: config_lib.RunConfig, ds: data_lib.Dataset, num_devices: int) -> None:
    """Refuses (``RunError``) attack settings that cannot run on ``ds`` split over ``num_devices``
    (the mesh's), before anything trains."""
    from cem_jax import report

    try:
        report.check_attacks(cfg, ds, num_devices)
    except ValueError as e:
        raise RunError(str(e)) from e


@functools.cache
def source_commit() -> str | None:
    """The git commit of the cem_jax source that runs in this process (``+dirty`` with local
    changes then), if known: read once, at the first call, which :func:`run` makes when it starts.

    A process runs the code it imported: a sweep that runs for days keeps its first commit even
    when the checkout moves on under it, and its records say so (reading ``HEAD`` when a run
    finished named commits whose code never ran).
    """
    return _read_source_commit()


def _read_source_commit() -> str | None:
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
            cwd=os.path.dirname(here),
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def attack_config(cfg: config_lib.RunConfig) -> dict[str, Any]:
    """The config fields the attacks depend on (``results.json``'s ``attack_config``)."""
    d = cfg.to_dict()
    keys = [k for k in d if k.startswith(config_lib.ATTACK_PREFIXES) or k == "threat_model"]
    return json.loads(json.dumps({k: d[k] for k in keys}))


def summary(results: dict[str, Any]) -> str:
    """The one-screen summary printed at the end of a run."""
    cfg = results["config"]
    fin = results["final"]
    lines = [
        "",
        "=" * 92,
        f"{results.get('dataset', {}).get('name', cfg['dataset'])} | {cfg['arch']} | defense "
        f"{cfg['defense']} | {len(results['history'])} epochs"
        f" | wall {format_duration(results.get('wall_time_s', 0))}",
        "-" * 92,
        f"test accuracy   clean {_fmt(fin['clean_acc'])}   defended (what the server gets) "
        f"{_fmt(fin['defended_acc'])}",
    ]
    leak = fin.get("leakage") or {}
    if leak.get("certificate_bits") is None:
        lines.append("leakage bound   none (no Gaussian noise)")
    else:
        tr, te = leak["train"], leak["test"]
        lines.append(
            f"leakage bound   {leak['certificate_bits']:.1f} bits/image (certificate: diagonal, "
            f"{leak['confidence']:.0%} upper-confidence variances; train {tr['certificate']:.1f}, "
            f"held-out test {te['certificate']:.1f})"
        )
        lines.append(
            f"                estimates: diagonal {tr['diagonal']:.1f} / {te['diagonal']:.1f}, "
            f"full covariance {tr['full_estimate']:.1f} / {te['full_estimate']:.1f} (train / test)"
        )
    attacks = results.get("attacks") or {}
    if attacks:
        lines.append("-" * 92)
        lines.append(
            f"{'attack':<10}{'setting':<16}{'MSE':>8}{'PSNR dB':>9}{'SSIM':>8}"
            f"{'baseline':>10}{'gain dB':>9}{'steps':>7}  {'status':<14}{'time':>8}"
        )
        flagged = False
        for name, settings in attacks.items():
            if not isinstance(settings, dict):
                continue
            for setting, m in settings.items():
                if not isinstance(m, dict) or "mse" not in m:
                    continue
                status = "converged" if m.get("converged") else "NOT converged"
                if m.get("informative") is False:
                    status = "UNINFORMATIVE"
                flagged |= status != "converged"
                base = m.get("baseline", {})
                lines.append(
                    f"{name:<10}{setting:<16}{_fmt(m['mse']):>8}{_fmt(m['psnr'], '.2f'):>9}"
                    f"{_fmt(m['ssim'], '.3f'):>8}{_fmt(base.get('mse')):>10}"
                    f"{_fmt(m.get('gain_db'), '+.2f'):>9}{m.get('steps', '-')!s:>7}  "
                    f"{status:<14}{format_duration(m.get('wall_time_s', 0)):>8}"
                )
        lines.append(
            "baseline: the mean training image's MSE on the same images; gain: PSNR over it."
        )
        if flagged:
            lines.append(
                "An attack that did not converge, or does not beat the baseline (MSE > 0.9 x "
                "baseline), is no evidence of privacy."
            )
    lines.append("=" * 92)
    return "\n".join(lines)
