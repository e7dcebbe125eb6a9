"""Model families, one file each; every model is a Flax Linen module used through init/apply."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from research.errors import ConfigError
from research.sharding import BATCH_AXES, CONTEXT_AXIS, context_shards

# Compute dtypes a config may name; parameters, the loss and the optimizer stay float32 (mixed precision).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree (works on arrays and on jax.eval_shape's ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))


def compute_dtype(name: str) -> jnp.dtype:
    """The dtype a config's `model.dtype` names; an unknown name is a one-line error."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"model.dtype {name!r} is not a compute dtype: use one of {', '.join(COMPUTE_DTYPES)}")
    return jnp.dtype(name)


def shard_batch(x: jax.Array) -> jax.Array:
    """x with its leading (batch) dimension split over the mesh's batch axes (data, fsdp, expert) and its second
    (positions) over `context` when the mesh has one, when a mesh is set
    (research/steps.py runs the steps under theirs). Without it, an activation may take the layout of a
    weight it meets (an embedding table split over its width by fsdp) and keep the whole batch on every
    device, so that activation memory grows with the global batch instead of the per-device one."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(axis for axis in BATCH_AXES if not mesh.empty and axis in mesh.axis_names)
    size = int(np.prod([mesh.shape[axis] for axis in axes])) if axes else 1
    batch = axes if size > 1 and x.shape[0] % size == 0 else None
    shards = context_shards(mesh)
    context = CONTEXT_AXIS if shards > 1 and x.ndim >= 2 and x.shape[1] % shards == 0 else None
    if batch is None and context is None:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(batch, context))


def laid_out(x: jax.Array, *axes: str | None) -> jax.Array:
    """x with dimension i split over mesh axis axes[i] (None: whole), when a mesh is set and has that axis.
    Pins a weight's layout before a loop that would otherwise gather it again in every iteration."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = [
        axis if axis in mesh.axis_names and size % mesh.shape[axis] == 0 else None for axis, size in zip(axes, x.shape)
    ]
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def apply_with_dropout(model, variables: dict, *inputs: Any, rng: jax.Array | None, **options) -> Any:
    """`model.apply` for the models whose `__call__` takes `deterministic`: dropout on, drawn from `rng`, when
    `rng` is given (training); off when it is None (evaluation, as the trainer calls loss_fn there)."""
    rngs = None if rng is None else {"dropout": rng}
    return model.apply(variables, *inputs, deterministic=rng is None, rngs=rngs, **options)


def softcapped(x: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(x / cap): x squashed smoothly into (-cap, cap) (Gemma 2's scores and logits); x when cap is 0."""
    return cap * jnp.tanh(x / cap) if cap else x
