"""The Transformer block shared by gpt, bert and vit (Vaswani et al. 2017, "Attention is all you need").

Self-attention then a two-layer GELU MLP, each a residual branch with dropout on its output.
`pre_layer_norm=True` normalises the input of each branch (GPT-2, ViT; Xiong et al. 2020);
`False` normalises after each residual sum (the original Transformer and BERT).
`remat_block(name)` is the block rematerialised under a `jax.checkpoint` policy: the backward
pass recomputes what the policy does not save, trading compute for activation memory.

Legend: B batch, L sequence length, D model width, H heads.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.models.attention import SelfAttention

Initializer = Any
Dtype = Any

# What the backward pass may keep from the forward pass of a block; the rest is recomputed.
REMAT_POLICIES = {
    "none": None,  # no rematerialisation: every activation is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's input: least memory, ~1/3 more compute
    "dots": jax.checkpoint_policies.checkpoint_dots,  # keep matmul outputs, recompute the cheap elementwise ops
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep projections, not attention scores
}
# Compute of a training step relative to no rematerialisation (the dry run's roofline): "full" runs each
# block's forward pass twice (4/3 of forward + backward), "dots_no_batch" recomputes the attention products.
REMAT_RECOMPUTE = {"none": 1.0, "full": 4 / 3, "dots": 1.0, "dots_no_batch": 1.05}


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """lax.dot_general for a dense layer, with the input's leading (batch, position) axes merged into one.

    The weight gradient is then one 2-D matmul. With a B x L x D input, XLA's CPU backend first
    transposes the B x L x F gradient inside the elementwise fusion before it: on this 2-core CPU
    that made a GPT MLP's forward + backward several times slower (docs/performance.md). Same FLOPs, same result."""
    (lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch) = dimension_numbers
    count, leading = len(lhs_contracting), lhs.ndim - len(lhs_contracting)
    plain = tuple(lhs_contracting) == tuple(range(leading, lhs.ndim)) and tuple(rhs_contracting) == tuple(range(count))
    if lhs_batch or rhs_batch or not plain or leading < 2:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
        )
    contracted = math.prod(rhs.shape[:count])
    out = jax.lax.dot_general(
        lhs.reshape(-1, contracted),
        rhs.reshape(contracted, -1),
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return out.reshape(*lhs.shape[:leading], *rhs.shape[count:])


class MLPBlock(nn.Module):
    """Dense(hidden) - GELU - Dense(back to the input width)."""

    hidden_dim: int
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.normal(0.02)
    output_kernel_init: Initializer = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    approximate_gelu: bool = True  # tanh approximation (GPT-2); False: the exact erf form (BERT)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        width = x_BxLxD.shape[-1]
        dense = dict(
            use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype, dot_general=flat_dot_general
        )
        hidden = nn.Dense(self.hidden_dim, kernel_init=self.kernel_init, name="fc_in", **dense)(x_BxLxD)
        return nn.Dense(width, kernel_init=self.output_kernel_init, name="fc_out", **dense)(
            nn.gelu(hidden, approximate=self.approximate_gelu)
        )


class TransformerBlock(nn.Module):
    """One pre- or post-LayerNorm block; `mask_Bx1xLxL` (or None) is True where a query may attend to a key."""

    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.0
    pre_layer_norm: bool = True
    use_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    kernel_init: Initializer = nn.initializers.normal(0.02)
    # GPT-2 shrinks the branches' output projections by 1/sqrt(2 * depth) so the residual stream keeps its scale.
    output_kernel_init: Initializer = nn.initializers.normal(0.02)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    decode: bool = False  # one position per call, keys and values kept in the "cache" collection (GPT generation)
    causal: bool = False  # each position attends only to itself and earlier ones (GPT), besides the mask
    approximate_gelu: bool = True  # the MLP's GELU: tanh approximation, or exact (False)

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask_Bx1xLxL: jax.Array | None, deterministic: bool) -> jax.Array:
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(epsilon=self.layer_norm_epsilon, use_bias=self.use_bias, **types)
        attention_options = dict(
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            kernel_init=self.kernel_init,
            out_kernel_init=self.output_kernel_init,
            use_bias=self.use_bias,
            name="attention",
            **types,
        )
        if self.decode:  # flax's module keeps the key/value cache; the parameters are the same as SelfAttention's
            flax_attention = nn.MultiHeadDotProductAttention(
                broadcast_dropout=False,
                force_fp32_for_softmax=True,
                decode=True,
                qkv_dot_general=flat_dot_general,
                out_dot_general=flat_dot_general,
                **attention_options,
            )
            attention = lambda inputs, mask, deterministic: flax_attention(
                inputs, mask=mask, deterministic=deterministic
            )
        else:
            attention = SelfAttention(causal=self.causal, **attention_options)
        mlp = MLPBlock(
            self.mlp_dim,
            self.use_bias,
            self.kernel_init,
            self.output_kernel_init,
            approximate_gelu=self.approximate_gelu,
            name="mlp",
            **types,
        )
        attention_norm, mlp_norm = nn.LayerNorm(name="attention_norm", **norm), nn.LayerNorm(name="mlp_norm", **norm)
        dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic)

        def attend(inputs_BxLxD):
            return attention(inputs_BxLxD, mask_Bx1xLxL, deterministic)

        if self.pre_layer_norm:
            x_BxLxD = x_BxLxD + dropout(attend(attention_norm(x_BxLxD)))
            return x_BxLxD + dropout(mlp(mlp_norm(x_BxLxD)))
        x_BxLxD = attention_norm(x_BxLxD + dropout(attend(x_BxLxD)))
        return mlp_norm(x_BxLxD + dropout(mlp(x_BxLxD)))


def remat_block(policy: str) -> type[TransformerBlock]:
    """TransformerBlock, rematerialised under REMAT_POLICIES[policy] unless it is "none"; same parameters."""
    if policy not in REMAT_POLICIES:
        raise ConfigError(
            f"model.remat {policy!r} is not a rematerialisation policy: use one of {', '.join(REMAT_POLICIES)}"
        )
    if policy == "none":
        return TransformerBlock
    # Argument 3 (self, x, mask, deterministic) is a Python bool that selects dropout: static, not traced.
    return nn.remat(TransformerBlock, policy=REMAT_POLICIES[policy], static_argnums=(3,))
