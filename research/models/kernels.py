"""Causal self-attention by the kernel the chip has: XLA's on any backend, cuDNN's fused (flash) attention on
NVIDIA GPUs, the Pallas splash-attention kernel on TPUs. The fused kernels tile the softmax (Dao et al. 2022,
FlashAttention) so that the L x S scores never reach HBM, and splash skips the masked blocks.

`attend(query, key, value, implementation=...)` with `implementation`:
  "auto"    the platform of the mesh the step is traced under (research/steps.py sets it; a deviceless compile
            for a TPU or GPU target sets that target's), else the default backend: cudnn on a GPU, splash on a
            TPU, xla elsewhere; a shape the fused kernel does not take (research/tools/dry_run.py says
            which ran) falls back to xla;
  "xla"     jax.nn.dot_product_attention's XLA path (the reference the kernels are tested against);
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn"): a GPU only, bfloat16 or float16;
  "splash"  jax.experimental.pallas.ops.tpu.splash_attention, in interpret mode off a TPU (tests/models/
            test_kernels.py checks it against xla that way), under shard_map over the batch and head axes.
Grouped-query attention (K key/value heads, H query heads), document masks (`segment_ids_BxL`: a position
sees only earlier positions of its own document), sliding windows and a score scale of the model's own go to
every implementation; soft-capped scores (Gemma 2) to splash and XLA (jax's cuDNN attention has no soft-cap,
so "auto" does not choose it for them: `cudnn_refusal` and `splash_refusal` say why a kernel is not taken).

Legend: B batch, L length, H query heads, K key/value heads, Dh head width.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from research.errors import ConfigError
from research.models import ring, softcapped
from research.sharding import CONTEXT_AXIS, activation_axes

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "ring")
SPLASH_BLOCK = 128  # splash's query and key blocks; the length must be a multiple
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def platform() -> str:
    """The platform the current trace compiles for: its mesh's devices ("cpu", "gpu", "tpu"), else the default."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


def _mesh_axes() -> tuple[tuple[str, ...], str | None, int, int]:
    """(batch axes, head axis, batch shards, head shards) of the mesh in context that are larger than one."""
    return activation_axes(jax.sharding.get_abstract_mesh())


def splash_refusal(query_BxLxHxDh: jax.Array, key_BxSxKxDh: jax.Array) -> str:
    """Why the splash kernel does not take these shapes under the mesh in context ("" when it does)."""
    batch, length, heads, _ = query_BxLxHxDh.shape
    _, _, batch_shards, head_shards = _mesh_axes()
    reasons = [
        (length % SPLASH_BLOCK, f"length {length:,} (a multiple of {SPLASH_BLOCK})"),
        (key_BxSxKxDh.shape[1] != length, "keys of another length than the queries"),
        (batch % batch_shards, f"batch {batch} over {batch_shards} batch shards"),
        (heads % head_shards or key_BxSxKxDh.shape[2] % head_shards, f"heads over tensor {head_shards}"),
    ]
    return ", ".join(reason for refused, reason in reasons if refused)


def splash_supports(query_BxLxHxDh: jax.Array, key_BxSxKxDh: jax.Array) -> bool:
    """Whether the splash kernel takes these shapes under the mesh in context."""
    return not splash_refusal(query_BxLxHxDh, key_BxSxKxDh)


def cudnn_refusal(query_BxLxHxDh: jax.Array, segment_ids_BxL: jax.Array | None, softcap: float = 0.0) -> str:
    """Why cuDNN's fused attention does not take these ("" when it does): jax's limits (half precision, head width
    <= 128 and a multiple of 8; no document masks and no soft-capping through jax.nn.dot_product_attention)."""
    head_dim = query_BxLxHxDh.shape[-1]
    reasons = [
        (query_BxLxHxDh.dtype not in CUDNN_DTYPES, f"{jnp.dtype(query_BxLxHxDh.dtype).name} compute, not half"),
        (head_dim > 128 or head_dim % 8, f"head width {head_dim} (<= 128, a multiple of 8)"),
        (segment_ids_BxL is not None, "document masks"),
        (bool(softcap), f"scores soft-capped at {softcap:g}"),
    ]
    return ", ".join(reason for refused, reason in reasons if refused)


