"""Device mesh from the config, parameter shardings, and global batches on the mesh.

The mesh has named axes `data`, `fsdp` and `tensor`. A batch is split along its leading
dimension over (`data`, `fsdp`); parameters are replicated for now (FSDP and tensor rules
arrive with the scale-out work) and optimizer state follows the parameters.
"""

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from research.config import ConfigError
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

PyTree = Any
BATCH_AXES = ("data", "fsdp")


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh whose axes are named and sized by `axis_sizes`; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axis_sizes.keys())
    sizes = [int(size) for size in axis_sizes.values()]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(axis_sizes)}: at most one axis may be -1")
    known = int(np.prod([size for size in sizes if size != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"mesh {dict(axis_sizes)}: {len(devices)} devices do not divide by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ConfigError(f"mesh {dict(axis_sizes)} needs {int(np.prod(sizes))} devices but {len(devices)} are in use")
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every batch axis present in the mesh."""
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    return NamedSharding(mesh, P(axes))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this number."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.axis_names]))


def state_shardings(abstract_state: PyTree, mesh: Mesh) -> PyTree:
    """Shardings for every leaf of the (abstract) train state: replicated for now."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's slice of the global batch on the mesh as one global array per key."""
    sharding = batch_sharding(mesh)
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}
