"""Ring attention (Liu et al. 2023) for context parallelism: each device keeps its positions' queries and passes
its keys and values around the mesh's `context` axis (jax.lax.ppermute), one block per step, adding each block's
scores to an online softmax (Milakov & Gimelshein 2018; Dao et al. 2022), so that no device ever holds more than
two blocks of keys and values or its own rows of the scores. The next block's transfer is issued before this
block's scores, so that XLA overlaps the two.

Causal load balance (`balanced_order`, as in Brandon et al. 2023's striped and Llama 3's zig-zag layouts): the
sequence is cut into 2C chunks and device i holds chunks i and 2C - 1 - i, so that every device has the same
number of visible key blocks. Each device splits its queries and each incoming block into those two halves and
computes a half against a half only when a query there can see a key there (from the positions: causality and
the window), so at every step but the first each device computes two of the four pairs. Document masks
(`segment_ids_BxL`) and soft-capped scores apply inside each pair.

Legend: B batch, L length (this device's positions: L / C), H query heads, K key/value heads, G = H / K,
Dh head width, C context shards.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from research.models import softcapped
from research.sharding import CONTEXT_AXIS, activation_axes, context_shards

NEGATIVE = -1e30  # a masked score: finite, so that a row with nothing visible yet does not turn into NaN


def shards() -> int:
    """The `context` axis of the mesh in context (1 without one)."""
    return context_shards(jax.sharding.get_abstract_mesh())


def balanced_order(length: int, count: int) -> np.ndarray:
    """The positions in the order the devices hold them: chunk i then chunk 2C - 1 - i for device i, of 2C chunks."""
    chunks = np.arange(length).reshape(2 * count, length // (2 * count))
    return np.concatenate([np.concatenate([chunks[index], chunks[2 * count - 1 - index]]) for index in range(count)])


def balanced(x: jax.Array, count: int, axis: int = 1, inverse: bool = False) -> jax.Array:
    """x with its `axis` in balanced_order (or back from it): by reshapes and a reverse of the second half's chunks,
    which the partitioner splits along the context axis, where an index gather would be replicated first."""
    shape, length = x.shape, x.shape[axis]
    chunk = length // (2 * count)
    lead, tail = shape[:axis], shape[axis + 1 :]
    if inverse:  # C x 2 chunks -> 2 x C
        pairs = x.reshape(*lead, count, 2, chunk, *tail)
        first, second = jnp.take(pairs, 0, axis=axis + 1), jnp.take(pairs, 1, axis=axis + 1)
        return jnp.stack([first, jnp.flip(second, axis=axis)], axis=axis).reshape(shape)
    halves = x.reshape(*lead, 2, count, chunk, *tail)
    first, second = jnp.take(halves, 0, axis=axis), jnp.flip(jnp.take(halves, 1, axis=axis), axis=axis)
    return jnp.stack([first, second], axis=axis + 1).reshape(shape)


def _block(query, key, value, query_positions, key_positions, query_segments, key_segments, window, scale, softcap):
    """One pair's unnormalised softmax pieces: (B x K x G x Lq row maxima, row sums, B x Lq x K x G x Dh outputs)."""
    scores = jnp.einsum("blkgd,bskd->bkgls", query, key, preferred_element_type=jnp.float32) * jnp.float32(scale)
    scores = softcapped(scores, softcap)
    distance = query_positions[:, None] - key_positions[None, :]
    visible = (distance >= 0) & ((window == 0) | (distance < window))  # Lq x Lk
    if query_segments is not None:
        visible = visible[None, None, None] & (query_segments[:, :, None] == key_segments[:, None, :])[:, None, None]
    scores = jnp.where(visible, scores, NEGATIVE)
    maximum = scores.max(-1)
    weights = jnp.where(visible, jnp.exp(scores - maximum[..., None]), 0.0)
    out = jnp.einsum("bkgls,bskd->blkgd", weights.astype(value.dtype), value, preferred_element_type=jnp.float32)
    return maximum, weights.sum(-1), out


