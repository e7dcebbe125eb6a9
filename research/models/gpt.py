"""GPT-2-style decoder-only language model (Radford et al. 2019, "Language models are unsupervised
multitask learners"), at any size; nanoGPT's character-level Shakespeare configs are small instances.

Token + learned position embeddings, `num_layers` pre-LayerNorm blocks of causal multi-head
self-attention and a 4x GELU MLP, a final LayerNorm, and an output head that is the token
embedding transposed (`tie_embeddings`, as GPT-2) or its own bias-free Dense. Weights start
from N(0, 0.02), the residual output projections from N(0, 0.02 / sqrt(2 * num_layers)) (GPT-2 sec. 2.3).
`use_bias=False` drops every Dense and LayerNorm bias (nanoGPT's `bias=False`).
`decode=True` (set with `model.clone(decode=True)`) is the generation path: each call takes one
position, tokens_Bx1, and every attention layer keeps its keys and values in the "cache"
collection (flax's autoregressive cache), so a new token costs one position, not the whole prefix.
The parameter tree is the same in both modes. See research/generate.py.
Compute runs in `dtype` (bfloat16 on accelerators); parameters stay in `param_dtype`; logits are float32.
`remat` names a rematerialisation policy for every block (research/models/transformer.py).

Legend: B batch, L sequence length (<= block_size), D width, V vocabulary.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.models.transformer import flat_dot_general, remat_block

INIT_STD = 0.02


class GPT(nn.Module):
    """Causal language model: tokens_BxL (int) -> next-token logits_BxLxV (float32)."""

    vocab_size: int
    block_size: int
    num_layers: int
    num_heads: int
    width: int
    dropout_rate: float = 0.0
    use_bias: bool = True
    tie_embeddings: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    decode: bool = False
    remat: str = "none"  # a transformer.REMAT_POLICIES name: what each block's backward pass recomputes

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, *, deterministic: bool = True) -> jax.Array:
        length = tokens_BxL.shape[-1]
        if length > self.block_size:
            raise ValueError(f"sequence length {length} exceeds block_size {self.block_size}")
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal(INIT_STD)
        embed = dict(features=self.width, embedding_init=init, **types)
        token_embedding = nn.Embed(self.vocab_size, name="token_embedding", **embed)
        position_embedding = nn.Embed(self.block_size, name="position_embedding", **embed)
        positions_L, mask_Bx1xLxL = self._positions_and_mask(tokens_BxL)
        x_BxLxD = token_embedding(tokens_BxL) + position_embedding(positions_L)
        x_BxLxD = nn.Dropout(self.dropout_rate, deterministic=deterministic)(x_BxLxD)
        block = remat_block("none" if self.decode else self.remat)  # generation takes no gradients
        for layer in range(self.num_layers):
            x_BxLxD = block(
                num_heads=self.num_heads,
                mlp_dim=4 * self.width,
                dropout_rate=self.dropout_rate,
                pre_layer_norm=True,
                use_bias=self.use_bias,
                kernel_init=init,
                output_kernel_init=nn.initializers.normal(INIT_STD / math.sqrt(2 * self.num_layers)),
                decode=self.decode,
                causal=True,  # blockwise: the attention skips most of the keys the causal mask removes
                name=f"block_{layer}",
                **types,
            )(x_BxLxD, mask_Bx1xLxL, deterministic)
        x_BxLxD = nn.LayerNorm(epsilon=1e-5, use_bias=self.use_bias, name="final_norm", **types)(x_BxLxD)
        if self.tie_embeddings:  # on (B*L) x D: see transformer.flat_dot_general for why
            logits_BxLxV = token_embedding.attend(x_BxLxD.reshape(-1, self.width)).reshape(*x_BxLxD.shape[:-1], self.vocab_size)
        else:
            logits_BxLxV = nn.Dense(self.vocab_size, use_bias=False, kernel_init=init, name="head", dot_general=flat_dot_general, **types)(x_BxLxD)
        return logits_BxLxV.astype(jnp.float32)

    def _positions_and_mask(self, tokens_BxL: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Positions 0..L-1 and no mask (the blocks are causal); when decoding, the cached position and no
        mask (the attention cache masks the keys not yet written), or the causal mask at initialisation."""
        length = tokens_BxL.shape[-1]
        if not self.decode:
            return jnp.arange(length), None
        initialized = self.has_variable("cache", "position")
        position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
        if not initialized:  # init sizes the caches from a full-length input
            return jnp.arange(length), nn.make_causal_mask(tokens_BxL)
        if length != 1:
            raise ValueError(f"decoding takes one position per call, got {length}")
        current = position.value
        position.value = current + 1
        return current[None], None
