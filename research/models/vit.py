"""Vision Transformer (Dosovitskiy et al. 2021, "An image is worth 16x16 words").

The image is cut into non-overlapping `patch_size` squares, each linearly embedded (a
convolution whose kernel and stride are the patch size); a learned [CLS] token is prepended,
learned position embeddings are added, `num_layers` pre-LayerNorm Transformer blocks
(research/models/transformer.py) follow, then a final LayerNorm and a dense head on the [CLS]
state. The head starts at zero (as the paper's fine-tuning head), so initial logits are zero.
Position embeddings are sized for the image size seen at init.

Legend: B batch, H height, W width, C channels, N patches (+1 with [CLS]), D width, K classes.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.transformer import remat_block

INIT = nn.initializers.normal(0.02)


class ViT(nn.Module):
    """images_BxHxWxC -> logits_BxK (float32); H and W must be multiples of patch_size."""

    num_classes: int
    patch_size: int
    num_layers: int
    num_heads: int
    width: int
    mlp_dim: int | None = None  # None: 4 * width
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: str = "none"  # a transformer.REMAT_POLICIES name: what each block's backward pass recomputes

    @nn.compact
    def __call__(self, images_BxHxWxC: jax.Array, *, deterministic: bool = True) -> jax.Array:
        batch, height, width, _ = images_BxHxWxC.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image {height}x{width} is not a whole number of {self.patch_size}-pixel patches")
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        patch = (self.patch_size, self.patch_size)
        x = nn.Conv(self.width, patch, strides=patch, padding="VALID", name="patch_embedding", **types)(images_BxHxWxC)
        x_BxNxD = x.reshape(batch, -1, self.width)
        cls_1x1xD = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
        cls_Bx1xD = jnp.broadcast_to(cls_1x1xD, (batch, 1, self.width)).astype(x_BxNxD.dtype)
        x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
        positions_1xNxD = self.param("position_embedding", INIT, (1, x_BxNxD.shape[1], self.width), self.param_dtype)
        x_BxNxD = x_BxNxD + positions_1xNxD.astype(x_BxNxD.dtype)
        x_BxNxD = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x_BxNxD)
        block = remat_block(self.remat)
        for layer in range(self.num_layers):
            x_BxNxD = block(
                num_heads=self.num_heads,
                mlp_dim=self.mlp_dim or 4 * self.width,
                dropout_rate=self.dropout_rate,
                pre_layer_norm=True,
                layer_norm_epsilon=1e-6,
                kernel_init=nn.initializers.xavier_uniform(),
                output_kernel_init=nn.initializers.xavier_uniform(),
                name=f"block_{layer}",
                **types,
            )(x_BxNxD, None, deterministic)
        x_BxD = nn.LayerNorm(epsilon=1e-6, name="final_norm", **types)(x_BxNxD[:, 0])
        head = nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head", **types)
        return head(x_BxD).astype(jnp.float32)
