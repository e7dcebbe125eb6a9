"""Multi-layer perceptron: Dense layers with ReLU between them, the last one linear.

Optional dropout (Srivastava et al. 2014) on the inputs and on every hidden layer's output,
active only with `train=True` and a "dropout" rng; the defaults (0.0) leave the model as before.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
    """`features` lists every layer's width; the last entry is the output size (e.g. classes)."""

    features: Sequence[int]
    dropout_rate: float = 0.0  # on each hidden layer's output
    input_dropout_rate: float = 0.0
    dtype: Any = jnp.float32  # computation
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs_BxD: jax.Array, *, train: bool = False) -> jax.Array:
        hidden = nn.Dropout(self.input_dropout_rate, deterministic=not train)(inputs_BxD)
        for width in self.features[:-1]:
            hidden = nn.relu(nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype)(hidden))
            hidden = nn.Dropout(self.dropout_rate, deterministic=not train)(hidden)
        return nn.Dense(self.features[-1], dtype=self.dtype, param_dtype=self.param_dtype)(hidden)
