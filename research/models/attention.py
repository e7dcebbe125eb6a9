"""Softmax attention with a hand-written backward pass: a drop-in `attention_fn` for flax's attention.

Flax's `nn.dot_product_attention` leaves the backward pass to autodiff, which differentiates the
mask's `where`, the softmax and the scaling as separate elementwise passes over the B x H x L x L
scores. Here the backward pass is the closed form FlashAttention uses (Dao et al. 2022, eq. in
appendix B.2): with P the attention weights, O the output and dO its cotangent,
  dV = P^T dO,   dP = dO V^T,   dS = P * (dP - rowsum(dO * O)),   dQ = dS K,   dK = dS^T Q,
so the backward costs four matmuls and one fused elementwise pass. P is kept from the forward
pass (recomputing it costs a fifth matmul, which on a compute-bound CPU is slower). On this
2-core CPU the forward and backward of GPT 6L/384d's attention took ~20% less time than flax's
(benchmarks/README.md). Dropout on the weights or an additive bias fall back to flax's function.

Legend: B batch, L query length, S key length, H heads, K head width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _forward(query_BxLxHxK, key_BxSxHxK, value_BxSxHxK, mask):
    """(output_BxLxHxK, residuals); the scores and weights in float32, the weighted sum in the inputs' dtype."""
    scale = 1.0 / np.sqrt(query_BxLxHxK.shape[-1])
    scores_BxHxLxS = jnp.einsum("blhk,bshk->bhls", query_BxLxHxK, key_BxSxHxK, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores_BxHxLxS = jnp.where(mask, scores_BxHxLxS, jnp.finfo(jnp.float32).min)
    weights_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
    output_BxLxHxK = jnp.einsum("bhls,bshk->blhk", weights_BxHxLxS.astype(value_BxSxHxK.dtype), value_BxSxHxK)
    return output_BxLxHxK, (query_BxLxHxK, key_BxSxHxK, value_BxSxHxK, weights_BxHxLxS, output_BxLxHxK)


@jax.custom_vjp
def _attention(query_BxLxHxK, key_BxSxHxK, value_BxSxHxK, mask):
    return _forward(query_BxLxHxK, key_BxSxHxK, value_BxSxHxK, mask)[0]


def _attention_forward(query_BxLxHxK, key_BxSxHxK, value_BxSxHxK, mask):
    output_BxLxHxK, residuals = _forward(query_BxLxHxK, key_BxSxHxK, value_BxSxHxK, mask)
    return output_BxLxHxK, (residuals, mask)


def _attention_backward(saved, d_output_BxLxHxK):
    (query, key, value, weights_BxHxLxS, output_BxLxHxK), mask = saved
    scale = 1.0 / np.sqrt(query.shape[-1])
    d_value = jnp.einsum("bhls,blhk->bshk", weights_BxHxLxS.astype(value.dtype), d_output_BxLxHxK)
    d_weights_BxHxLxS = jnp.einsum("blhk,bshk->bhls", d_output_BxLxHxK, value, preferred_element_type=jnp.float32)
    # rowsum(dO * O) equals rowsum(dP * P) and is L values per head, not L x S.
    row_BxHxLx1 = jnp.einsum("blhk,blhk->bhl", d_output_BxLxHxK.astype(jnp.float32), output_BxLxHxK.astype(jnp.float32))[..., None]
    d_scores_BxHxLxS = (weights_BxHxLxS * (d_weights_BxHxLxS - row_BxHxLx1) * scale).astype(query.dtype)
    d_query = jnp.einsum("bhls,bshk->blhk", d_scores_BxHxLxS, key)
    d_key = jnp.einsum("bhls,blhk->bshk", d_scores_BxHxLxS, query)
    return d_query, d_key, d_value, None


_attention.defvjp(_attention_forward, _attention_backward)


def dot_product_attention(
    query, key, value, bias=None, mask=None, broadcast_dropout: bool = True, dropout_rng=None, dropout_rate: float = 0.0,
    deterministic: bool = False, dtype=None, precision=None, module=None, force_fp32_for_softmax: bool = False,
):
    """flax.linen.dot_product_attention's signature and result (softmax in float32), with the closed-form backward."""
    if bias is not None or (dropout_rate > 0.0 and not deterministic) or module is not None:
        return nn.dot_product_attention(
            query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic, dtype, precision,
            module, force_fp32_for_softmax=force_fp32_for_softmax,
        )
    mask = None if mask is None else mask.astype(bool)  # B x 1 x L x S (or broadcastable): no copy per head
    output = _attention(query, key, value, mask)
    return output.astype(dtype) if dtype is not None else output

