"""Llama-style decoder-only language model (Touvron et al. 2023; Llama 3, Grattafiori et al. 2024).

Token embedding, `num_layers` pre-norm blocks, a final RMSNorm and an output head that is either
its own bias-free Dense (`lm_head`) or the embedding transposed (`tie_embeddings`, as Llama 3.2 1B).
A block is RMSNorm -> causal self-attention with rotary position embeddings (base `rope_theta`,
the rotate-half layout of Hugging Face's LlamaForCausalLM) and grouped-query attention
(`num_kv_heads` key/value heads shared by `num_heads` query heads), then RMSNorm -> SwiGLU MLP
(down(silu(gate(x)) * up(x))). No biases anywhere. Parameter names follow the layout of the
Hugging Face checkpoint one to one (research/tools/hf.py converts).

`scan_layers=True` runs the blocks under `nn.scan`: one block is compiled whatever the depth, its
parameters stacked on a leading layer axis ("layers"); False gives one subtree per block
("layers_0", ...). `remat` rematerialises every block (research/models/transformer.py's policies).
Compute runs in `dtype`; parameters stay in `param_dtype`; logits are float32.

Legend: B batch, L sequence length, D width, V vocabulary, H query heads, K key/value heads,
Dh head width.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.config import ConfigError
from research.models.transformer import REMAT_POLICIES, flat_dot_general

Dtype = Any
INIT_STD = 0.02

# Published shapes (each model's config.json on the Hugging Face hub) and parameter counts.
SIZES = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        width=2048,
        mlp_dim=8192,
        head_dim=64,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    "llama2-7b": dict(vocab_size=32000, num_layers=32, num_heads=32, num_kv_heads=32, width=4096, mlp_dim=11008),
    "llama3-8b": dict(
        vocab_size=128256, num_layers=32, num_heads=32, num_kv_heads=8, width=4096, mlp_dim=14336, rope_theta=500000.0
    ),
    "llama2-70b": dict(vocab_size=32000, num_layers=80, num_heads=64, num_kv_heads=8, width=8192, mlp_dim=28672),
}
PUBLISHED_PARAMETERS = {  # of each released checkpoint, as transformers' num_parameters() counts them
    "llama-3.2-1b": 1_235_814_400,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama2-70b": 68_976_648_192,
}


def rotary_angles(positions_L: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each L x Dh, of the rotary embedding at these positions (the two halves of Dh repeat)."""
    inverse_frequencies = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_LxHalf = positions_L.astype(jnp.float32)[:, None] * inverse_frequencies[None, :]
    angles_LxDh = jnp.concatenate([angles_LxHalf, angles_LxHalf], axis=-1)
    return jnp.cos(angles_LxDh), jnp.sin(angles_LxDh)


def apply_rotary(x_BxLxNxDh: jax.Array, cos_LxDh: jax.Array, sin_LxDh: jax.Array) -> jax.Array:
    """Rotates each pair (i, i + Dh/2) of every head by its position's angle, in float32."""
    x = x_BxLxNxDh.astype(jnp.float32)
    first, second = jnp.split(x, 2, axis=-1)
    rotated_half = jnp.concatenate([-second, first], axis=-1)
    out = x * cos_LxDh[None, :, None, :] + rotated_half * sin_LxDh[None, :, None, :]
    return out.astype(x_BxLxNxDh.dtype)


class LlamaBlock(nn.Module):
    """One pre-norm block: x + attention(norm(x)), then + mlp(norm(.)). Returns (output, None) for nn.scan."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-5
    output_init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, positions_L: jax.Array) -> tuple[jax.Array, None]:
        batch, length, width = x_BxLxD.shape
        dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, dot_general=flat_dot_general)
        init, output_init = nn.initializers.normal(INIT_STD), nn.initializers.normal(self.output_init_std)
        norm = dict(epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)

        h_BxLxD = nn.RMSNorm(name="input_layernorm", **norm)(x_BxLxD)
        query = nn.Dense(self.num_heads * self.head_dim, kernel_init=init, name="q_proj", **dense)(h_BxLxD)
        key = nn.Dense(self.num_kv_heads * self.head_dim, kernel_init=init, name="k_proj", **dense)(h_BxLxD)
        value = nn.Dense(self.num_kv_heads * self.head_dim, kernel_init=init, name="v_proj", **dense)(h_BxLxD)
        query_BxLxHxDh = query.reshape(batch, length, self.num_heads, self.head_dim)
        key_BxLxKxDh = key.reshape(batch, length, self.num_kv_heads, self.head_dim)
        value_BxLxKxDh = value.reshape(batch, length, self.num_kv_heads, self.head_dim)
        cos, sin = rotary_angles(positions_L, self.head_dim, self.rope_theta)
        query_BxLxHxDh, key_BxLxKxDh = apply_rotary(query_BxLxHxDh, cos, sin), apply_rotary(key_BxLxKxDh, cos, sin)
        # Query head h reads key/value head h // (H / K), as Hugging Face's repeat_kv.
        attended_BxLxHxDh = jax.nn.dot_product_attention(query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh, is_causal=True)
        attended = attended_BxLxHxDh.reshape(batch, length, self.num_heads * self.head_dim)
        x_BxLxD = x_BxLxD + nn.Dense(width, kernel_init=output_init, name="o_proj", **dense)(attended)

        h_BxLxD = nn.RMSNorm(name="post_attention_layernorm", **norm)(x_BxLxD)
        gate = nn.Dense(self.mlp_dim, kernel_init=init, name="gate_proj", **dense)(h_BxLxD)
        up = nn.Dense(self.mlp_dim, kernel_init=init, name="up_proj", **dense)(h_BxLxD)
        down = nn.Dense(width, kernel_init=output_init, name="down_proj", **dense)(nn.silu(gate) * up)
        return x_BxLxD + down, None


class Llama(nn.Module):
    """tokens_BxL -> logits_BxLxV (float32). `num_kv_heads` divides `num_heads`; head width is width / num_heads
    unless `head_dim` is set."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    width: int
    mlp_dim: int
    head_dim: int = 0  # 0: width // num_heads
    rope_theta: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat: str = "none"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads {self.num_kv_heads} does not divide model.num_heads {self.num_heads}: "
                "each key/value head serves a whole group of query heads"
            )
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(INIT_STD),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embed_tokens",
        )
        x_BxLxD = embed(tokens_BxL)
        positions_L = jnp.arange(tokens_BxL.shape[1])
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat {self.remat!r} is not a policy: use one of {', '.join(REMAT_POLICIES)}")
        block = LlamaBlock
        if REMAT_POLICIES[self.remat] is not None:
            block = nn.remat(LlamaBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        options = dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim or self.width // self.num_heads,
            mlp_dim=self.mlp_dim,
            rope_theta=self.rope_theta,
            norm_epsilon=self.norm_epsilon,
            output_init_std=INIT_STD / (2 * self.num_layers) ** 0.5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=self.num_layers,
            )
            x_BxLxD, _ = stack(name="layers", **options)(x_BxLxD, positions_L)
        else:
            for index in range(self.num_layers):
                x_BxLxD, _ = block(name=f"layers_{index}", **options)(x_BxLxD, positions_L)
        x_BxLxD = nn.RMSNorm(epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(
            x_BxLxD
        )
        if self.tie_embeddings:
            return embed.attend(x_BxLxD).astype(jnp.float32)
        head = nn.Dense(
            self.vocab_size,
            use_bias=False,
            kernel_init=nn.initializers.normal(INIT_STD),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            dot_general=flat_dot_general,
            name="lm_head",
        )
        return head(x_BxLxD).astype(jnp.float32)
