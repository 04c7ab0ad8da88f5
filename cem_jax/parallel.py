"""The device mesh and shardings (DESIGN §5).

One mesh over all devices with a single ``data`` axis: batches are sharded along it, parameters and
optimizer state are replicated. One CPU is simply a mesh of size 1, so the same jitted step runs on a
laptop, 8 GPUs or a TPU slice. Several hosts join with ``jax.distributed.initialize()`` before
:func:`make_mesh` is called.

The axis is ``AxisType.Auto`` (GSPMD propagation): the CEM loss builds ``[B, B]`` same-group matrices
from a batch-sharded vector, which explicit sharding-in-types would reject.

>>> mesh = make_mesh()
>>> mesh.axis_names
('data',)
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh named ``data`` over the first ``num_devices`` devices (all by default)."""
    available = jax.device_count()
    n = available if num_devices is None else num_devices
    if not 1 <= n <= available:
        raise ValueError(
            f"num_devices={num_devices}: accepted 1..{available} (jax.device_count())."
        )
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


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
    """Places every array of ``tree`` on the mesh, split along its leading (batch) axis."""
    return jax.device_put(tree, batch_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every array of ``tree`` on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))
