"""The decoder family: Llama (Touvron et al. 2023; Llama 3, Grattafiori et al. 2024) and the models that
differ from it by settings, not by structure: Qwen2/2.5 (q/k/v biases), Qwen3 (QK-norm, a head width of its
own), Mistral (sliding-window attention) and Gemma 1-3 (Gemma Team 2024, 2024b, 2025: GeGLU, RMSNorm with
(1 + w), embeddings scaled by sqrt(width), norms after each sub-block too, soft-capped attention and final logits,
local and global layers with rotary bases and query scales of their own); Mixtral and Qwen3-MoE replace each MLP
by a mixture of experts (research/models/moe.py).

Token embedding, `num_layers` pre-norm blocks, a final RMSNorm and an output head that is either its own
bias-free Dense (`lm_head`) or the embedding transposed (`tie_embeddings`). A block is RMSNorm -> causal
self-attention with rotary position embeddings (the rotate-half layout of Hugging Face's models) and
grouped-query attention (`num_kv_heads` key/value heads shared by `num_heads` query heads), then
RMSNorm -> gated MLP (down(act(gate(x)) * up(x)), act silu or tanh-approximated gelu). Layer i attends to
the last `attention_window` positions (0: all) unless `global_every` makes every N-th layer global; each
kind of layer has its rotary base (`rope_local_theta`). Parameter names follow the Hugging Face checkpoint
of each family one to one (research/tools/hf/ converts).

`scan_layers=True` runs the blocks under `nn.scan`: one block is compiled whatever the depth, its
parameters stacked on a leading layer axis ("layers"), and layers of different kinds branch on their
kind inside it (lax.switch); False gives one subtree per block ("layers_0", ...). Under a `stage` mesh axis
the stacked layers run as a pipeline (research/models/pipeline.py, `pipeline_*`). `remat` rematerialises
every block (research/models/transformer.py's policies). Compute runs in `dtype`; parameters stay in
`param_dtype`; norms and logits are float32.

Legend: B batch, L sequence length, D width, V vocabulary, H query heads, K key/value heads, Dh head width, S slots.
"""

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from research.errors import ConfigError
from research.models import attention, kernels, moe, pipeline, ring, shard_batch, softcapped
from research.models.rotary import apply_rotary, rotary_angles
from research.models.transformer import REMAT_POLICIES, flat_dot_general

Dtype = Any
INIT_STD = 0.02
# The fields a checkpoint fixes (the rest are how a run computes: context, kernels, scan, remat, dtypes).
ARCHITECTURE = ("vocab_size", "num_layers", "num_heads", "num_kv_heads", "width", "mlp_dim", "head_dim", "rope_theta")
ARCHITECTURE += ("rope_scaling", "rope_local_theta", "norm_epsilon", "norm_offset", "attention_window", "global_every")
ARCHITECTURE += ("attention_bias", "qk_norm", "post_norms", "activation", "scale_embeddings", "query_scale_dim")
ARCHITECTURE += ("attention_softcap", "logit_softcap", "tie_embeddings")
ARCHITECTURE += ("num_experts", "experts_per_token", "normalize_top_k", "shared_mlp_dim")
MOE_RUN = ("moe_dispatch", "moe_capacity_factor", "moe_aux_weight", "moe_z_weight")  # how experts run and train
PIPELINE_RUN = ("pipeline_microbatches", "pipeline_repeats", "pipeline_remat", "pipeline_gather")  # `stage` axis
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": functools.partial(nn.gelu, approximate=True)}


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What distinguishes a local layer from a global one: its attention window and its rotary embedding."""

    window: int = 0  # >0: each position attends to at most this many (itself included); 0: to all before it
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()  # rotary_angles' scaling


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + scale) in float32, returned in `dtype` (Zhang & Sennrich 2019). Gemma stores its
    scale as w with the norm multiplying by (1 + w): offset 1, initialised at 0; Llama's offset is 0."""

    epsilon: float = 1e-6
    offset: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.constant(1.0 - self.offset), (x.shape[-1],), self.param_dtype)
        x = x.astype(jnp.float32)
        normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.epsilon)
        return (normed * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)


