"""Device mesh from the config, parameter shardings by rules, and global batches on the mesh.

The mesh has named axes `data`, `fsdp`, `tensor` and, for mixtures of experts, `expert`; `context` splits each
sequence's positions (context parallelism) and `stage` a scanned stack's layers (pipeline parallelism:
research/models/pipeline.py). A batch is split along its leading dimension over (`data`, `fsdp`, `expert`).
Parameters are placed by `config.param_rules`: pairs of (regex over the parameter's path, one mesh axis or None
per dimension), first match wins, the last rule a catch-all. FSDP splits a weight's input dimension over `fsdp`;
tensor parallelism splits attention heads and the MLP's hidden units over `tensor` (Megatron-LM, Shoeybi et al.
2019: column-parallel in, row-parallel out). A dimension that the axis does not divide stays
whole. Optimizer-state leaves that mirror a parameter take its sharding.
"""

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from research.errors import ConfigError
from research.tree import path_name

PyTree = Any
BATCH_AXES = ("data", "fsdp", "expert")  # experts' devices hold tokens of their own too
CONTEXT_AXIS = "context"  # each sequence's positions split over it (context parallelism)
STAGE_AXIS = "stage"  # a scanned stack's layers split over it (pipeline parallelism: research/models/pipeline.py)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh whose axes are named and sized by `axis_sizes`; one size may be -1 (all remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(axis_sizes.keys())
    sizes = resolve_sizes(axis_sizes, len(devices))
    return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def resolve_sizes(axis_sizes: Mapping[str, int], devices: int) -> list[int]:
    """The mesh's axis sizes for `devices` devices, the -1 axis (if any) taking the devices left."""
    sizes = [int(size) for size in axis_sizes.values()]
    if sizes.count(-1) > 1:
        raise ConfigError(f"mesh {dict(axis_sizes)}: at most one axis may be -1")
    known = int(np.prod([size for size in sizes if size != -1]))
    if -1 in sizes:
        if devices % known:
            raise ConfigError(f"mesh {dict(axis_sizes)}: {devices} devices do not divide by {known}")
        sizes[sizes.index(-1)] = devices // known
    if int(np.prod(sizes)) != devices:
        raise ConfigError(f"mesh {dict(axis_sizes)} needs {int(np.prod(sizes))} devices but {devices} are in use")
    return sizes


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def context_shards(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many pieces each sequence is split into: the mesh's `context` axis (1 without one, or an empty mesh)."""
    return mesh.shape[CONTEXT_AXIS] if CONTEXT_AXIS in mesh.axis_names else 1


def stage_shards(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many pipeline stages a scanned stack of layers is split into: the mesh's `stage` axis (1 without one)."""
    return mesh.shape[STAGE_AXIS] if STAGE_AXIS in mesh.axis_names else 1


def activation_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[tuple[str, ...], str | None, int, int]:
    """(batch axes, head axis, batch shards, head shards) of `mesh` that are larger than one: how the kernels split
    an activation's batch and its heads (research/models/kernels.py, ring.py)."""
    if not mesh.axis_names:
        return (), None, 1, 1
    batch_axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names and mesh.shape[axis] > 1)
    head_axis = "tensor" if "tensor" in mesh.axis_names and mesh.shape["tensor"] > 1 else None
    batch_shards = int(np.prod([mesh.shape[axis] for axis in batch_axes])) if batch_axes else 1
    return batch_axes, head_axis, batch_shards, mesh.shape[head_axis] if head_axis else 1


def batch_sharding(mesh: Mesh, shape: tuple[int, ...] = ()) -> NamedSharding:
    """Leading (batch) dimension split over every batch axis present in the mesh; the second (a sequence's
    positions) over `context` too when the mesh has one and `shape` (the global array's) is at least 2-D."""
    axes = tuple(axis for axis in BATCH_AXES if axis in mesh.axis_names)
    if context_shards(mesh) > 1 and len(shape) >= 2:
        return NamedSharding(mesh, P(axes, CONTEXT_AXIS))
    return NamedSharding(mesh, P(axes))


def batch_divisor(mesh: Mesh) -> int:
    """The global batch size must be a multiple of this number."""
    return int(np.prod([mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.axis_names]))


def match_rule(name: str, rules: Sequence[tuple[str, tuple]]) -> tuple[int, tuple]:
    """(index, axes) of the first rule whose regex matches `name`."""
    for index, (pattern, axes) in enumerate(rules):
        if re.search(pattern, name):
            return index, tuple(axes)
    raise ConfigError(f"no sharding rule matches parameter {name!r}: end param_rules with a catch-all ('.*', ())")


def spec_for(shape: tuple[int, ...], axes: tuple, mesh: Mesh) -> P:
    """A PartitionSpec giving dimension i the mesh axis axes[i], where that axis divides it. Under context
    parallelism `fsdp` stands for `fsdp` x `context`: a sequence's devices share its weights as FSDP's do (as
    torchtitan shards over its data-shard x context mesh), so that splitting sequences does not copy the state.
    A `stage` axis that does not divide its dimension (126 layers over 8 stages) joins `fsdp` the same way: the
    pipeline gathers each stage's layers in the step (research/models/pipeline.py)."""
    folded = [name for name in (STAGE_AXIS,) if name in axes and not _divides(shape[axes.index(name)], name, mesh)]
    folded += [CONTEXT_AXIS] if context_shards(mesh) > 1 else []
    spec = []
    for dimension, axis in zip(shape, axes):
        if axis == "fsdp" and folded:
            axis = tuple(name for name in ("fsdp", *folded) if name in mesh.axis_names)
            axis = axis[0] if len(axis) == 1 else (axis or None)
        names = axis if isinstance(axis, tuple) else (axis,)
        usable = axis is not None and all(name in mesh.axis_names for name in names)
        usable = usable and dimension % int(np.prod([mesh.shape[name] for name in names])) == 0
        spec.append(axis if usable else None)
    return P(*spec)


def _divides(dimension: int, axis: str, mesh: Mesh) -> bool:
    return axis in mesh.axis_names and dimension % mesh.shape[axis] == 0


def param_shardings(abstract_params: PyTree, mesh: Mesh, rules: Sequence[tuple[str, tuple]]) -> PyTree:
    """A NamedSharding per parameter from the first matching rule."""

    def place(path, leaf):
        _, axes = match_rule(path_name(path), rules)
        return NamedSharding(mesh, spec_for(leaf.shape, axes, mesh))

    return jax.tree_util.tree_map_with_path(place, abstract_params)


SPREAD_BYTES = 1 << 20  # an optimizer-state leaf of another shape than any parameter's, from this size, is split


def spread(leaf: Any, mesh: Mesh) -> NamedSharding:
    """Where an optimizer-state leaf that mirrors no parameter goes (SOAP's eigenbases, Shampoo-like factors: one
    matrix per layer or side): split along its first dimension that `fsdp` divides, when it is large; small leaves
    (counters, Adafactor's factored moments) and meshes without `fsdp` replicate it."""
    size = dict(mesh.shape).get("fsdp", 1)
    itemsize = getattr(leaf.dtype, "itemsize", 0)  # a typed PRNG key has none: replicated
    if size > 1 and int(np.prod(leaf.shape)) * itemsize >= SPREAD_BYTES:
        for index, dimension in enumerate(leaf.shape):
            if dimension % size == 0:
                return NamedSharding(mesh, P(*([None] * index), "fsdp"))
    return replicated(mesh)


def state_shardings(abstract_state: PyTree, mesh: Mesh, rules: Sequence[tuple[str, tuple]] = ((".*", ()),)) -> PyTree:
    """Shardings for every leaf of the (abstract) train state.

    Parameters, and the model state's variables (BatchNorm statistics, a distillation teacher's weights),
    follow `rules`; an optimizer-state leaf whose path ends with a parameter's path and has its shape
    (Adam's mu and nu, momentum, ...) takes that parameter's sharding, another large one is split over
    `fsdp` (`spread`); everything else (step, rng, counters) is replicated.
    """
    params = param_shardings(abstract_state.params, mesh, rules)
    by_name = {
        path_name(path): (leaf.shape, where)
        for (path, leaf), where in zip(
            jax.tree_util.tree_leaves_with_path(abstract_state.params), jax.tree.leaves(params)
        )
    }

    longest_first = sorted(by_name.items(), key=lambda item: -len(item[0]))

    def mirror(path, leaf):
        name = path_name(path)
        for param_name, (shape, where) in longest_first:
            if (name == param_name or name.endswith("/" + param_name)) and tuple(leaf.shape) == tuple(shape):
                return where
        return spread(leaf, mesh)

    opt_state = jax.tree_util.tree_map_with_path(mirror, abstract_state.opt_state)
    model_state = param_shardings(abstract_state.model_state, mesh, rules)
    others = jax.tree.map(
        lambda _: replicated(mesh), abstract_state.replace(params=None, model_state=None, opt_state=None)
    )
    return others.replace(params=params, model_state=model_state, opt_state=opt_state)


def put_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places this process's slice of the global batch on the mesh as one global array per key."""
    arrays = {key: np.asarray(value) for key, value in batch.items()}
    return {
        key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.shape), value)
        for key, value in arrays.items()
    }