def _merge(state, piece):
    """The online softmax: two (maximum, sum, output) of the same rows as one."""
    (m1, l1, o1), (m2, l2, o2) = state, piece
    maximum = jnp.maximum(m1, m2)
    c1, c2 = jnp.exp(m1 - maximum), jnp.exp(m2 - maximum)
    rows = lambda c: jnp.moveaxis(c, -1, 1)[..., None]  # B x K x G x L -> B x L x K x G x 1
    return maximum, l1 * c1 + l2 * c2, o1 * rows(c1) + o2 * rows(c2)


def _local(query, key, value, positions, segments, *, count, window, scale, softcap):
    """One device's queries (B x L x H x Dh, in its two halves) against every device's keys, passed around the ring."""
    batch, length, heads, head_dim = query.shape
    kv_heads, half = key.shape[2], length // 2
    query = query.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    halves = lambda x, axis=1: (
        jax.lax.slice_in_dim(x, 0, half, axis=axis),
        jax.lax.slice_in_dim(x, half, None, axis=axis),
    )
    query_halves, query_positions = halves(query), halves(positions, 0)
    query_segments = halves(segments) if segments is not None else (None, None)
    empty = lambda: (
        jnp.full((batch, kv_heads, heads // kv_heads, half), NEGATIVE, jnp.float32),
        jnp.zeros((batch, kv_heads, heads // kv_heads, half), jnp.float32),
        jnp.zeros((batch, half, kv_heads, heads // kv_heads, head_dim), jnp.float32),
    )
    states = [empty(), empty()]
    block = jax.checkpoint(functools.partial(_block, window=window, scale=scale, softcap=softcap))  # recomputed
    ring = [(index, (index + 1) % count) for index in range(count)]
    travelling = (key, value, positions, segments)
    for step in range(count):
        arriving = jax.lax.ppermute(travelling, CONTEXT_AXIS, ring) if step < count - 1 else None  # overlapped
        key_block, value_block, key_positions, key_segments = travelling
        key_halves, value_halves, position_halves = halves(key_block), halves(value_block), halves(key_positions, 0)
        segment_halves = halves(key_segments) if key_segments is not None else (None, None)
        for q in range(2):
            for k in range(2):
                seen = query_positions[q].max() >= position_halves[k].min()  # causal: a query sees a key
                if window:
                    seen &= query_positions[q].min() - position_halves[k].max() < window
                operands = (query_halves[q], key_halves[k], value_halves[k], query_positions[q], position_halves[k])
                operands += (query_segments[q], segment_halves[k])
                states[q] = jax.lax.cond(
                    seen, lambda state, ops: _merge(state, block(*ops)), lambda state, ops: state, states[q], operands
                )
        travelling = arriving
    outputs = [out / jnp.moveaxis(total, -1, 1)[..., None] for _, total, out in states]
    return jnp.concatenate(outputs, axis=1).reshape(batch, length, heads, head_dim).astype(value.dtype)


def attend(query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh, segment_ids_BxL=None, *, window=0, scale, softcap=0.0):
    """Causal attention of sequences split over `context` and held in `balanced_order` (the model reorders its
    tokens so: research/models/llama.py); the batch split over the batch axes that divide it, the heads over
    `tensor` where it divides the key/value heads. Returns B x L x H x Dh in the same order."""
    batch_axes, head_axis, batch_shards, head_shards = activation_axes(jax.sharding.get_abstract_mesh())
    batch = batch_axes if batch_axes and query_BxLxHxDh.shape[0] % batch_shards == 0 else None
    heads = head_axis if head_axis and key_BxLxKxDh.shape[2] % head_shards == 0 else None
    spec, sequence = P(batch, CONTEXT_AXIS, heads, None), P(batch, CONTEXT_AXIS)
    count, length = shards(), query_BxLxHxDh.shape[1]
    positions_L = jnp.asarray(balanced_order(length, count), jnp.int32)
    local = functools.partial(_local, count=count, window=window, scale=scale, softcap=softcap)
    return jax.shard_map(
        local,
        in_specs=(spec, spec, spec, P(CONTEXT_AXIS), None if segment_ids_BxL is None else sequence),
        out_specs=spec,
        check_vma=False,
    )(query_BxLxHxDh, key_BxLxKxDh, value_BxLxKxDh, positions_L, segment_ids_BxL)
