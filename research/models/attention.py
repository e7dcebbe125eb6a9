"""Multi-head self-attention for the transformer blocks: flax's parameters, a faster program on CPU.

`SelfAttention` has the parameters of `flax.linen.MultiHeadDotProductAttention` (query, key,
value and out, same names, shapes and initialisation), so checkpoints and sharding rules do not
change, but computes them differently:
  * the query, key and value projections are one matmul (their kernels stacked), on (B*L) x D;
  * the attention itself runs heads-major (B x H x L x K) with a hand-written backward pass, the
    closed form FlashAttention uses (Dao et al. 2022, appendix B.2): with P the attention weights,
    O the output, dO its cotangent and Z the dropout multiplier (1 without dropout),
      dV = (P * Z)^T dO,   dP = (dO V^T) * Z,   dS = P * (dP - rowsum(dO * O)),   dQ = dS K,   dK = dS^T Q,
    four matmuls and one elementwise pass; P is kept from the forward pass (recomputing it costs a
    fifth matmul, which on a compute-bound CPU is slower);
  * causal attention runs in blocks of QUERY_BLOCK queries, each against only the keys at or
    before its last query, which skips most of the masked half of the work.
Together they about halve the attention's CPU time against flax's layout (docs/performance.md has the
measurements). Decoding with a key/value cache uses flax's module (same parameters).

Legend: B batch, L query length, S key length, H heads, K head width, D model width, N = B * L.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ATTENTION_COLLECTION = "attention"  # where record_weights sows the weights when asked
QUERY_BLOCK = 64  # queries per causal block (64 was fastest of 64, 128 and one block: docs/performance.md)


def query_blocks(length: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end query, keys seen) per block; without causality one block sees every key."""
    if not causal or length <= QUERY_BLOCK:
        return [(0, length, length)]
    return [
        (start, min(start + QUERY_BLOCK, length), min(start + QUERY_BLOCK, length))
        for start in range(0, length, QUERY_BLOCK)
    ]


def _rows(array, start: int, end: int, keys: int):
    """array[..., start:end, :keys] of a mask broadcastable to B x H x L x S (a length-1 axis is kept)."""
    if array is None:
        return None
    rows = slice(start, end) if array.shape[-2] != 1 else slice(None)
    return array[..., rows, : keys if array.shape[-1] != 1 else None]


def _block_weights(query, key, mask, causal: bool, start: int, end: int, keys: int):
    """Softmax weights (float32) of queries start:end over keys :keys."""
    scale = 1.0 / np.sqrt(query.shape[-1])
    scores = (
        jnp.einsum("bhlk,bhsk->bhls", query[:, :, start:end], key[:, :, :keys], preferred_element_type=jnp.float32)
        * scale
    )
    allowed = _rows(mask, start, end, keys)
    if causal:
        lower = jnp.asarray(np.tril(np.ones((end - start, keys), bool), k=start))
        allowed = lower if allowed is None else jnp.logical_and(allowed, lower)
    if allowed is not None:
        scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def _forward(query, key, value, mask, keep, causal):
    """(output B x H x L x K, residuals)."""
    outputs, weights = [], []
    for start, end, keys in query_blocks(query.shape[2], causal):
        block_weights = _block_weights(query, key, mask, causal, start, end, keys)
        weights.append(block_weights)
        dropped = block_weights if keep is None else block_weights * _rows(keep, start, end, keys)
        outputs.append(jnp.einsum("bhls,bhsk->bhlk", dropped.astype(value.dtype), value[:, :, :keys]))
    output = outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)
    return output, (query, key, value, mask, keep, weights, output)


def _backward(causal, residuals, d_output):
    query, key, value, mask, keep, weights, output = residuals
    scale = 1.0 / np.sqrt(query.shape[-1])
    # rowsum(dO * O) = rowsum(dP * P): L values per head instead of an L x S product.
    row = jnp.sum(d_output.astype(jnp.float32) * output.astype(jnp.float32), axis=-1, keepdims=True)
    d_queries, d_key, d_value = [], jnp.zeros_like(key), jnp.zeros_like(value)
    for (start, end, keys), block_weights in zip(query_blocks(query.shape[2], causal), weights):
        block_keep = _rows(keep, start, end, keys)
        dropped = block_weights if keep is None else block_weights * block_keep
        d_out = d_output[:, :, start:end]
        d_value = d_value.at[:, :, :keys].add(jnp.einsum("bhls,bhlk->bhsk", dropped.astype(value.dtype), d_out))
        d_weights = jnp.einsum("bhlk,bhsk->bhls", d_out, value[:, :, :keys], preferred_element_type=jnp.float32)
        if keep is not None:
            d_weights = d_weights * block_keep
        d_scores = (block_weights * (d_weights - row[:, :, start:end]) * scale).astype(query.dtype)
        d_queries.append(jnp.einsum("bhls,bhsk->bhlk", d_scores, key[:, :, :keys]))
        d_key = d_key.at[:, :, :keys].add(jnp.einsum("bhls,bhlk->bhsk", d_scores, query[:, :, start:end]))
    d_query = d_queries[0] if len(d_queries) == 1 else jnp.concatenate(d_queries, axis=2)
    return d_query, d_key, d_value, None, None


def _attention_output(query, key, value, mask, keep, causal):
    return _forward(query, key, value, mask, keep, causal)[0]


_attention = jax.custom_vjp(_attention_output, nondiff_argnums=(5,))
_attention.defvjp(_forward, _backward)


def attention_heads(query, key, value, mask=None, keep=None, causal: bool = False):
    """softmax(Q K^T / sqrt(K)) V on B x H x L x K operands, with the closed-form backward pass.

    mask (bool, broadcastable to B x H x L x S) is True where a query may attend to a key; `causal`
    adds the lower-triangular mask itself (and skips the blocks it removes); keep is dropout's
    multiplier on the weights (0 or 1 / keep probability, B x H x L x S) or None."""
    return _attention(query, key, value, None if mask is None else mask.astype(bool), keep, causal)


