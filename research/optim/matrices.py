"""Which parameters are matrices, and which of their axes are a layer's input and output, for the optimizers that
precondition or orthogonalise whole matrices (Muon, SOAP).

A kernel computes y = x W: its reduction (input) axes and output axes; every other axis is a batch of independent
matrices (the layer axis of scanned layers, the expert axis of a mixture). By path:

  .../attention/(query|key|value)/kernel   D x H x Dh   (GPT's DenseGeneral)   input D, output H x Dh
  .../attention/out/kernel                 H x Dh x D                          input H x Dh, output D
  any other kernel of rank >= 2            ... x I x O  (Llama's projections, MLPs, experts)   input I, output O

Embeddings and output heads are matrices too; Muon's recipe (Jordan et al. 2024; Liu et al. 2025) leaves them,
and vectors, to AdamW (`hidden_matrices`), while SOAP preconditions them (`all_matrices`).
"""

import math
import re
from typing import Any

import jax
import optax.contrib

from research.tree import path_name

PyTree = Any
Axes = optax.contrib.MuonDimensionNumbers
EMBEDDINGS_AND_HEADS = re.compile(r"(^|/)(embed[^/]*|wte|wpe|lm_head|head|token_embedding|position_embedding)(/|$)")
QUERY_KEY_VALUE = re.compile(r"attention/(query|key|value)/kernel$")
ATTENTION_OUT = re.compile(r"attention/out/kernel$")


def axes_of(name: str, leaf: Any) -> Axes | None:
    """The (reduction, output) axes of the matrix `leaf` at path `name` (negative: counted from the last), or None
    for a vector or scalar."""
    if getattr(leaf, "ndim", 0) < 2:
        return None
    if leaf.ndim >= 3 and QUERY_KEY_VALUE.search(name):
        return Axes(reduction_axis=-3, output_axis=(-2, -1))
    if leaf.ndim >= 3 and ATTENTION_OUT.search(name):
        return Axes(reduction_axis=(-3, -2), output_axis=-1)
    return Axes(reduction_axis=-2, output_axis=-1)


def is_axes(node: Any) -> bool:
    """A leaf of `all_matrices`' or `hidden_matrices`' trees (None or Axes), for jax.tree.map's is_leaf."""
    return node is None or isinstance(node, Axes)


def all_matrices(params: PyTree) -> PyTree:
    """Every parameter's axes (`axes_of`), None for vectors."""
    return jax.tree_util.tree_map_with_path(lambda path, leaf: axes_of(path_name(path), leaf), params)


def hidden_matrices(params: PyTree) -> PyTree:
    """The hidden layers' matrices' axes; None for vectors, embeddings and output heads."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: None if EMBEDDINGS_AND_HEADS.search(path_name(path)) else axes_of(path_name(path), leaf),
        params,
    )


def _groups(ndim: int, axes: Axes) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(batch, reduction, output) axes of a rank-`ndim` leaf, non-negative."""
    reduction = tuple(axis % ndim for axis in _tuple(axes.reduction_axis))
    output = tuple(axis % ndim for axis in _tuple(axes.output_axis))
    return tuple(axis for axis in range(ndim) if axis not in reduction + output), reduction, output


def matrix_shape(shape: tuple[int, ...], axes: Axes) -> tuple[int, int, int]:
    """(batch, fan_in, fan_out) of a leaf of `shape` seen as a batch of matrices."""
    return tuple(math.prod(shape[axis] for axis in group) for group in _groups(len(shape), axes))


def as_batched_matrices(leaf: jax.Array, axes: Axes) -> tuple[jax.Array, Any]:
    """(leaf as batch x fan_in x fan_out, the function that puts such an array back in the leaf's layout)."""
    batch, reduction, output = _groups(leaf.ndim, axes)
    order = batch + reduction + output
    back_order = tuple(sorted(range(leaf.ndim), key=lambda index: order[index]))
    unflat = tuple(leaf.shape[axis] for axis in order)
    flat = leaf.transpose(order).reshape(matrix_shape(leaf.shape, axes))
    return flat, lambda array: array.reshape(unflat).transpose(back_order)


def _tuple(axes) -> tuple[int, ...]:
    return (axes,) if isinstance(axes, int) else tuple(axes)
