"""Magnitude pruning: weights set to zero, smallest first, on a gradual schedule, kept at zero after.

`magnitude_pruning(...)` is an optax transformation chained after the optimizer (research/optim/registry.py
make_tx, from `config.pruning`). Its state holds one boolean mask per prunable parameter (kernels, by
`include`), so a checkpoint carries the masks and a resumed run prunes exactly as an uninterrupted one.
Every `every` steps from `start_step`, and at `end_step`, the masks are recomputed from the magnitudes of the
parameters after the update, to the sparsity of Zhu & Gupta's (2017) cubic schedule
    s_t = s_final * (1 - (1 - (t - start) / (end - start))^3),
over all prunable weights at once (`scope="global"`) or per parameter (`"layer"`); a weight outside its
mask gets the update that makes it exactly zero. After `end_step` the masks stay fixed and training goes
on (fine-tuning the survivors).

    python launch.py --config experiments/mnist_cnn.py:cpu --workdir runs/cnn_90 --config.pruning.sparsity=0.9
"""

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research.errors import ConfigError
from research.tree import path_name

PyTree = Any
SCOPES = ("global", "layer")


class PruningState(NamedTuple):
    count: jax.Array  # updates applied so far
    masks: PyTree  # True where a weight is kept; None for parameters that are never pruned


def _prunable(pattern: re.Pattern, path, leaf) -> bool:
    """A parameter that pruning touches: 2 or more axes and a path that `pattern` finds."""
    return leaf.ndim >= 2 and bool(pattern.search(path_name(path)))


def sparsity_at(step, final: float, start: int, end: int):
    """The cubic schedule's sparsity after `step` updates: 0 before `start`, `final` from `end` on."""
    progress = jnp.where(step >= end, 1.0, jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0))
    return final * (1.0 - (1.0 - progress) ** 3)


def _keep_largest(magnitudes: list[jax.Array], sparsity) -> list[jax.Array]:
    """Masks keeping all but the round(sparsity * n) smallest of the magnitudes (n: their total count)."""
    flat = jnp.sort(jnp.concatenate([magnitude.ravel() for magnitude in magnitudes]))
    pruned = jnp.round(sparsity * flat.size).astype(jnp.int32)
    threshold = jnp.where(pruned > 0, flat[jnp.maximum(pruned - 1, 0)], -1.0)
    return [magnitude > threshold for magnitude in magnitudes]


def magnitude_pruning(
    sparsity: float, start_step: int, end_step: int, every: int, scope: str = "global", include: str = r"kernel$"
) -> optax.GradientTransformation:
    """Prunes the parameters whose path matches `include` (and have 2 or more axes) to `sparsity`."""
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"pruning.sparsity is {sparsity}: it must be in [0, 1)")
    if scope not in SCOPES:
        raise ConfigError(f"pruning.scope {scope!r}: use one of {', '.join(SCOPES)}")
    if every < 1 or end_step < start_step:
        raise ConfigError(
            f"pruning: every ({every}) must be >= 1 and end_step ({end_step}) >= start_step ({start_step})"
        )
    pattern = re.compile(include)

    def init(params):
        masks = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.ones(leaf.shape, bool) if _prunable(pattern, path, leaf) else None, params
        )
        if not any(mask is not None for mask in jax.tree.leaves(masks)):
            raise ConfigError(f"pruning: no parameter with 2 or more axes matches include {include!r}")
        return PruningState(jnp.zeros([], jnp.int32), masks)

    def recomputed(masks, new_params, target):
        leaves, treedef = jax.tree.flatten(masks, is_leaf=lambda leaf: leaf is None)
        weights = treedef.flatten_up_to(new_params)
        chosen = [index for index, mask in enumerate(leaves) if mask is not None]
        magnitudes = [jnp.abs(weights[index]) for index in chosen]
        if scope == "global":
            kept = _keep_largest(magnitudes, target)
        else:
            kept = [_keep_largest([magnitude], target)[0] for magnitude in magnitudes]
        for index, mask in zip(chosen, kept):
            leaves[index] = mask
        return jax.tree.unflatten(treedef, leaves)

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("magnitude_pruning needs the parameters")
        count = state.count + 1
        new_params = optax.apply_updates(params, updates)
        due = (count >= start_step) & (count <= end_step) & (((count - start_step) % every == 0) | (count == end_step))
        target = sparsity_at(count, sparsity, start_step, end_step)
        masks = jax.lax.cond(due, lambda: recomputed(state.masks, new_params, target), lambda: state.masks)
        updates = jax.tree.map(
            lambda update, mask, param: update if mask is None else jnp.where(mask, update, -param),
            updates,
            masks,
            params,
            is_leaf=lambda leaf: leaf is None,
        )
        return updates, PruningState(count, masks)

    return optax.GradientTransformation(init, update)


def sparsity_of(params: PyTree, include: str = r"kernel$") -> tuple[float, int, int]:
    """(fraction of zeros, zeros, weights) over the parameters `include` matches with 2 or more axes."""
    pattern = re.compile(include)
    leaves = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params) if _prunable(pattern, path, leaf)]
    total = sum(leaf.size for leaf in leaves)
    zeros = sum(int((leaf == 0).sum()) for leaf in leaves)
    return zeros / max(total, 1), zeros, total


def sparse_report(params: PyTree, include: str = r"kernel$") -> str:
    """The kernels' sparsity and their size stored dense against sparse (the nonzero values and an int32
    flat index each, as a CSR-like export would hold them)."""
    fraction, zeros, total = sparsity_of(params, include)
    itemsize = max((leaf.dtype.itemsize for leaf in jax.tree.leaves(params)), default=4)
    dense, sparse = total * itemsize, (total - zeros) * (itemsize + 4)
    return (
        f"kernels {fraction:.1%} zero ({zeros:,} of {total:,} weights): {dense:,} bytes dense, "
        f"{sparse:,} as nonzero values + int32 indices ({dense / max(sparse, 1):.2f}x smaller)"
    )
