"""Multi-layer perceptron: Dense layers with ReLU between them, the last one linear."""

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """`features` lists every layer's width; the last entry is the output size (e.g. classes)."""

    features: Sequence[int]

    @nn.compact
    def __call__(self, inputs_BxD: jax.Array) -> jax.Array:
        hidden = inputs_BxD
        for width in self.features[:-1]:
            hidden = nn.relu(nn.Dense(width)(hidden))
        return nn.Dense(self.features[-1])(hidden)