class LlamaBlock(nn.Module):
    """One pre-norm block: x + attention(norm(x)), then + mlp(norm(.)); with `post_norms` each sub-block's output
    is normalised too before it is added (Gemma 2/3). Returns (output, cache) for nn.scan."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    kinds: tuple = (LayerKind(),)  # one: this layer's; several: chosen by the kind index (scanned layers)
    norm_epsilon: float = 1e-5
    norm_offset: float = 0.0
    attention_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    activation: str = "silu"
    query_scale_dim: int = 0  # scores are divided by sqrt(this); 0: head_dim
    attention_softcap: float = 0.0
    attention: str = "auto"  # research/models/kernels.py: auto, xla, cudnn or splash
    routing: moe.Routing | None = None  # a mixture of experts, mlp_dim wide each, instead of the one MLP
    output_init_std: float = INIT_STD
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BxLxD: jax.Array,
        positions_L: jax.Array,
        segment_ids_BxL: jax.Array | None,
        cache: dict | None = None,
        kind_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, dict | None]:
        x_BxLxD = shard_batch(x_BxLxD)  # the residual stream stays split by batch, whatever the weights' layout
        batch, length, width = x_BxLxD.shape
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dense = dict(use_bias=False, dot_general=flat_dot_general, **types)
        init, output_init = nn.initializers.normal(INIT_STD), nn.initializers.normal(self.output_init_std)
        norm = functools.partial(RMSNorm, epsilon=self.norm_epsilon, offset=self.norm_offset, **types)
        qkv = dense | dict(use_bias=self.attention_bias, kernel_init=init)

        h_BxLxD = norm(name="input_layernorm")(x_BxLxD)
        query = nn.Dense(self.num_heads * self.head_dim, name="q_proj", **qkv)(h_BxLxD)
        key = nn.Dense(self.num_kv_heads * self.head_dim, name="k_proj", **qkv)(h_BxLxD)
        value = nn.Dense(self.num_kv_heads * self.head_dim, name="v_proj", **qkv)(h_BxLxD)
        query_BxLxHxDh = query.reshape(batch, length, self.num_heads, self.head_dim)
        key_BxLxKxDh = key.reshape(batch, length, self.num_kv_heads, self.head_dim)
        value_BxLxKxDh = value.reshape(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # each head's query and key normalised over its width (Qwen3, Gemma 3)
            query_BxLxHxDh, key_BxLxKxDh = norm(name="q_norm")(query_BxLxHxDh), norm(name="k_norm")(key_BxLxKxDh)
        cos, sin = self._rotary(positions_L, kind_index)
        query_BxLxHxDh, key_BxLxKxDh = apply_rotary(query_BxLxHxDh, cos, sin), apply_rotary(key_BxLxKxDh, cos, sin)
        window = self._pick([kind.window for kind in self.kinds], kind_index)
        scores = dict(scale=(self.query_scale_dim or self.head_dim) ** -0.5, softcap=self.attention_softcap)
        # Query head h reads key/value head h // (H / K), as Hugging Face's repeat_kv.
        if cache is None:
            masking = dict(segment_ids_BxL=segment_ids_BxL, window=window, **scores)  # attention maps, when asked
            attention.record_weights(self, lambda: kernels.weights(query_BxLxHxDh, key_BxLxKxDh, **masking))
            operands = (query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh)
            attended_BxLxHxDh = self._attend(*operands, segment_ids_BxL, kind_index, **scores)
        else:
            cache, attended_BxLxHxDh = kernels.attend_cached(
                cache, positions_L, query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh, window=window, **scores
            )
        attended = attended_BxLxHxDh.reshape(batch, length, self.num_heads * self.head_dim)
        out_BxLxD = nn.Dense(width, kernel_init=output_init, name="o_proj", **dense)(attended)
        if self.post_norms:
            out_BxLxD = norm(name="post_attention_layernorm")(out_BxLxD)
        x_BxLxD = x_BxLxD + out_BxLxD

        h_BxLxD = norm(name="pre_feedforward_layernorm" if self.post_norms else "post_attention_layernorm")(x_BxLxD)
        if self.routing:  # research/models/moe.py: the same gated MLP per expert, chosen per token
            mixture = dict(activation=ACTIVATIONS[self.activation], output_init_std=self.output_init_std, **types)
            down_BxLxD = moe.MoE(self.routing, self.mlp_dim, name="mlp", **mixture)(h_BxLxD)
        else:
            gate = nn.Dense(self.mlp_dim, kernel_init=init, name="gate_proj", **dense)(h_BxLxD)
            up = nn.Dense(self.mlp_dim, kernel_init=init, name="up_proj", **dense)(h_BxLxD)
            hidden = ACTIVATIONS[self.activation](gate) * up
            down_BxLxD = nn.Dense(width, kernel_init=output_init, name="down_proj", **dense)(hidden)
        if self.post_norms:
            down_BxLxD = norm(name="post_feedforward_layernorm")(down_BxLxD)
        return x_BxLxD + down_BxLxD, cache

    def _pick(self, values: list, kind_index):
        """This layer's value among one per kind: static with one kind, indexed by the traced kind otherwise."""
        return values[0] if len(values) == 1 else jnp.asarray(values)[kind_index]

    def _rotary(self, positions_L: jax.Array, kind_index) -> tuple[jax.Array, jax.Array]:
        angles = [rotary_angles(positions_L, self.head_dim, kind.rope_theta, kind.rope_scaling) for kind in self.kinds]
        if len(angles) == 1:
            return angles[0]
        return jnp.stack([cos for cos, _ in angles])[kind_index], jnp.stack([sin for _, sin in angles])[kind_index]

    def _attend(self, query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh, segment_ids_BxL, kind_index, **scores) -> jax.Array:
        """Each kind's window is static in its kernel; scanned layers of several kinds branch on their kind."""

        def attend(window, query, key, value):
            options = dict(implementation=self.attention, segment_ids_BxL=segment_ids_BxL, window=window, **scores)
            return kernels.attend(query, key, value, **options)

        operands = (query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh)
        if len(self.kinds) == 1:
            return attend(self.kinds[0].window, *operands)
        return jax.lax.switch(kind_index, [functools.partial(attend, kind.window) for kind in self.kinds], *operands)


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
    rope_scaling: tuple = ()  # (), (factor,) linear or (factor, low, high frequency factors, context): rotary_angles
    rope_local_theta: float = 0.0  # the local layers' rotary base (Gemma 3), without scaling; 0: rope_theta's
    norm_epsilon: float = 1e-5
    norm_offset: float = 0.0  # 1: norms multiply by (1 + scale) (Gemma)
    attention_window: int = 0  # >0: sliding-window attention over this many positions (Mistral, Gemma 2/3); 0: all
    global_every: int = 0  # >0 (with a window): layers N-1, 2N-1, ... attend to all positions (Gemma 2: 2, 3: 6)
    attention_bias: bool = False  # q, k and v projections with biases (Qwen2)
    qk_norm: bool = False  # RMSNorm on each head's query and key (Qwen3, Gemma 3)
    post_norms: bool = False  # each sub-block's output normalised before the residual add (Gemma 2/3)
    activation: str = "silu"  # the gated MLP's: silu (SwiGLU) or gelu_tanh (GeGLU, Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(width) (Gemma)
    query_scale_dim: int = 0  # attention scores divided by sqrt(this); 0: head_dim (Gemma's query_pre_attn_scalar)
    attention_softcap: float = 0.0  # >0: scores -> cap * tanh(scores / cap) (Gemma 2: 50)
    logit_softcap: float = 0.0  # >0: the same on the output logits (Gemma 2: 30)
    attention: str = "auto"  # the attention kernel (research/models/kernels.py): auto, xla, cudnn or splash
    global_window: int = 0  # >0: the global layers' window too (the uncached decoder's, as its cache's size)
    num_experts: int = 0  # >0: each MLP is a mixture of experts, mlp_dim wide each (Mixtral, Qwen3-MoE: moe.py)
    experts_per_token: int = 2  # the experts each token goes to (top-k)
    normalize_top_k: bool = True  # their router weights renormalised to sum to 1
    shared_mlp_dim: int = 0  # >0: a gated MLP of this width every token passes through besides its experts
    moe_dispatch: str = "dropless"  # grouped matmuls, or "capacity": fixed slots per expert, the overflow dropped
    moe_capacity_factor: float = 1.25  # the capacity dispatch's slots per expert, over a fair share
    moe_aux_weight: float = 0.0  # read by the training loss: the load-balancing loss's weight (Mixtral: 0.02)
    moe_z_weight: float = 0.0  # and the router z-loss's (ST-MoE: 0.001)
    tie_embeddings: bool = False
    scan_layers: bool = False
    pipeline_microbatches: int = 0  # under a `stage` mesh axis (research/models/pipeline.py); 0: one per stage
    pipeline_repeats: int = 1  # >1: each stage holds this many blocks of layers (the circular schedule)
    pipeline_remat: bool = False  # keep one input per stage and micro-batch, recomputing the stage's layers
    pipeline_gather: bool = (
        False  # gather a stage's weights over fsdp once a step (by stack_rules), not per micro-batch
    )
    stack_rules: tuple = ()  # the sharding rules (config.param_rules) the stack's parameters are laid out by
    remat: str = "none"
    loss_chunk: int = 0  # read by a chunked training loss (metrics.chunked_next_token_loss), not by __call__
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.nowrap
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """Each layer's kind: global (every position, rope_theta and rope_scaling) or local (the window,
        rope_local_theta unscaled where set)."""
        every = LayerKind(self.global_window, self.rope_theta, tuple(self.rope_scaling))
        if not self.attention_window:
            return (every,) * self.num_layers
        local_rope = (self.rope_local_theta, ()) if self.rope_local_theta else (self.rope_theta, every.rope_scaling)
        local = LayerKind(self.attention_window, *local_rope)
        is_global = [self.global_every and (index + 1) % self.global_every == 0 for index in range(self.num_layers)]
        return tuple(every if each else local for each in is_global)

    @nn.nowrap
    def _block_options(self, kinds: tuple[LayerKind, ...]) -> dict:
        fields = ("num_heads", "num_kv_heads", "mlp_dim", "norm_epsilon", "norm_offset", "attention_bias", "qk_norm")
        fields += ("post_norms", "activation", "query_scale_dim", "attention_softcap", "attention", "dtype")
        routing = ("num_experts", "experts_per_token", "normalize_top_k", "shared_mlp_dim")
        routing = moe.Routing(*(getattr(self, name) for name in routing), self.moe_dispatch, self.moe_capacity_factor)
        return {name: getattr(self, name) for name in (*fields, "param_dtype")} | dict(
            head_dim=self.head_dim or self.width // self.num_heads,
            kinds=kinds,
            routing=routing if self.num_experts else None,
            output_init_std=INIT_STD / (2 * self.num_layers) ** 0.5,
        )

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
        if self.scale_embeddings:  # by sqrt(width) rounded to the compute dtype, as Gemma's checkpoints were trained
            x_BxLxD = x_BxLxD * jnp.asarray(self.width**0.5, x_BxLxD.dtype)
        positions_L = jnp.arange(tokens_BxL.shape[1]) if positions_L is None else positions_L
        order = kernels.ring_order(self.attention, tokens_BxL.shape[1]) if cache is None else None
        if order is not None:  # ring attention's causally balanced chunks: research/models/ring.py
            x_BxLxD, positions_L = ring.balanced(x_BxLxD, ring.shards()), ring.balanced(positions_L, ring.shards(), 0)
            segment_ids_BxL = None if segment_ids_BxL is None else ring.balanced(segment_ids_BxL, ring.shards())
        block = LlamaBlock
        if REMAT_POLICIES[self.remat] is not None and cache is None:  # generation takes no gradients
            block = nn.remat(LlamaBlock, policy=REMAT_POLICIES[self.remat], prevent_cse=not self.scan_layers)
        layer_kinds = self.layer_kinds()
        kinds = tuple(dict.fromkeys(layer_kinds))  # distinct, in order of first use
        if self.scan_layers:  # the cache, like the parameters, has a leading layer axis
            stack = nn.scan(
                block,
                variable_axes={"params": 0, attention.ATTENTION_COLLECTION: 0, moe.COLLECTION: 0},  # sown: per layer
                split_rngs={"params": True, "dropout": True},  # dropout: a LoRA adapter's (research/features)
                in_axes=(nn.broadcast, nn.broadcast, 0, 0),
                length=self.num_layers,
            )
            kind_indices = jnp.asarray([kinds.index(kind) for kind in layer_kinds], jnp.int32)
            if pipeline.stages() > 1 and cache is None and not self.is_initializing():  # over the `stage` axis
                x_BxLxD = self._pipelined(kinds, x_BxLxD, positions_L, segment_ids_BxL, kind_indices)
            else:
                x_BxLxD, cache = stack(name="layers", **self._block_options(kinds))(
                    x_BxLxD, positions_L, segment_ids_BxL, cache, kind_indices
                )
        else:
            if pipeline.stages() > 1 and cache is None:
                raise ConfigError("mesh.stage splits a scanned stack of layers: set model.scan_layers=True")
            caches = []
            for index in range(self.num_layers):
                layer_cache = None if cache is None else jax.tree.map(lambda leaf: leaf[index], cache)
                x_BxLxD, layer_cache = block(
                    name=f"layers_{index}", **self._block_options(layer_kinds[index : index + 1])
                )(x_BxLxD, positions_L, segment_ids_BxL, layer_cache)
                caches.append(layer_cache)
            cache = None if cache is None else jax.tree.map(lambda *leaves: jnp.stack(leaves), *caches)
        x_BxLxD = x_BxLxD if order is None else ring.balanced(x_BxLxD, ring.shards(), inverse=True)  # in order
        x_BxLxD = RMSNorm(self.norm_epsilon, self.norm_offset, self.dtype, self.param_dtype, name="norm")(x_BxLxD)
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
        logits_BxLxV = softcapped(logits_BxLxV.astype(jnp.float32), self.logit_softcap)
        return logits_BxLxV if cache is None else (logits_BxLxV, cache)

    def _pipelined(self, kinds, x_BxLxD, positions_L, segment_ids_BxL, kind_indices) -> jax.Array:
        """The scanned layers' parameters ("layers", L x ...) run as a pipeline over the mesh's stages."""
        if self.num_experts and (self.moe_aux_weight or self.moe_z_weight):
            raise ConfigError("mesh.stage with the routers' losses (model.moe_aux_weight, moe_z_weight) is not built")
        block = LlamaBlock(**self._block_options(kinds), parent=None)

        def layer(params, x_BxLxD, segment_ids_BxL, kind_index):
            return block.apply({"params": params}, x_BxLxD, positions_L, segment_ids_BxL, None, kind_index)[0]

        if REMAT_POLICIES[self.remat] is not None:
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat])
        microbatches = pipeline.microbatch_count(self.pipeline_microbatches, pipeline.stages())
        options = dict(microbatches=microbatches, repeats=self.pipeline_repeats, remat=self.pipeline_remat)
        options |= dict(rules=self.stack_rules, gather=self.pipeline_gather)
        stack = self.variables["params"]["layers"]
        return pipeline.run(layer, stack, kind_indices, x_BxLxD, segment_ids_BxL, **options)

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
        every layer has it), num_kv_heads wide, so a generation of any length costs one position per step and
        never re-prefills. Each layer attends to the last S positions, so past S tokens this is
        sliding-window attention (a deeper layer sees further back through the layers below it, as
        in Mistral). Uncached (the baseline): the same function recomputed from the whole buffer
        each step, sliding-window attention over S. `keep` is the GPT's (its window jumps; this
        one rolls) and is ignored."""
        del keep
        slots = min(total, max(kind.window or self.block_size for kind in self.layer_kinds()))
        head_dim = self.head_dim or self.width // self.num_heads
        if not cached:
            uncached = self.clone(attention_window=min(self.attention_window, slots), global_window=slots)
            return lambda params: None, functools.partial(_full_pass_step, uncached)
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
