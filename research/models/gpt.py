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
The parameter tree is the same in both modes. `make_decoder` gives research/inference/generate.py
the per-position step, with the cache or without it (a full pass over the window, the baseline).
Compute runs in `dtype` (bfloat16 on accelerators); parameters stay in `param_dtype`; logits are float32.
`remat` names a rematerialisation policy for every block (research/models/transformer.py).

Legend: B batch, L sequence length (<= block_size), D width, V vocabulary; in generation T tokens
in the buffer, K keep, H heads, Dh head width.
"""

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.models.transformer import flat_dot_general, remat_block
from research.sharding import stage_shards

INIT_STD = 0.02

# GPT-2's released sizes (Radford et al. 2019): vocabulary 50,257, context 1,024, biases, tied embeddings.
SIZES = {
    "gpt2-124m": dict(num_layers=12, num_heads=12, width=768),
    "gpt2-350m": dict(num_layers=24, num_heads=16, width=1024),
    "gpt2-774m": dict(num_layers=36, num_heads=20, width=1280),
    "gpt2-1.5b": dict(num_layers=48, num_heads=25, width=1600),
}
PUBLISHED_PARAMETERS = {  # of each released checkpoint, as transformers' num_parameters() counts them
    "gpt2-124m": 124_439_808,
    "gpt2-350m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1.5b": 1_557_611_200,
}


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
    loss_chunk: int = 0  # read by a chunked training loss (metrics.chunked_next_token_loss), not by __call__

    @nn.compact
    def __call__(self, tokens_BxL: jax.Array, *, deterministic: bool = True, return_hidden: bool = False) -> jax.Array:
        """logits_BxLxV; with `return_hidden` the final-norm features_BxLxD the head reads (for a chunked loss)."""
        length = tokens_BxL.shape[-1]
        if length > self.block_size:
            raise ValueError(f"sequence length {length} exceeds block_size {self.block_size}")
        if stage_shards(jax.sharding.get_abstract_mesh()) > 1:  # pipelines split a Llama's scanned stack
            raise ConfigError("mesh.stage splits a scanned stack of layers, which the GPT has not: use mesh.stage=1")
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
        if return_hidden:
            return x_BxLxD
        if self.tie_embeddings:  # on (B*L) x D: see transformer.flat_dot_general for why
            logits_BxLxV = token_embedding.attend(x_BxLxD.reshape(-1, self.width)).reshape(
                *x_BxLxD.shape[:-1], self.vocab_size
            )
        else:
            logits_BxLxV = nn.Dense(
                self.vocab_size, use_bias=False, kernel_init=init, name="head", dot_general=flat_dot_general, **types
            )(x_BxLxD)
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

    @nn.nowrap
    def head_kernel(self, params: dict) -> jax.Array:
        """The output head as a D x V matrix: the token embedding transposed when tied, else head's kernel."""
        return params["token_embedding"]["embedding"].T if self.tie_embeddings else params["head"]["kernel"]

    @nn.nowrap
    def make_decoder(
        self, batch: int, total: int, *, cached: bool = True, keep: int | None = None
    ) -> tuple[Callable, Callable]:
        """(init_state(params), step(params, state, buffer_BxT, t) -> (logits_BxV, state)) to generate
        `total` positions. Past block_size the window slides, keeping `keep` tokens of context (None:
        half the block); the uncached step reads exactly the windows the cached one attends to."""
        keep = self.block_size // 2 if keep is None else keep
        if not 1 <= keep < self.block_size:
            raise ValueError(
                f"keep must be between 1 and block_size - 1 = {self.block_size - 1} tokens of context, got {keep}"
            )
        return _cached_decoder(self, batch, total, keep) if cached else _windowed_decoder(self, total, keep)


def window_start(t: jax.Array, block_size: int, keep: int) -> jax.Array:
    """Where the context of position t begins in the buffer: 0 until t reaches block_size, then
    `keep` tokens before the position at which the window last slid, every block_size - keep positions."""
    past = t - block_size
    return jnp.where(past < 0, 0, t - keep - past % (block_size - keep))


def _cached_decoder(model: GPT, batch: int, total: int, keep: int) -> tuple[Callable, Callable]:
    """One position per step from the key/value cache.

    Past block_size the learned position embeddings leave no room to roll the cache: every
    cached key and value was computed at its absolute position, and shifting the window by one
    token changes all of them. So when the cache is full the window slides by block_size - keep
    tokens at once: one full forward pass over the last `keep` tokens refills the cache at
    positions 0..keep-1 (a prefill), and the next block_size - keep tokens are cached steps
    again. keep = block_size - 1 is nanoGPT's slide by one token, at a full pass per token.
    """
    block_size = model.block_size
    decoder = model.clone(decode=True)
    cache_shapes = jax.eval_shape(
        decoder.init, jax.random.PRNGKey(0), jnp.zeros((batch, min(total, block_size)), jnp.int32)
    )["cache"]
    sources = {"cached_key": "projected_key", "cached_value": "projected_value"}  # sown by attention.SelfAttention

    def prefill(params, buffer_BxT, start):
        window_BxK = jax.lax.dynamic_slice_in_dim(buffer_BxT, start, keep, axis=1)
        _, captured = model.apply({"params": params}, window_BxK, mutable=["intermediates"])

        def refill(path, shape):
            names = [entry.key for entry in path]
            if names[-1] not in sources:  # every layer's cache_index and the model's position
                return jnp.full(shape.shape, keep, shape.dtype)
            (projected_BxKxHxDh,) = captured["intermediates"][names[0]][names[1]][sources[names[-1]]]
            return jnp.zeros(shape.shape, shape.dtype).at[:, :keep].set(projected_BxKxHxDh.astype(shape.dtype))

        return jax.tree_util.tree_map_with_path(refill, cache_shapes)

    def step(params, cache, buffer_BxT, t):
        if total > block_size:  # static: only a generation that outgrows the block ever slides
            full = (t >= block_size) & ((t - block_size) % (block_size - keep) == 0)
            cache = jax.lax.cond(full, lambda: prefill(params, buffer_BxT, t - keep), lambda: cache)
        tokens_Bx1 = jax.lax.dynamic_slice_in_dim(buffer_BxT, t, 1, axis=1)
        logits_Bx1xV, mutated = decoder.apply({"params": params, "cache": cache}, tokens_Bx1, mutable=["cache"])
        return logits_Bx1xV[:, 0], mutated["cache"]

    return lambda params: jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), cache_shapes), step


def _windowed_decoder(model: GPT, total: int, keep: int) -> tuple[Callable, Callable]:
    """The baseline: a full forward pass per position over the window the cached path attends to
    (the same `window_start`), so both give the same logits."""
    length = min(total, model.block_size)

    def step(params, state, buffer_BxT, t):
        start = window_start(t, model.block_size, keep)
        padded_BxT = jnp.pad(buffer_BxT, ((0, 0), (0, length)))  # a window never clamps at the buffer's end
        logits_BxLxV = model.apply({"params": params}, jax.lax.dynamic_slice_in_dim(padded_BxT, start, length, axis=1))
        return jax.lax.dynamic_index_in_dim(logits_BxLxV, t - start, axis=1, keepdims=False), state

    return lambda params: None, step
