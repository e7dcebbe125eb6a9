"""Llama-style decoder-only language model (Touvron et al. 2023; Llama 3, Grattafiori et al. 2024).

Token embedding, `num_layers` pre-norm blocks, a final RMSNorm and an output head that is either
its own bias-free Dense (`lm_head`) or the embedding transposed (`tie_embeddings`, as Llama 3.2 1B).
A block is RMSNorm -> causal self-attention with rotary position embeddings (base `rope_theta`,
the rotate-half layout of Hugging Face's LlamaForCausalLM) and grouped-query attention
(`num_kv_heads` key/value heads shared by `num_heads` query heads), then RMSNorm -> SwiGLU MLP
(down(silu(gate(x)) * up(x))). No biases anywhere. Parameter names follow the layout of the
Hugging Face checkpoint one to one (research/tools/hf/llama.py converts).

`scan_layers=True` runs the blocks under `nn.scan`: one block is compiled whatever the depth, its
parameters stacked on a leading layer axis ("layers"); False gives one subtree per block
("layers_0", ...). `remat` rematerialises every block (research/models/transformer.py's policies).
Compute runs in `dtype`; parameters stay in `param_dtype`; logits are float32.

Legend: B batch, L sequence length, D width, V vocabulary, H query heads, K key/value heads,
Dh head width.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.models import attention, kernels, shard_batch
from research.models.transformer import REMAT_POLICIES, flat_dot_general

Dtype = Any
INIT_STD = 0.02

# Published shapes (each model's config.json on the Hugging Face hub) and parameter counts.
LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0)  # Llama 3's tokenizer and rotary base
SIZES = {
    "llama-3.2-1b": LLAMA3
    | dict(num_layers=16, num_heads=32, num_kv_heads=8, width=2048, mlp_dim=8192, head_dim=64, tie_embeddings=True),
    "llama2-7b": dict(vocab_size=32000, num_layers=32, num_heads=32, num_kv_heads=32, width=4096, mlp_dim=11008),
    "llama3-8b": LLAMA3 | dict(num_layers=32, num_heads=32, num_kv_heads=8, width=4096, mlp_dim=14336),
    "llama2-70b": dict(vocab_size=32000, num_layers=80, num_heads=64, num_kv_heads=8, width=8192, mlp_dim=28672),
}
PUBLISHED_PARAMETERS = {  # of each released checkpoint, as transformers' num_parameters() counts them
    "llama-3.2-1b": 1_235_814_400,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama2-70b": 68_976_648_192,
}


def rotary_angles(
    positions_L: jax.Array, head_dim: int, theta: float, scaling: tuple = ()
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each L x Dh, of the rotary embedding at these positions (the two halves of Dh repeat).

    `scaling` (factor, low_frequency_factor, high_frequency_factor, original_context) is Llama 3.1's
    context extension: wavelengths longer than original_context / low_frequency_factor are slowed by
    `factor`, shorter than original_context / high_frequency_factor kept, and those between blended."""
    inverse_frequencies = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    if scaling:
        factor, low, high, context = scaling
        wavelengths = 2 * jnp.pi / inverse_frequencies
        blend = (context / wavelengths - low) / (high - low)
        blended = (1 - blend) * inverse_frequencies / factor + blend * inverse_frequencies
        inverse_frequencies = jnp.where(
            wavelengths > context / low,
            inverse_frequencies / factor,
            jnp.where(wavelengths < context / high, inverse_frequencies, blended),
        )
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
    rope_scaling: tuple = ()  # () or Llama 3.1's (factor, low_frequency_factor, high_frequency_factor, context)
    norm_epsilon: float = 1e-5
    attention_window: int = 0  # >0: each position attends to at most this many (itself included)
    attention: str = "auto"  # research/models/kernels.py: auto, xla, cudnn or splash
    output_init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x_BxLxD: jax.Array, positions_L: jax.Array, segment_ids_BxL: jax.Array | None, cache: dict | None = None
    ) -> tuple[jax.Array, dict | None]:
        x_BxLxD = shard_batch(x_BxLxD)  # the residual stream stays split by batch, whatever the weights' layout
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
        cos, sin = rotary_angles(positions_L, self.head_dim, self.rope_theta, self.rope_scaling)
        query_BxLxHxDh, key_BxLxKxDh = apply_rotary(query_BxLxHxDh, cos, sin), apply_rotary(key_BxLxKxDh, cos, sin)
        # Query head h reads key/value head h // (H / K), as Hugging Face's repeat_kv.
        if cache is None:
            masking = (segment_ids_BxL, self.attention_window)  # attention maps, only when asked for (explain_text)
            attention.record_weights(self, lambda: kernels.weights(query_BxLxHxDh, key_BxLxKxDh, *masking))
            attended_BxLxHxDh = kernels.attend(
                query_BxLxHxDh,
                key_BxLxKxDh,
                value_BxLxKxDh,
                implementation=self.attention,
                segment_ids_BxL=segment_ids_BxL,
                window=self.attention_window,
            )
        else:
            cache, attended_BxLxHxDh = _attend_cached(cache, positions_L, query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh)
        attended = attended_BxLxHxDh.reshape(batch, length, self.num_heads * self.head_dim)
        x_BxLxD = x_BxLxD + nn.Dense(width, kernel_init=output_init, name="o_proj", **dense)(attended)

        h_BxLxD = nn.RMSNorm(name="post_attention_layernorm", **norm)(x_BxLxD)
        gate = nn.Dense(self.mlp_dim, kernel_init=init, name="gate_proj", **dense)(h_BxLxD)
        up = nn.Dense(self.mlp_dim, kernel_init=init, name="up_proj", **dense)(h_BxLxD)
        down = nn.Dense(width, kernel_init=output_init, name="down_proj", **dense)(nn.silu(gate) * up)
        return x_BxLxD + down, cache