def cudnn_supports(query_BxLxHxDh: jax.Array, segment_ids_BxL: jax.Array | None, softcap: float = 0.0) -> bool:
    """Whether cuDNN's fused attention takes these (`cudnn_refusal` says why not)."""
    return not cudnn_refusal(query_BxLxHxDh, segment_ids_BxL, softcap)


def choose(
    implementation: str,
    query_BxLxHxDh: jax.Array,
    key_BxSxKxDh: jax.Array,
    segment_ids_BxL: jax.Array | None,
    softcap: float = 0.0,
) -> str:
    """The implementation `attend` runs: `implementation` itself, or for "auto" the platform's fused kernel."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"model.attention {implementation!r}: use one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    if ring.shards() > 1:  # the sequences split over `context`: passed around a ring, else gathered for XLA's
        return "ring" if query_BxLxHxDh.shape[1] % (2 * ring.shards()) == 0 else "xla"
    if platform() == "gpu" and cudnn_supports(query_BxLxHxDh, segment_ids_BxL, softcap):
        return "cudnn"
    if platform() == "tpu" and splash_supports(query_BxLxHxDh, key_BxSxKxDh):
        return "splash"
    return "xla"


def attend(
    query_BxLxHxDh: jax.Array,
    key_BxSxKxDh: jax.Array,
    value_BxSxKxDh: jax.Array,
    *,
    implementation: str = "auto",
    segment_ids_BxL: jax.Array | None = None,
    window: int = 0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """Causal attention (each query head h reads key/value head h // (H / K)); `window` > 0 limits each
    position to the last `window` positions, itself included; scores are scaled by `scale` (None: 1/sqrt(Dh))
    and soft-capped at `softcap` (> 0: cap * tanh(score / cap), Gemma 2). Returns B x L x H x Dh."""
    chosen = choose(implementation, query_BxLxHxDh, key_BxSxKxDh, segment_ids_BxL, softcap)
    length, head_dim = query_BxLxHxDh.shape[1], query_BxLxHxDh.shape[3]
    scale = head_dim**-0.5 if scale is None else scale
    local_window = (window - 1, 0) if 0 < window < length else None
    masks = dict(window=window if 0 < window < length else 0, scale=scale, softcap=softcap)
    if chosen == "ring":
        if length % (2 * ring.shards()):
            raise ConfigError(f"model.attention 'ring': length {length} must be a multiple of 2 x mesh.context")
        return ring.attend(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, segment_ids_BxL, **masks)
    if chosen == "splash":
        return _splash(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, segment_ids_BxL, local_window, scale, softcap)
    if chosen == "cudnn":
        if platform() != "gpu" or not cudnn_supports(query_BxLxHxDh, segment_ids_BxL, softcap):
            raise ConfigError(
                "model.attention 'cudnn' needs an NVIDIA GPU, bfloat16 or float16 compute (model.dtype), a head width "
                "<= 128, no document masks and no soft-capping: use auto"
            )
        return jax.nn.dot_product_attention(
            *_same_layout(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh),
            scale=scale,
            is_causal=True,
            local_window_size=local_window,
            implementation="cudnn",
        )
    if ring.shards() > 1:
        query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh = _gathered(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh)
    if softcap:  # jax.nn.dot_product_attention has no soft-cap
        allowed = _allowed(length, window, segment_ids_BxL)
        return plain_attention(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, allowed, scale=scale, softcap=softcap)
    return jax.nn.dot_product_attention(
        query_BxLxHxDh,
        key_BxSxKxDh,
        value_BxSxKxDh,
        mask=_same_document(segment_ids_BxL),
        scale=scale,
        is_causal=True,
        local_window_size=local_window,
        implementation="xla",
    )


def _allowed(length: int, window, segment_ids_BxL: jax.Array | None) -> jax.Array:
    """L x L (B x 1 x L x L with documents): True where query i may see key j: j <= i, i - j < window when window
    > 0 (window may be traced), and the same document."""
    distance_LxL = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
    causal_LxL = (distance_LxL >= 0) & ((window == 0) | (distance_LxL < window))
    same = _same_document(segment_ids_BxL)
    return causal_LxL if same is None else same & causal_LxL


def _scores(query_BxLxHxDh, key_BxSxKxDh, allowed, scale: float, softcap: float) -> jax.Array:
    """B x K x G x L x S float32 attention weights of the G = H / K query heads sharing each key/value head;
    `allowed` broadcasts to B x 1 x L x S (or L x S)."""
    batch, length, heads, head_dim = query_BxLxHxDh.shape
    kv_heads = key_BxSxKxDh.shape[2]
    query_BxLxKxGxDh = query_BxLxHxDh.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum(
        "blkgd,bskd->bkgls", query_BxLxKxGxDh, key_BxSxKxDh, preferred_element_type=jnp.float32
    ) * jnp.float32(scale)
    scores = softcapped(scores, softcap)
    allowed = jnp.asarray(allowed)
    allowed_Bx1x1xLxS = allowed[:, :, None] if allowed.ndim == 4 else allowed  # B x 1 x L x S -> B x 1 x 1 x L x S
    return jax.nn.softmax(jnp.where(allowed_Bx1x1xLxS, scores, jnp.finfo(jnp.float32).min), axis=-1)


def plain_attention(
    query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, allowed, *, scale: float, softcap: float = 0.0
) -> jax.Array:
    """Attention written out in XLA with an explicit mask (`allowed`: True where a query sees a key, L x S or
    B x 1 x L x S): the soft-capped path and one-position decoding. Returns B x L x H x Dh."""
    batch, length, heads, head_dim = query_BxLxHxDh.shape
    weights = _scores(query_BxLxHxDh, key_BxSxKxDh, allowed, scale, softcap)
    out = jnp.einsum("bkgls,bskd->blkgd", weights.astype(value_BxSxKxDh.dtype), value_BxSxKxDh)
    return out.reshape(batch, length, heads, head_dim)


def _same_document(segment_ids_BxL: jax.Array | None) -> jax.Array | None:
    """B x 1 x L x S: True where query and key are in the same packed document (None: one document)."""
    if segment_ids_BxL is None:
        return None
    return segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]


def weights(
    query_BxLxHxDh: jax.Array,
    key_BxSxKxDh: jax.Array,
    segment_ids_BxL: jax.Array | None = None,
    window=0,
    scale: float | None = None,
    softcap: float = 0.0,
) -> jax.Array:
    """The weights `attend` gives each key (B x H x L x S, float32), for attention maps."""
    batch, length, heads, head_dim = query_BxLxHxDh.shape
    allowed = _allowed(length, window, segment_ids_BxL)
    scale = head_dim**-0.5 if scale is None else scale
    return _scores(query_BxLxHxDh, key_BxSxKxDh, allowed, scale, softcap).reshape(batch, heads, length, length)


def _same_layout(*arrays: jax.Array) -> list[jax.Array]:
    """The arrays split alike (cuDNN's partitioner requires it): batch over the batch axes, heads over `tensor`
    when it divides every array's heads (a single key/value head stays whole, and then the query's too)."""
    batch_axes, head_axis, batch_shards, head_shards = _mesh_axes()
    if not batch_axes and head_axis is None:
        return list(arrays)
    heads = head_axis if all(x.shape[2] % head_shards == 0 for x in arrays) else None
    batch = batch_axes if batch_axes and arrays[0].shape[0] % batch_shards == 0 else None
    return [jax.lax.with_sharding_constraint(x, P(batch, None, heads, None)) for x in arrays]


def ring_order(implementation: str, length: int) -> np.ndarray | None:
    """The order in which ring attention holds a sequence (ring.balanced_order) when `attend` runs it on
    sequences of `length` under the mesh in context, else None: a model reorders its tokens so first."""
    query = jax.ShapeDtypeStruct((1, length, 1, 1), jnp.float32)
    if choose(implementation, query, query, None) != "ring":
        return None
    return ring.balanced_order(length, ring.shards())


def _gathered(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh) -> list[jax.Array]:
    """Context parallelism by gathering (as Levanter does): each device keeps its positions' queries and gathers
    every position's keys and values, so that its scores are its L / C rows of the whole L x S; the causal and
    document masks are the unsplit ones, on global positions. Costs S x K x Dh keys and values per device."""
    batch_axes, head_axis, batch_shards, head_shards = _mesh_axes()
    batch = batch_axes if batch_axes and query_BxLxHxDh.shape[0] % batch_shards == 0 else None
    heads = head_axis if all(x.shape[2] % head_shards == 0 for x in (query_BxLxHxDh, key_BxSxKxDh)) else None
    context = CONTEXT_AXIS if query_BxLxHxDh.shape[1] % ring.shards() == 0 else None
    query = jax.lax.with_sharding_constraint(query_BxLxHxDh, P(batch, context, heads, None))
    return [query] + [
        jax.lax.with_sharding_constraint(x, P(batch, None, heads, None)) for x in (key_BxSxKxDh, value_BxSxKxDh)
    ]


def _splash(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, segment_ids_BxL, local_window, scale, softcap) -> jax.Array:
    """The splash kernel on each device's share of the batch and heads (shard_map over the mesh in context)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # Pallas loads only where used

    if not splash_supports(query_BxLxHxDh, key_BxSxKxDh):
        raise ConfigError(
            f"model.attention 'splash' needs a length that is a multiple of {SPLASH_BLOCK} and head counts the "
            "tensor axis divides: use auto"
        )
    batch, length, heads, head_dim = query_BxLxHxDh.shape
    batch_axes, head_axis, _, head_shards = _mesh_axes()
    shape = (length, length)
    mask = splash.CausalMask(shape) if local_window is None else splash.LocalMask(shape, local_window, offset=0)
    kernel = splash.make_splash_mha(
        splash.MultiHeadMask([mask] * (heads // head_shards)),
        head_shards=1,
        q_seq_shards=1,
        block_sizes=_block_sizes(splash),
        attn_logits_soft_cap=softcap or None,
        interpret=platform() != "tpu",
    )

    def local(query, key, value, segment_ids):
        # The kernel takes one example's heads-major H x L x Dh and applies no scale itself.
        query, key, value = (x.transpose(0, 2, 1, 3) for x in (query * scale, key, value))
        segments = None if segment_ids is None else splash.SegmentIds(q=segment_ids, kv=segment_ids)
        output = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))(query, key, value, segments)
        return output.transpose(0, 2, 1, 3)

    if segment_ids_BxL is not None:
        segment_ids_BxL = segment_ids_BxL.astype(jnp.int32)
    if not batch_axes and head_axis is None:
        return local(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, segment_ids_BxL)
    heads_spec = P(batch_axes or None, None, head_axis, None)
    segments_spec = None if segment_ids_BxL is None else P(batch_axes or None, None)
    return jax.shard_map(
        local,
        in_specs=(heads_spec, heads_spec, heads_spec, segments_spec),
        out_specs=heads_spec,
        check_vma=False,
    )(query_BxLxHxDh, key_BxSxKxDh, value_BxSxKxDh, segment_ids_BxL)


@functools.cache
def _block_sizes(splash):
    """Every forward and backward block of SPLASH_BLOCK (the kernel's defaults, stated here once)."""
    names = ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv", "block_kv_dkv_compute")
    return splash.BlockSizes(**{name: SPLASH_BLOCK for name in (*names, "block_q_dq", "block_kv_dq")})


def attend_cached(
    cache: dict, positions_1: jax.Array, query_Bx1xHxDh, key_Bx1xKxDh, value_Bx1xKxDh, *, window, scale, softcap
):
    """(updated cache, attention output) of one new position t against a rolling cache of S slots.

    Position t is written to slot t % S, over the position t - S it replaces. The keys were rotated at
    their own positions and rotary scores depend only on the distance between query and key, so the
    slots need no reordering and no re-prefill when the window moves: a slot counts once it is written
    (and, for a layer with a window shorter than S, while its position is inside the window)."""
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
    held_S = position - (position - jnp.arange(slots)) % slots  # the position each slot holds (< 0: none yet)
    allowed_S = (held_S >= 0) & ((window == 0) | (position - held_S < window))
    key, value = (cache[name].astype(query_Bx1xHxDh.dtype) for name in new)
    allowed_1xS = allowed_S[None, :]
    return cache, plain_attention(query_Bx1xHxDh, key, value, allowed_1xS, scale=scale, softcap=softcap)
