"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Vyas, Morwani, Zhao, Shapira, Brandfonbrener, Janson & Kakade, "SOAP: Improving and Stabilizing Shampoo using
Adam", arXiv:2409.11321 (2024), Algorithm 3. For a matrix W (fan_in x fan_out, research/optim/matrices.py's axes;
other axes are a batch of matrices) with gradient G:

  L <- b2s L + (1 - b2s) G G^T          R <- b2s R + (1 - b2s) G^T G         (Shampoo's two factors)
  after the first gradient and every `precondition_frequency` steps: Q_L, Q_R <- eigenvectors of L, R
  M <- b1 M + (1 - b1) G                                                     (the first moment, in W's basis)
  G' = Q_L^T G Q_R,   V <- b2 V + (1 - b2) G'^2                              (the second moment, in the eigenbasis)
  update = Q_L [ (Q_L^T M Q_R) / (1 - b1^t) / (sqrt(V / (1 - b2^t)) + eps) ] Q_R^T

As the paper's code does, the first gradient only starts L and R (no step is taken), and a basis is refreshed after
the step it served, so it never holds the gradient it rotates. A side longer than `max_precond_dim` is not rotated
(Q = identity, no factor kept), as in the paper; vectors get Adam. Two simplifications, said here: the eigenvectors
are recomputed with `eigh` (the paper's faster variant does one power iteration and a QR from the previous basis),
and V is kept as it is when the basis changes (the paper re-sorts it by the new eigenvalues' order, which `eigh`'s
ascending order makes nearly the same). The paper's language-model settings are b1 = b2 = 0.95, b2s = b2, frequency
10; weight decay is the trainer's (`optimizer.weight_decay`).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from research.optim import matrices

PyTree = Any


class SoapState(NamedTuple):
    count: jax.Array
    mu: PyTree  # the first moment, each leaf in its parameter's layout
    nu: PyTree  # the second moment, in the eigenbasis, each leaf in its parameter's layout (so it shards alike)
    factors: PyTree  # per leaf: (L, R), each batch x n x n, or None for a side not rotated
    bases: PyTree  # per leaf: (Q_L, Q_R), alike


def _sides(leaf: jax.Array, axes, limit: int) -> tuple[int, int, int, bool, bool]:
    """(batch, fan_in, fan_out, rotate the input side, rotate the output side) of a matrix leaf."""
    batch, rows, columns = matrices.matrix_shape(leaf.shape, axes)
    return batch, rows, columns, rows <= limit, columns <= limit


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    shampoo_beta: float = -1.0,
    eps: float = 1e-8,
    precondition_frequency: int = 10,
    max_precond_dim: int = 10000,
) -> optax.GradientTransformation:
    """SOAP's direction (the module docstring); `shampoo_beta` < 0: b2."""
    shampoo_beta = b2 if shampoo_beta < 0 else shampoo_beta

    def init_leaf(leaf, axes):
        nu = jnp.zeros(leaf.shape, jnp.float32)
        if axes is None:
            return nu, (None, None), (None, None)
        batch, rows, columns, left, right = _sides(leaf, axes, max_precond_dim)
        square = lambda size, keep: jnp.zeros((batch, size, size), jnp.float32) if keep else None
        eye = lambda size, keep: jnp.broadcast_to(jnp.eye(size), (batch, size, size)) if keep else None
        return nu, (square(rows, left), square(columns, right)), (eye(rows, left), eye(columns, right))

    def init_fn(params):
        parts = jax.tree.map(init_leaf, params, matrices.all_matrices(params), is_leaf=matrices.is_axes)
        pick = lambda index: jax.tree.map(lambda part: part[index], parts, is_leaf=lambda node: isinstance(node, tuple))
        mu = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, jnp.float32), params)
        return SoapState(jnp.zeros([], jnp.int32), mu, pick(0), pick(1), pick(2))

    def rotate(matrix, basis, transpose):
        left, right = basis
        if left is not None:
            matrix = jnp.einsum("bij,bjk->bik", jnp.swapaxes(left, 1, 2) if transpose else left, matrix)
        if right is not None:
            matrix = jnp.einsum("bij,bjk->bik", matrix, right if transpose else jnp.swapaxes(right, 1, 2))
        return matrix

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        step = count - 1  # Adam's step count: the first call only starts the factors and their bases
        axes = matrices.all_matrices(updates)
        gradients = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), updates)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, gradients)
        corrected_first, corrected_second = 1 - b1 ** jnp.maximum(step, 1), 1 - b2 ** jnp.maximum(step, 1)

        def direction(gradient, first, second, axis, basis):
            if axis is None:
                second = b2 * second + (1 - b2) * jnp.square(gradient)
                return (first / corrected_first) / (jnp.sqrt(second / corrected_second) + eps), second
            flat_gradient, back = matrices.as_batched_matrices(gradient, axis)
            flat_first, _ = matrices.as_batched_matrices(first, axis)
            flat_second, _ = matrices.as_batched_matrices(second, axis)
            flat_second = b2 * flat_second + (1 - b2) * jnp.square(rotate(flat_gradient, basis, transpose=True))
            rotated = rotate(flat_first, basis, transpose=True) / corrected_first
            normalized = rotated / (jnp.sqrt(flat_second / corrected_second) + eps)
            return back(rotate(normalized, basis, transpose=False)), back(flat_second)

        pairs = jax.tree.map(direction, gradients, mu, state.nu, axes, state.bases, is_leaf=matrices.is_axes)
        is_pair = lambda node: isinstance(node, tuple) and len(node) == 2 and not isinstance(node[0], tuple)
        new_updates = jax.tree.map(lambda pair, leaf: pair[0].astype(leaf.dtype), pairs, updates, is_leaf=is_pair)
        nu = jax.tree.map(lambda pair: pair[1], pairs, is_leaf=is_pair)

        def accumulate(gradient, axis, factor):  # after the update: a basis never holds the gradient it rotates
            if axis is None:
                return factor
            flat, _ = matrices.as_batched_matrices(gradient, axis)
            left, right = factor
            if left is not None:
                left = shampoo_beta * left + (1 - shampoo_beta) * jnp.einsum("bij,bkj->bik", flat, flat)
            if right is not None:
                right = shampoo_beta * right + (1 - shampoo_beta) * jnp.einsum("bji,bjk->bik", flat, flat)
            return left, right

        factors = jax.tree.map(accumulate, gradients, axes, state.factors, is_leaf=matrices.is_axes)
        fresh = lambda: jax.tree.map(lambda square: jnp.linalg.eigh(square)[1], factors)
        bases = jax.lax.cond((step == 0) | (step % precondition_frequency == 0), fresh, lambda: state.bases)
        first_call = lambda new, old: jnp.where(step == 0, old, new)  # the first call: no step, no moments
        new_updates = jax.tree.map(lambda update: jnp.where(step == 0, jnp.zeros_like(update), update), new_updates)
        mu, nu = jax.tree.map(first_call, mu, state.mu), jax.tree.map(first_call, nu, state.nu)
        return new_updates, SoapState(count, mu, nu, factors, bases)

    return optax.GradientTransformation(init_fn, update_fn)