def _attend_cached(cache: dict, positions_1: jax.Array, query_Bx1xHxDh, key_Bx1xKxDh, value_Bx1xKxDh):
    """(updated cache, attention output) of one new position t against a rolling cache of S slots.

    Position t is written to slot t % S, over the position t - S it replaces. The keys were rotated at
    their own positions and rotary scores depend only on the distance between query and key, so the
    slots need no reordering and no re-prefill when the window moves: a slot counts once it is written."""
    slots = cache["key"].shape[1]
    if query_Bx1xHxDh.shape[1] != 1:
        raise ValueError(f"decoding takes one position per call, got {query_Bx1xHxDh.shape[1]}")
    position = positions_1[0]
    slot = position % slots
    new = {"key": key_Bx1xKxDh, "value": value_Bx1xKxDh}
    cache = {  # B x S x K x Dh each
        name: jax.lax.dynamic_update_slice_in_dim(cache[name], new[name].astype(cache[name].dtype), slot, 1)
        for name in new
    }
    written_1x1x1xS = (jnp.arange(slots) <= position)[None, None, None, :]
    key, value = (cache[name].astype(query_Bx1xHxDh.dtype) for name in new)
    return cache, jax.nn.dot_product_attention(query_Bx1xHxDh, key, value, mask=written_1x1x1xS)


