"""AdEMAMix: Adam with a mixture of a fast and a slow gradient EMA.

Pagliardini, Ablin & Grangier, "The AdEMAMix Optimizer: Better, Faster, Older", arXiv:2409.03137
(2024), Algorithm 1. With t counted from 1:

  m1 <- b1 m1 + (1 - b1) g          m2 <- b3(t) m2 + (1 - b3(t)) g        nu <- b2 nu + (1 - b2) g^2
  theta <- theta - lr * ((m1 / (1 - b1^t) + alpha(t) m2) / (sqrt(nu / (1 - b2^t)) + eps) + weight_decay theta)

alpha(t) = alpha * min(t / alpha_warmup, 1) and b3(t) follows the paper's half-life-linear warmup
from b1 to b3 over b3_warmup steps; a warmup of 0 keeps alpha and b3 constant.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class ScaleByAdemamixState(NamedTuple):
    count: jax.Array
    fast: optax.Updates  # m1, bias-corrected when used
    slow: optax.Updates  # m2, never bias-corrected
    nu: optax.Updates


def alpha_at(step: jax.Array, alpha: float, warmup: int) -> jax.Array:
    """alpha(t): linear warmup from 0 to alpha over `warmup` steps (constant when warmup is 0)."""
    return alpha * jnp.minimum(step / warmup, 1.0) if warmup else jnp.asarray(alpha)


def b3_at(step: jax.Array, b1: float, b3: float, warmup: int) -> jax.Array:
    """b3(t): interpolates the EMA half-life linearly from b1's to b3's over `warmup` steps (constant when 0)."""
    if not warmup:
        return jnp.asarray(b3)
    fraction = jnp.minimum(step / warmup, 1.0)
    log_b1, log_b3 = jnp.log(b1), jnp.log(b3)
    return jnp.minimum(jnp.exp(log_b1 * log_b3 / ((1.0 - fraction) * log_b3 + fraction * log_b1)), b3)


def scale_by_ademamix(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    alpha_warmup: int = 0,
    b3_warmup: int = 0,
) -> optax.GradientTransformation:
    """The AdEMAMix direction (Pagliardini et al., 2024), before the learning rate and weight decay."""

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        return ScaleByAdemamixState(count=jnp.zeros((), jnp.int32), fast=zeros(), slow=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        step = count.astype(jnp.float32)
        slow_rate = b3_at(step, b1, b3, b3_warmup)
        fast = jax.tree.map(lambda m, g: b1 * m + (1.0 - b1) * g, state.fast, updates)
        slow = jax.tree.map(lambda m, g: slow_rate * m + (1.0 - slow_rate) * g, state.slow, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * jnp.square(g), state.nu, updates)
        mix = alpha_at(step, alpha, alpha_warmup)
        fast_correction, nu_correction = 1.0 - b1**step, 1.0 - b2**step
        direction = jax.tree.map(
            lambda m1, m2, v, g: ((m1 / fast_correction + mix * m2) / (jnp.sqrt(v / nu_correction) + eps)).astype(
                g.dtype
            ),
            fast,
            slow,
            nu,
            updates,
        )
        return direction, ScaleByAdemamixState(count=count, fast=fast, slow=slow, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def ademamix(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    alpha: float = 5.0,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    alpha_warmup: int = 0,
    b3_warmup: int = 0,
) -> optax.GradientTransformation:
    """AdEMAMix (Pagliardini, Ablin & Grangier, 2024) with AdamW-style weight decay inside the learning rate."""
    return optax.chain(
        scale_by_ademamix(b1, b2, b3, alpha, eps, alpha_warmup, b3_warmup),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
