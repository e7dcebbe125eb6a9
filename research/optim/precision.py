"""The optimizer's own precision, apart from the parameters': moments in float32 for bfloat16 parameters, and a
float32 master copy of the parameters that the updates accumulate into.

  --config.model.param_dtype=bfloat16 --config.optimizer.moment_dtype=float32 --config.optimizer.master_weights=True

`in_dtype(tx, "float32")`: the optimizer sees its gradients and parameters in float32, so every moment it keeps is
float32 (optax's moments take the gradients' dtype), and its updates go back in the parameters' dtype.
`with_master_weights(tx)`: the state keeps a float32 copy of the parameters; each update is applied to the copy,
and the parameters become the copy rounded to their dtype. Without it, an update smaller than half a bfloat16 step
(2^-8 of the parameter's size) is lost every time; with it, small updates add up in the copy. The copy costs 4
bytes per parameter; the dry run shows the state's bytes per chip with each setting (docs/scaling.md).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research.optim import contract

PyTree = Any


def _cast(tree: PyTree, dtype) -> PyTree:
    """Floating leaves in `dtype`, the others as they are."""
    return jax.tree.map(lambda leaf: leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, tree)


def in_dtype(tx: optax.GradientTransformation, dtype: str) -> optax.GradientTransformationExtraArgs:
    """`tx` run in `dtype` (the module docstring)."""
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        return inner.init(_cast(params, dtype))

    def update_fn(updates, state, params=None, **extra_args):
        cast_params = None if params is None else _cast(params, dtype)
        new_updates, state = inner.update(_cast(updates, dtype), state, cast_params, **extra_args)
        return contract.cast_like(new_updates, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class MasterState(NamedTuple):
    master: PyTree  # the parameters in float32, as the updates left them
    inner: Any


def with_master_weights(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """`tx` whose updates accumulate in a float32 copy of the parameters (the module docstring); `tx` sees the copy
    as its parameters (weight decay shrinks the copy)."""
    inner = optax.with_extra_args_support(tx)

    def init_fn(params):
        master = _cast(params, jnp.float32)
        return MasterState(master, inner.init(master))

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError("master weights need the parameters: call update(updates, state, params)")
        steps, inner_state = inner.update(_cast(updates, jnp.float32), state.inner, state.master, **extra_args)
        master = optax.apply_updates(state.master, steps)
        # the parameters become the copy rounded to their dtype: the update is the difference, taken in float32
        to_master = jax.tree.map(lambda copy, old: copy.astype(old.dtype).astype(jnp.float32) - old, master, params)
        return contract.cast_like(to_master, params), MasterState(master, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