class Llama(nn.Module):
    """tokens_BxL -> logits_BxLxV (float32). `num_kv_heads` divides `num_heads`; head width is width / num_heads
    unless `head_dim` is set. `block_size` is the context trained on and the size of the generation cache."""

    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    width: int
    mlp_dim: int
    head_dim: int = 0  # 0: width // num_heads
    block_size: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # () or (factor, low_frequency_factor, high_frequency_factor, context): rotary_angles
    norm_epsilon: float = 1e-5
    attention_window: int = 0  # >0: sliding-window attention over this many positions (as Mistral); 0: all
    attention: str = "auto"  # the attention kernel (research/models/kernels.py): auto, xla, cudnn or splash
    tie_embeddings: bool = False
    scan_layers: bool = False
    remat: str = "none"
    loss_chunk: int = 0  # read by a chunked training loss (metrics.chunked_next_token_loss), not by __call__
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens_BxL: jax.Array,
        *,
        positions_L: jax.Array | None = None,
        segment_ids_BxL: jax.Array | None = None,
        cache: dict | None = None,
        return_hidden: bool = False,
    ):
        """logits_BxLxV; with `cache` (decoding one position) (logits, cache); with `return_hidden` the
        normalised features_BxLxD the head would read (for a chunked loss, `head_kernel`). `segment_ids_BxL`
        (documents packed into one window) keeps attention within each document."""
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_kv_heads {self.num_kv_heads} does not divide model.num_heads {self.num_heads}: "
                "each key/value head serves a whole group of query heads"
            )
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat {self.remat!r} is not a policy: use one of {', '.join(REMAT_POLICIES)}")
        embed = nn.Embed(
            self.vocab_size,
            self.width,
            embedding_init=nn.initializers.normal(INIT_STD),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="embed_tokens",
        )
        x_BxLxD = embed(tokens_BxL)
        positions_L = jnp.arange(tokens_BxL.shape[1]) if positions_L is None else positions_L
        block = LlamaBlock
        if REMAT_POLICIES[self.remat] is not None and cache is None:  # generation takes no gradients
            block = nn.remat(LlamaBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        options = dict(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim or self.width // self.num_heads,
            mlp_dim=self.mlp_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            norm_epsilon=self.norm_epsilon,
            attention_window=self.attention_window,
            attention=self.attention,
            output_init_std=INIT_STD / (2 * self.num_layers) ** 0.5,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        if self.scan_layers:  # the cache, like the parameters, has a leading layer axis
            stack = nn.scan(
                block,
                variable_axes={"params": 0, attention.ATTENTION_COLLECTION: 0},  # sown attention maps: per layer
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=self.num_layers,
            )
            x_BxLxD, cache = stack(name="layers", **options)(x_BxLxD, positions_L, segment_ids_BxL, cache)
        else:
            caches = []
            for index in range(self.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda leaf: leaf[index], cache)
                x_BxLxD, layer_cache = block(name=f"layers_{index}", **options)(
                    x_BxLxD, positions_L, segment_ids_BxL, layer_cache
                )
                caches.append(layer_cache)
            cache = None if cache is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)
        x_BxLxD = nn.RMSNorm(epsilon=self.norm_epsilon, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(
            x_BxLxD
        )
        if return_hidden:
            return x_BxLxD
        if self.tie_embeddings:
            logits_BxLxV = embed.attend(x_BxLxD)
        else:
            logits_BxLxV = nn.Dense(
                self.vocab_size,
                use_bias=False,
                kernel_init=nn.initializers.normal(INIT_STD),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                dot_general=flat_dot_general,
                name="lm_head",
            )(x_BxLxD)
        logits_BxLxV = logits_BxLxV.astype(jnp.float32)
        return logits_BxLxV if cache is None else (logits_BxLxV, cache)

    @nn.nowrap
    def head_kernel(self, params: dict) -> jax.Array:
        """The output head as a D x V matrix: lm_head's kernel, or the embedding transposed when tied."""
        return params["embed_tokens"]["embedding"].T if self.tie_embeddings else params["lm_head"]["kernel"]

    @nn.nowrap
    def make_decoder(
        self, batch: int, total: int, *, cached: bool = True, keep: int | None = None
    ) -> tuple[Callable, Callable]:
        """(init_state(params), step(params, state, buffer_BxT, t) -> (logits_BxV, state)) for generate.py.

        Cached: a rolling cache of S = min(total, block_size) positions per layer (attention_window when
        set), num_kv_heads wide, so a generation of any length costs one position per step and
        never re-prefills. Each layer attends to the last S positions, so past S tokens this is
        sliding-window attention (a deeper layer sees further back through the layers below it, as
        in Mistral). Uncached (the baseline): the same function recomputed from the whole buffer
        each step, sliding-window attention over S. `keep` is the GPT's (its window jumps; this
        one rolls) and is ignored."""
        del keep
        slots = min(total, self.attention_window or self.block_size)
        head_dim = self.head_dim or self.width // self.num_heads
        if not cached:
            return lambda params: None, functools.partial(_full_pass_step, self.clone(attention_window=slots))
        shape = (self.num_layers, batch, slots, self.num_kv_heads, head_dim)

        def init_state(params):
            return {"key": jnp.zeros(shape, self.dtype), "value": jnp.zeros(shape, self.dtype)}

        def step(params, cache, buffer_BxT, t):
            tokens_Bx1 = jax.lax.dynamic_slice_in_dim(buffer_BxT, t, 1, axis=1)
            logits_Bx1xV, cache = self.apply({"params": params}, tokens_Bx1, positions_L=t[None], cache=cache)
            return logits_Bx1xV[:, 0], cache

        return init_state, step


def _full_pass_step(model: Llama, params, state, buffer_BxT, t):
    """Position t's logits from a full pass over the buffer (causal: the tokens after t change nothing)."""
    logits_BxTxV = model.apply({"params": params}, buffer_BxT)
    return jax.lax.dynamic_index_in_dim(logits_BxTxV, t, axis=1, keepdims=False), state