def attention_weights(query, key, mask=None, causal: bool = False):
    """softmax(Q K^T / sqrt(K)) of B x H x L x K queries and B x H x S x K keys: B x H x L x S, float32."""
    length = query.shape[2]
    if causal:
        lower = jnp.asarray(np.tril(np.ones((length, key.shape[2]), bool)))
        mask = lower if mask is None else jnp.logical_and(mask, lower)
    scores = jnp.einsum("bhlk,bhsk->bhls", query, key, preferred_element_type=jnp.float32) / np.sqrt(query.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def record_weights(module: nn.Module, weights: Callable[[], jax.Array]) -> None:
    """Sows `weights()` (B x H x L x S attention weights) in the "attention" collection when the caller asked for
    it (apply(..., mutable=["attention"]): research/inference/explain_text.py); computes nothing otherwise."""
    if module.is_mutable_collection(ATTENTION_COLLECTION) and not module.is_initializing():
        module.sow(ATTENTION_COLLECTION, "weights", weights())


def reference_attention_heads(query, key, value, mask=None, keep=None, causal: bool = False):
    """The same function written plainly, differentiated by JAX: what the tests compare against."""
    weights = attention_weights(query, key, mask, causal)
    if keep is not None:
        weights = weights * keep
    return jnp.einsum("bhls,bhsk->bhlk", weights.astype(value.dtype), value)


class _Projection(nn.Module):
    """The kernel (and bias) of a flax DenseGeneral of this shape, initialised as it would be; no computation."""

    shape: tuple[int, ...]
    feature_axes: int  # trailing axes of `shape` that are outputs
    use_bias: bool
    kernel_init: Any
    param_dtype: Any

    @nn.compact
    def __call__(self):
        inputs = self.shape[: -self.feature_axes]
        features = self.shape[-self.feature_axes :]
        flat = (int(np.prod(inputs)), int(np.prod(features)))  # DenseGeneral initialises the 2-D kernel

        def init(rng, shape, dtype):
            return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

        kernel = self.param("kernel", init, self.shape, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), features, self.param_dtype) if self.use_bias else None
        return kernel, bias


class SelfAttention(nn.Module):
    """Multi-head self-attention on x_BxLxD: MultiHeadDotProductAttention's parameters and result."""

    num_heads: int
    causal: bool = False  # queries attend only to keys at or before their position
    dropout_rate: float = 0.0  # on the attention weights, independently per example and head
    use_bias: bool = True
    kernel_init: Any = nn.initializers.normal(0.02)
    out_kernel_init: Any = None  # None: kernel_init, as flax's module
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, mask: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
        batch, length, width = x_BxLxD.shape
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
        heads, head_width = self.num_heads, width // self.num_heads
        projection = dict(use_bias=self.use_bias, param_dtype=self.param_dtype)
        qkv = [
            _Projection((width, heads, head_width), 2, kernel_init=self.kernel_init, name=name, **projection)()
            for name in ("query", "key", "value")
        ]
        out_init = self.out_kernel_init or self.kernel_init
        out_kernel_HxKxD, out_bias_D = _Projection(
            (heads, head_width, width), 1, kernel_init=out_init, name="out", **projection
        )()
        kernel_Dx3xHxK = jnp.stack([kernel for kernel, _ in qkv], axis=1)
        bias_3xHxK = jnp.stack([bias for _, bias in qkv]) if self.use_bias else None
        x_NxD, kernel_Dx3xHxK, bias_3xHxK, out_kernel_HxKxD, out_bias_D = nn.dtypes.promote_dtype(
            x_BxLxD.reshape(-1, width), kernel_Dx3xHxK, bias_3xHxK, out_kernel_HxKxD, out_bias_D, dtype=self.dtype
        )
        # One matmul for the three projections, on (B*L) x D (see transformer.flat_dot_general for why).
        qkv_Nx3xHxK = jnp.einsum("nd,dthk->nthk", x_NxD, kernel_Dx3xHxK)
        if bias_3xHxK is not None:
            qkv_Nx3xHxK = qkv_Nx3xHxK + bias_3xHxK
        qkv_BxLx3xHxK = qkv_Nx3xHxK.reshape(batch, length, 3, heads, head_width)
        # What flax's decoding cache holds (B x L x H x K), for inference/generate.py to refill; free unless asked for.
        self.sow("intermediates", "projected_key", qkv_BxLx3xHxK[:, :, 1])
        self.sow("intermediates", "projected_value", qkv_BxLx3xHxK[:, :, 2])
        query, key, value = jnp.transpose(qkv_BxLx3xHxK, (2, 0, 3, 1, 4))
        record_weights(self, lambda: attention_weights(query, key, None if mask is None else mask > 0, self.causal))
        keep = None
        if self.dropout_rate > 0.0 and not deterministic:
            kept = jax.random.bernoulli(
                self.make_rng("dropout"), 1.0 - self.dropout_rate, (batch, heads, length, length)
            )
            keep = kept.astype(jnp.float32) / (1.0 - self.dropout_rate)
        output_BxHxLxK = attention_heads(query, key, value, mask, keep, self.causal)
        output_NxHxK = jnp.transpose(output_BxHxLxK, (0, 2, 1, 3)).reshape(-1, heads, head_width)
        y_NxD = jnp.einsum("nhk,hkd->nd", output_NxHxK, out_kernel_HxKxD)
        if out_bias_D is not None:
            y_NxD = y_NxD + out_bias_D
        return y_NxD.reshape(batch, length, width)
