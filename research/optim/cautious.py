"""Cautious AdamW: AdamW whose update is zeroed where it disagrees in sign with the current gradient.

Liang, Chen, Liu & Liu, "Cautious Optimizers: Improving Training with One Line of Code",
arXiv:2411.16085 (2024), Algorithm (C-AdamW). With u the Adam direction m_hat / (sqrt(v_hat) + eps)
and g the gradient, per parameter tensor:

  phi = 1[u * g > 0]          u_c = u * phi * size(u) / max(sum(phi), 1)
  theta <- theta - lr * (u_c + weight_decay * theta)

The rescaling by the fraction of coordinates kept keeps the update's average size unchanged.
"""

import jax
import jax.numpy as jnp
import optax


def cautious_mask(direction: jax.Array, gradient: jax.Array) -> jax.Array:
    """Keeps coordinates where direction and gradient agree in sign, rescaled by size / kept count."""
    keep = (direction * gradient > 0).astype(direction.dtype)
    return direction * keep * (keep.size / jnp.maximum(jnp.sum(keep), 1.0)).astype(direction.dtype)


def cautious_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
) -> optax.GradientTransformation:
    """C-AdamW (Liang et al., 2024): AdamW with the cautious sign mask on the Adam direction."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def init_fn(params):
        return adam.init(params)

    def update_fn(updates, state, params=None):
        direction, state = adam.update(updates, state, params)
        return jax.tree.map(cautious_mask, direction, updates), state

    return optax.chain(
        optax.GradientTransformation(init_fn, update_fn),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
