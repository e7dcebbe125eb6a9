"""CIFAR ResNets (He et al. 2016, "Deep residual learning for image recognition", sec. 4.2).

A 3x3 convolution with `width` (16) filters, then three stages of n basic blocks with
width, 2*width, 4*width filters on 32x32, 16x16, 8x8 maps (the first block of stages 2 and 3
subsamples with stride 2), global average pooling and a dense classifier: depth = 6n + 2
layers (ResNet-20, 32, 44, 56, 110). Every convolution is followed by BatchNorm; convolutions
carry no bias and start from He et al. 2015's N(0, 2 / fan_in).

Shortcuts are option A: identity, and where a block changes shape, stride-2 subsampling plus
zero channels appended, so shortcuts add no parameters (0.27M / 0.46M / 0.85M for 20 / 32 / 56).

BatchNorm: `train=True` normalises with the batch statistics and updates the running averages
in the `batch_stats` collection (apply with `mutable=["batch_stats"]`); `train=False` uses the
running averages. No `axis_name` is needed for data parallelism: under `jax.jit` a batch
sharded over devices is one global array, so the mean and variance are over the global batch
(GSPMD inserts the cross-device reduction; tests/test_models.py checks it).

Legend: B batch, H height, W width, C channels, K classes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

HE_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
BATCH_NORM_MOMENTUM = 0.9  # running average keeps 90% of the old value, as in the Torch recipe the paper used
BATCH_NORM_EPSILON = 1e-5


def zero_padded_shortcut(x_BxHxWxC: jax.Array, features: int, stride: int) -> jax.Array:
    """Option A: identity, subsampled by `stride`, with zero channels appended up to `features`."""
    x_BxHxWxC = x_BxHxWxC[:, ::stride, ::stride, :]
    extra = features - x_BxHxWxC.shape[-1]
    return jnp.pad(x_BxHxWxC, ((0, 0), (0, 0), (0, 0), (0, extra))) if extra else x_BxHxWxC


def layer_arguments(module: nn.Module, train: bool) -> tuple[dict, dict, dict]:
    """(types, conv, norm): the keyword arguments every ResNet layer of `module` shares: its dtypes; bias-free
    He-initialised convolutions; BatchNorm on batch statistics in training, running averages otherwise."""
    types = dict(dtype=module.dtype, param_dtype=module.param_dtype)
    conv = dict(use_bias=False, kernel_init=HE_NORMAL, **types)
    norm = dict(use_running_average=not train, momentum=BATCH_NORM_MOMENTUM, epsilon=BATCH_NORM_EPSILON, **types)
    return types, conv, norm


class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
        _, conv, norm = layer_arguments(self, train)
        conv = dict(kernel_size=(3, 3), **conv)
        y = nn.Conv(self.features, strides=(self.stride, self.stride), name="conv_1", **conv)(x_BxHxWxC)
        y = nn.relu(nn.BatchNorm(name="norm_1", **norm)(y))
        y = nn.Conv(self.features, name="conv_2", **conv)(y)
        y = nn.BatchNorm(name="norm_2", **norm)(y)
        return nn.relu(y + zero_padded_shortcut(x_BxHxWxC, self.features, self.stride))


class CifarResNet(nn.Module):
    """images_BxHxWxC -> logits_BxK (float32); `depth` is 6n + 2."""

    depth: int = 20
    num_classes: int = 10
    width: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"depth {self.depth} is not 6n + 2 with n >= 1 (20, 32, 44, 56, 110)")
        blocks_per_stage = (self.depth - 2) // 6
        types, conv, norm = layer_arguments(self, train)
        stem = nn.Conv(self.width, (3, 3), name="stem_conv", **conv)
        x = nn.relu(nn.BatchNorm(name="stem_norm", **norm)(stem(images_BxHxWxC)))
        for stage in range(3):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                name = f"stage_{stage}_block_{block}"
                x = BasicBlock(self.width * 2**stage, stride, name=name, **types)(x, train=train)
        x_BxC = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier", **types)(x_BxC).astype(jnp.float32)


class BottleneckBlock(nn.Module):
    """conv1x1 - BN - ReLU - conv3x3 (the stride) - BN - ReLU - conv1x1 (4x) - BN, plus the shortcut (a strided
    1x1 projection where the shape changes: option B), then ReLU. The last BN starts at zero (Goyal et al. 2017)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxHxWxC: jax.Array, *, train: bool) -> jax.Array:
        _, conv, norm = layer_arguments(self, train)
        y = nn.relu(
            nn.BatchNorm(name="norm_1", **norm)(nn.Conv(self.features, (1, 1), name="conv_1", **conv)(x_BxHxWxC))
        )
        y = nn.Conv(self.features, (3, 3), (self.stride, self.stride), name="conv_2", **conv)(y)
        y = nn.relu(nn.BatchNorm(name="norm_2", **norm)(y))
        y = nn.Conv(4 * self.features, (1, 1), name="conv_3", **conv)(y)
        y = nn.BatchNorm(name="norm_3", scale_init=nn.initializers.zeros, **norm)(y)
        shortcut = x_BxHxWxC
        if x_BxHxWxC.shape[-1] != 4 * self.features or self.stride != 1:
            projection = nn.Conv(4 * self.features, (1, 1), (self.stride, self.stride), name="projection", **conv)
            shortcut = nn.BatchNorm(name="projection_norm", **norm)(projection(x_BxHxWxC))
        return nn.relu(y + shortcut)


class ImageNetResNet(nn.Module):
    """He et al. 2016's ImageNet ResNets with bottleneck blocks (Table 1): a 7x7/2 convolution and a 3x3/2 max
    pool, four stages of `stage_sizes` blocks of 64, 128, 256, 512 (x4 out) filters; ResNet-50 is (3, 4, 6, 3),
    25.6M parameters at 1,000 classes."""

    stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
    num_classes: int = 1000
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, train: bool = False) -> jax.Array:
        types, conv, norm = layer_arguments(self, train)
        x = nn.Conv(64, (7, 7), (2, 2), name="stem_conv", **conv)(images_BxHxWxC)
        x = nn.max_pool(nn.relu(nn.BatchNorm(name="stem_norm", **norm)(x)), (3, 3), (2, 2), padding="SAME")
        for stage, blocks in enumerate(self.stage_sizes):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BottleneckBlock(64 * 2**stage, stride, name=f"stage_{stage}_block_{block}", **types)(x, train=train)
        return nn.Dense(self.num_classes, name="classifier", **types)(jnp.mean(x, axis=(1, 2))).astype(jnp.float32)
