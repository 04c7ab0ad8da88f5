"""The device mesh and shardings (DESIGN §5).

One mesh over all devices with a single ``data`` axis: batches are sharded along it, parameters and
optimizer state are replicated. One CPU is simply a mesh of size 1, so the same jitted step runs on a
laptop, 8 GPUs or a TPU slice. Several hosts join with :func:`initialize_distributed` (which calls
``jax.distributed.initialize()``) before anything else touches JAX; the mesh then spans every
process's devices.

On several processes, host data enters the mesh without cross-host traffic: every process holds the
whole (small) host array and :func:`shard_batch` hands each one only its own rows
(``jax.make_array_from_process_local_data``); :func:`replicate` builds replicated arrays from each
process's identical copy. A batch-sharded array cannot be fetched with ``np.asarray`` (its rows live
on other hosts): reduce it on device to a replicated value, or use :func:`to_host`. Files are written
by process 0 alone (:func:`is_main_process`), with :func:`barrier` where the others must wait.

The axis is ``AxisType.Auto`` (GSPMD propagation): the CEM loss builds ``[B, B]`` same-group matrices
from a batch-sharded vector, which explicit sharding-in-types would reject.

>>> mesh = make_mesh()
>>> mesh.axis_names
('data',)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, *, device_index: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over ``num_devices`` devices (all by default).

    ``device_index`` pins the mesh to devices ``device_index ..`` (one device unless
    ``num_devices`` says more): one run per device of a multi-GPU machine. Not on several processes
    (there the mesh spans every process's devices).
    """
    available = jax.device_count()
    first = 0
    if device_index is not None:
        if jax.process_count() > 1:
            raise ValueError(
                f"device_index={device_index}: a run on several processes uses every process's "
                "devices; pin single-process runs only."
            )
        if not 0 <= device_index < available:
            raise ValueError(
                f"device_index={device_index}: accepted 0..{available - 1} "
                f"({available} devices: {jax.devices()[0].platform})."
            )
        first = device_index
        if num_devices is None:
            num_devices = 1
    n = available - first if num_devices is None else num_devices
    if not 1 <= n <= available - first:
        where = f" from device {first}" if first else ""
        raise ValueError(
            f"num_devices={num_devices}: accepted 1..{available - first}{where} "
            f"(jax.device_count() = {available})."
        )
    devices = jax.devices()[first : first + n]
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of an array whose leading axis is the batch."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of a replicated array (parameters, optimizer and mixture state, keys, scalars)."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """Raises if ``batch_size`` does not split evenly over the mesh's data axis."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        raise ValueError(
            f"batch_size={batch_size} must be a multiple of the number of devices ({n}) so each "
            "device gets the same share of the batch."
        )


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on the mesh, split along its leading (batch) axis.

    Every leaf is the whole global batch as this process holds it (the same on every process). On
    one process this is ``jax.device_put``; on several, each process passes only the rows its own
    devices hold to ``jax.make_array_from_process_local_data``: no value crosses hosts.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: _global_from_host(x, sharding), tree)


def process_rows(global_size: int, mesh: Mesh) -> tuple[int, int] | None:
    """The contiguous rows ``[lo, hi)`` of a ``global_size`` batch that this process's devices hold.

    ``None`` when they are not contiguous (an unusual device order): then every row is needed.
    """
    return _process_span(batch_sharding(mesh), global_size)


def _process_span(sharding: NamedSharding, global_size: int) -> tuple[int, int] | None:
    rows = [
        index[0] if index else slice(None)
        for index in sharding.addressable_devices_indices_map((global_size,)).values()
    ]
    bounds = sorted({r.indices(global_size)[:2] for r in rows})
    if not all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False)):
        return None
    return bounds[0][0], bounds[-1][1]


def process_batch(get_rows: Any, global_size: int, mesh: Mesh) -> Any:
    """A global batch-sharded batch of ``global_size`` rows, read only where it is needed.

    ``get_rows(lo, hi)`` returns the tree of host arrays of rows ``lo..hi-1``; each process asks only
    for the rows its own devices hold and builds the global arrays from them
    (``jax.make_array_from_process_local_data``). On one process this is ``device_put`` of every row.
    """
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(get_rows(0, global_size), sharding)
    span = process_rows(global_size, mesh)
    if span is None:  # scattered rows: read them all, hand each device its own
        return shard_batch(get_rows(0, global_size), mesh)
    lo, hi = span
    local = get_rows(lo, hi)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x), (global_size, *np.shape(x)[1:])
        ),
        local,
    )


def padded_rows(global_size: int, mesh: Mesh) -> int:
    """``global_size`` rounded up to a multiple of the mesh's devices (arrays split along ``data``
    must divide evenly)."""
    devices = mesh.shape[DATA_AXIS]
    return -(-global_size // devices) * devices


def shard_rows(x: Any, mesh: Mesh, *, fill: Any) -> jax.Array:
    """The host array ``x`` ``[N, ...]`` split along ``data``, padded with ``fill`` to
    :func:`padded_rows` rows; each process places only its own rows (:func:`process_batch`).

    >>> mesh = make_mesh(1)
    >>> shard_rows(np.array([3, 1]), mesh, fill=-1).tolist()
    [3, 1]
    """
    x = np.asarray(x)

    def get_rows(lo: int, hi: int) -> np.ndarray:
        out = np.full((hi - lo, *x.shape[1:]), fill, x.dtype)
        real = x[lo:hi]
        out[: len(real)] = real
        return out

    return process_batch(get_rows, padded_rows(len(x), mesh), mesh)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on every device of the mesh.

    On several processes a host (numpy) leaf is built from each process's own, identical copy
    (no cross-host comparison or transfer); a ``jax.Array`` leaf is resharded by ``device_put``.
    """
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            # a PRNG key array: place its raw data, then wrap it again (keys have no host form)
            data = put(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _global_from_host(x: Any, sharding: NamedSharding) -> jax.Array:
    """The global batch-sharded array of the host array ``x`` (held whole by every process)."""
    x = np.asarray(x)
    span = _process_span(sharding, len(x))
    if span is None:  # this process's devices hold scattered rows: hand them over one by one
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
    lo, hi = span
    return jax.make_array_from_process_local_data(sharding, x[lo:hi], x.shape)


def to_host(x: jax.Array) -> np.ndarray:
    """``x`` as a numpy array on every process, also when its rows live on other hosts.

    A fully addressable or fully replicated array is read locally; otherwise the rows are gathered
    from every process (``multihost_utils.process_allgather``, a collective: every process must
    call it, in the same order).
    """
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ------------------------------------------------------------------------------- several processes
#: Environment variables that ask for a multi-process run without a cluster scheduler.
COORDINATOR_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def detected_cluster() -> str | None:
    """The name of the cluster environment JAX's auto-detection finds with more than one process.

    ``None`` when there is none (or when it reports a single process, e.g. a one-task SLURM job).
    Opt-in methods (mpi4py) are not probed.
    """
    try:
        from jax._src.clusters import ClusterEnv  # JAX's own detection (no public API)
    except ImportError:  # pragma: no cover - a JAX without cluster detection
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if not env.is_env_present():
                continue
            count = env.get_process_count()
        except Exception:  # noqa: BLE001 - a detector that fails is no cluster
            continue
        if count is None or int(count) > 1:
            return env.__name__
    return None


def initialize_distributed(
    mode: bool | str | None = "auto",
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Joins JAX's distributed runtime (``jax.distributed.initialize``) when asked or detected.

    Call it first, before anything touches a JAX device. ``mode``: ``"auto"`` / ``None`` (the
    default) initialises when a coordinator is given (``coordinator_address`` or
    ``$JAX_COORDINATOR_ADDRESS``) or when JAX's cluster detection finds a multi-process job (SLURM,
    Open MPI, Cloud TPU pod slice, Kubernetes: :func:`detected_cluster`); ``True`` always (JAX then
    auto-detects what is not given, and fails if it cannot); ``False`` never. ``num_processes``
    and ``process_id`` default to ``$JAX_NUM_PROCESSES`` / ``$JAX_PROCESS_ID``.

    Returns whether this process is part of a distributed runtime (also when it was initialised
    before). On CPU, each process gets ``--xla_force_host_platform_device_count`` devices.
    """
    if isinstance(mode, str):
        wanted = {"auto": None, "true": True, "1": True, "false": False, "0": False}
        if mode.lower() not in wanted:
            raise ValueError(f"distributed={mode!r}: accepted auto, true or false.")
        mode = wanted[mode.lower()]
    if _distributed_client() is not None:
        return True
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if mode is False:
        return False
    if mode is None and address is None and detected_cluster() is None:
        return False
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id
    )
    return True


def _distributed_client() -> Any:
    try:
        from jax._src import distributed

        return distributed.global_state.client
    except (ImportError, AttributeError):  # pragma: no cover
        return None


def is_main_process() -> bool:
    """Process 0: the one that writes files (metrics, results, figures, tables)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value: int) -> int:
    """Process 0's ``value`` (an int) on every process (``value`` itself on one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))
