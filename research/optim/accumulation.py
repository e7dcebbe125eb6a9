"""Gradient accumulation by a scan over micro-batches inside the train step.

Unlike optax.MultiSteps, whose accumulator is a second copy of the gradients living in the
optimizer state between steps, the scan's accumulator exists only inside the step (its peak memory
is that of no accumulation: docs/optimizers.md), and every train step is one optimizer update, so
num_steps, schedules and logs count updates. optax.MultiSteps remains what the conformance kit
checks optimizers under.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def micro_batches(batch: PyTree, k: int) -> PyTree:
    """(B, ...) -> (k, B / k, ...), micro-batch i holding rows i, i + k, ...: each stays split over the devices."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1), batch)


def accumulated_value_and_grad(loss_fn: Callable, k: int) -> Callable:
    """Like jax.value_and_grad(loss_fn, has_aux=True), averaged over k micro-batches scanned one at a time."""
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    if k == 1:
        return value_and_grad

    def accumulated(params, batch, rng):
        def micro_step(total, inputs):
            index, micro_batch = inputs
            micro_rng = None if rng is None else jax.random.fold_in(rng, index)
            return jax.tree.map(jnp.add, total, value_and_grad(params, micro_batch, micro_rng)), None

        micro = micro_batches(batch, k)
        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(value_and_grad, params, first, rng))
        total, _ = jax.lax.scan(micro_step, zeros, (jnp.arange(k), micro))
        return jax.tree.map(lambda x: x / k, total)

    return accumulated
