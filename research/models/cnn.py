"""Small convolutional network for MNIST-sized images, shaped like the Flax examples' MNIST CNN
(github.com/google/flax, examples/mnist) at the widths of our issue: conv(3x3, 64) - pool -
conv(3x3, 128) - pool - dense 1000 - dense classes, ReLU after every layer but the last.

Pooling is 2x2 average pooling with stride 2 by default because the Flax example that is our
reference result (99.17% after 10 epochs) uses average pooling; `pooling="max"` gives the
LeNet/VGG-style variant. Convolutions use SAME padding, so a 28x28 image becomes 7x7x128
before the dense layers.

Legend: B batch, H height, W width, C channels, K classes.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

POOLS = {"avg": nn.avg_pool, "max": nn.max_pool}


class CNN(nn.Module):
    """images_BxHxWxC (or BxHxW, one channel) -> logits_BxK (float32)."""

    num_classes: int = 10
    conv_features: Sequence[int] = (64, 128)
    dense_features: int = 1000
    pooling: str = "avg"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array) -> jax.Array:
        if self.pooling not in POOLS:
            raise ValueError(f"pooling {self.pooling!r} is not one of {sorted(POOLS)}")
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = images_BxHxWxC[..., None] if images_BxHxWxC.ndim == 3 else images_BxHxWxC
        for features in self.conv_features:
            x = nn.relu(nn.Conv(features, kernel_size=(3, 3), **types)(x))
            x = POOLS[self.pooling](x, window_shape=(2, 2), strides=(2, 2))
        x_BxF = x.reshape(x.shape[0], -1)
        x_BxF = nn.relu(nn.Dense(self.dense_features, **types)(x_BxF))
        return nn.Dense(self.num_classes, **types)(x_BxF).astype(jnp.float32)
