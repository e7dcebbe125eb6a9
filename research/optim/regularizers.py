"""Regularization: L1/L2 penalties in the loss, decoupled weight decay and an EMA of the parameters.
Penalties and decay skip parameters whose path matches `decay_exclude` (biases and normalization
scales by default). Early stopping is the training loop's (research/train.py)."""

import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib

from research.tree import path_name

PyTree = Any


def decay_mask(params: PyTree, exclude: str) -> PyTree:
    """True where a parameter is regularized: its path does not match `exclude` ('' excludes nothing)."""
    pattern = re.compile(exclude) if exclude else None
    return jax.tree_util.tree_map_with_path(lambda path, _: not (pattern and pattern.search(path_name(path))), params)


def penalty(params: PyTree, *, l1: float, l2: float, exclude: str) -> jax.Array:
    """l1 * sum|p| + l2 / 2 * sum p^2 over the regularized parameters (Tibshirani, 1996; Krogh & Hertz, 1992)."""
    mask = decay_mask(params, exclude)
    terms = [
        l1 * jnp.sum(jnp.abs(p)) + 0.5 * l2 * jnp.sum(jnp.square(p))
        for p, keep in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
        if keep
    ]
    return sum(terms, jnp.zeros((), jnp.float32))


def with_penalty(loss_fn: Callable, *, l1: float, l2: float, exclude: str) -> Callable:
    """The loss plus the L1/L2 penalty; the penalty is also reported as the metric `penalty`."""

    def regularized(params, batch, rng, **model_state):
        loss, aux = loss_fn(params, batch, rng, **model_state)
        extra = penalty(params, l1=l1, l2=l2, exclude=exclude)
        return loss + extra, aux | {"penalty": extra}

    return regularized


def penalized(loss_fn: Callable, optimizer_config: ml_collections.ConfigDict) -> Callable:
    """The training loss plus the config's L1/L2 penalty (`loss_fn` itself when there is none)."""
    if not (optimizer_config.l1_penalty or optimizer_config.l2_penalty):
        return loss_fn
    return with_penalty(
        loss_fn, l1=optimizer_config.l1_penalty, l2=optimizer_config.l2_penalty, exclude=optimizer_config.decay_exclude
    )


class DecoupledWeightDecayState(NamedTuple):
    count: jax.Array


def decoupled_weight_decay(rate: float, learning_rate: optax.Schedule) -> optax.GradientTransformation:
    """Adds -learning_rate(t) * rate * p to the (already scaled) update (Loshchilov & Hutter, 2019)."""

    def init_fn(params):
        del params
        return DecoupledWeightDecayState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("decoupled_weight_decay needs the params")
        scale = -rate * learning_rate(state.count)
        updates = jax.tree.map(lambda u, p: u + (scale * p).astype(u.dtype), updates, params)
        return updates, DecoupledWeightDecayState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


class EmaParamsState(NamedTuple):
    ema_params: PyTree


def ema_of_params(decay: float) -> optax.GradientTransformation:
    """Keeps ema <- decay * ema + (1 - decay) * new params in its state; updates pass unchanged (Polyak & Juditsky,
    1992)."""

    def init_fn(params):
        return EmaParamsState(ema_params=jax.tree.map(jnp.asarray, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("ema_of_params needs the params")
        new_params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema_params, new_params)
        return updates, EmaParamsState(ema_params=ema)

    return optax.GradientTransformation(init_fn, update_fn)


def eval_params(params: PyTree, opt_state: optax.OptState) -> PyTree:
    """The parameters to evaluate: the EMA if the optimizer keeps one; for schedule-free optimizers
    the averaged sequence x rather than the gradient point y (Defazio et al., 2024); else the parameters."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "ema_params")
    if found:
        return found[0][1]
    is_free = lambda node: isinstance(node, optax.contrib.ScheduleFreeState)
    free = [node for node in jax.tree.leaves(opt_state, is_leaf=is_free) if is_free(node)]
    return optax.contrib.schedule_free_eval_params(free[0], params) if free else params
