"""Character-level recurrent language model in the char-rnn style (Karpathy 2015, after Graves 2013,
"Generating sequences with recurrent neural networks"), with dropout on the non-recurrent
connections only (Zaremba et al. 2014, "Recurrent neural network regularization").

Token embedding, `num_layers` stacked LSTM (Hochreiter & Schmidhuber 1997) or GRU (Cho et al.
2014) layers of `width` units, each run over time by `flax.linen.RNN` (an `nn.scan` over the
cell; the LSTM is Flax's OptimizedLSTMCell, which fuses its four gates into one matmul), and a
dense head to next-token logits. Every state starts at zero, so the model is causal: the output
at step t reads tokens 0..t only. Generation passes each layer's state (`carries`) back in with
`return_carries=True` and feeds one token at a time (`make_decoder`, research/inference/generate.py).

Legend: B batch, L sequence length, E embedding size, D width (hidden units), V vocabulary.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

CELLS = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}


class RecurrentLM(nn.Module):
    """tokens_BxL (int) -> next-token logits_BxLxV (float32)."""

    vocab_size: int
    width: int
    num_layers: int = 2
    cell: str = "lstm"
    embedding_dim: int | None = None  # None: the same as width
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        tokens_BxL: jax.Array,
        *,
        deterministic: bool = True,
        carries: tuple | None = None,
        return_carries: bool = False,
    ) -> jax.Array | tuple[jax.Array, tuple]:
        """Logits; with `return_carries`, (logits, every layer's final state), which `carries` continues from."""
        if self.cell not in CELLS:
            raise ValueError(f"cell {self.cell!r} is not one of {sorted(CELLS)}")
        types = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dropout = nn.Dropout(self.dropout_rate, deterministic=deterministic)
        embedding = nn.Embed(self.vocab_size, self.embedding_dim or self.width, name="token_embedding", **types)
        x_BxLxD = dropout(embedding(tokens_BxL))
        final_carries = []
        for layer in range(self.num_layers):
            cell = CELLS[self.cell](features=self.width, parent=None, **types)  # adopted by nn.RNN, not by this module
            initial = None if carries is None else carries[layer]  # None: zeros
            carry, x_BxLxD = nn.RNN(cell, name=f"layer_{layer}")(x_BxLxD, initial_carry=initial, return_carry=True)
            final_carries.append(carry)
            x_BxLxD = dropout(x_BxLxD)
        logits_BxLxV = nn.Dense(self.vocab_size, name="head", **types)(x_BxLxD).astype(jnp.float32)
        return (logits_BxLxV, tuple(final_carries)) if return_carries else logits_BxLxV

    @nn.nowrap
    def make_decoder(
        self, batch: int, total: int, *, cached: bool = True, keep: int | None = None
    ) -> tuple[Callable, Callable]:
        """(init_state(params) -> zero carries, step(params, carries, buffer_BxT, t) -> (logits_BxV, carries)):
        the state is the cache, so `cached` and `keep` change nothing and any length generates."""
        del total, cached, keep

        def step(params, carries, buffer_BxT, t):
            tokens_Bx1 = jax.lax.dynamic_slice_in_dim(buffer_BxT, t, 1, axis=1)
            logits_Bx1xV, carries = self.apply({"params": params}, tokens_Bx1, carries=carries, return_carries=True)
            return logits_Bx1xV[:, 0], carries

        def init_state(params):  # both cells start from zeros, as in training
            shapes = jax.eval_shape(
                functools.partial(self.apply, return_carries=True), {"params": params}, jnp.zeros((batch, 1), jnp.int32)
            )
            return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes[1])

        return init_state, step
