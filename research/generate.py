"""Sampling text from the language models: GPT with or without its key/value cache, RecurrentLM
carrying its LSTM/GRU state token by token.

One jitted loop fills a token buffer: step t reads token t and writes token t + 1, which is the
prompt's own token while t + 1 is inside the prompt and a sample from the logits after that. So
the cached GPT and the recurrent model take the prompt one token at a time too (no separate
prefill), and the uncached GPT recomputes its whole context window each step, the baseline the
cache is measured against. The sample at step t uses the key `fold_in(PRNGKey(seed), t)`, so any two
paths whose logits agree produce the same tokens.

A GPT generates any number of tokens: past its block_size the context window slides (see
`_gpt_cached` for why it jumps by block_size - keep tokens rather than one), and the uncached
path reads exactly the same windows, so both still give the same tokens.

Legend: B batch, P prompt length, N new tokens, T = P + N, V vocabulary, K keep, L window length,
H heads, Dh head width.
"""

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from research.models.gpt import GPT
from research.models.rnn import RecurrentLM

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is drawn from the logits: temperature 0 is greedy (arg-max); top_k 0 and
    top_p 1 keep every token."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def sample_logits(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row: greedy, or from the temperature-scaled distribution cut to the top k
    tokens and to the smallest set whose probability reaches top_p (Holtzman et al. 2020)."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV / sampling.temperature
    if 0 < sampling.top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(logits_BxV, sampling.top_k)[0][:, -1:]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if sampling.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probabilities_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probabilities_BxV, axis=-1) - probabilities_BxV  # mass of the tokens ranked above
        keep_BxV = before_BxV < sampling.top_p  # always keeps the most likely token
        cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _zeros_like_shapes(shapes: PyTree) -> PyTree:
    return jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), shapes)


def window_start(t: jax.Array, block_size: int, keep: int) -> jax.Array:
    """Where the context of position t begins in the buffer: 0 until t reaches block_size, then
    `keep` tokens before the position at which the window last slid, every block_size - keep positions."""
    past = t - block_size
    return jnp.where(past < 0, 0, t - keep - past % (block_size - keep))


def _check_keep(model: GPT, keep: int | None) -> int:
    keep = model.block_size // 2 if keep is None else keep
    if not 1 <= keep < model.block_size:
        raise ValueError(f"keep must be between 1 and block_size - 1 = {model.block_size - 1} tokens of context, got {keep}")
    return keep


def _gpt_cached(model: GPT, batch: int, total: int, keep: int) -> tuple[Callable, Callable]:
    """(init_state(params) -> empty caches, step(params, caches, buffer_BxT, t) -> (logits_BxV, caches)).

    Past block_size the learned position embeddings leave no room to roll the cache: every
    cached key and value was computed at its absolute position, and shifting the window by one
    token changes all of them. So when the cache is full the window slides by block_size - keep
    tokens at once: one full forward pass over the last `keep` tokens refills the cache at
    positions 0..keep-1 (a prefill), and the next block_size - keep tokens are cached steps
    again. keep = block_size - 1 is nanoGPT's slide by one token, at a full pass per token.
    """
    block_size = model.block_size
    decoder = model.clone(decode=True)
    cache_shapes = jax.eval_shape(decoder.init, jax.random.PRNGKey(0), jnp.zeros((batch, min(total, block_size)), jnp.int32))["cache"]
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

    return lambda params: _zeros_like_shapes(cache_shapes), step


def _gpt_uncached(model: GPT, total: int, keep: int) -> tuple[Callable, Callable]:
    """The baseline: a full forward pass per position over the window the cached path attends to
    (the same `window_start`), so both give the same logits."""
    length = min(total, model.block_size)

    def step(params, state, buffer_BxT, t):
        start = window_start(t, model.block_size, keep)
        padded_BxT = jnp.pad(buffer_BxT, ((0, 0), (0, length)))  # a window never clamps at the buffer's end
        logits_BxLxV = model.apply({"params": params}, jax.lax.dynamic_slice_in_dim(padded_BxT, start, length, axis=1))
        return jax.lax.dynamic_index_in_dim(logits_BxLxV, t - start, axis=1, keepdims=False), state

    return lambda params: None, step


def _recurrent(model: RecurrentLM, batch: int) -> tuple[Callable, Callable]:
    """(init_state(params) -> zero carries, step(params, carries, buffer_BxT, t) -> (logits_BxV, carries))."""

    def step(params, carries, buffer_BxT, t):
        tokens_Bx1 = jax.lax.dynamic_slice_in_dim(buffer_BxT, t, 1, axis=1)
        logits_Bx1xV, carries = model.apply({"params": params}, tokens_Bx1, carries=carries, return_carries=True)
        return logits_Bx1xV[:, 0], carries

    def init_state(params):
        shapes = jax.eval_shape(functools.partial(model.apply, return_carries=True), {"params": params}, jnp.zeros((batch, 1), jnp.int32))
        return _zeros_like_shapes(shapes[1])  # both cells start from zeros, as in training

    return init_state, step


def _fill(params: PyTree, prompt_BxP: jax.Array, *, num_tokens: int, sampling: Sampling, init_state, step) -> jax.Array:
    """The new tokens_BxN, one jitted loop over the T - 1 positions."""
    batch, prompt_length = prompt_BxP.shape
    buffer_BxT = jnp.concatenate([prompt_BxP.astype(jnp.int32), jnp.zeros((batch, num_tokens), jnp.int32)], axis=1)
    key = jax.random.PRNGKey(sampling.seed)

    def body(t, carry):
        buffer_BxT, state = carry
        logits_BxV, state = step(params, state, buffer_BxT, t)
        sampled_B = sample_logits(logits_BxV, jax.random.fold_in(key, t), sampling)
        given_B = jax.lax.dynamic_index_in_dim(buffer_BxT, t + 1, axis=1, keepdims=False)
        next_B = jnp.where(t + 1 < prompt_length, given_B, sampled_B)
        return jax.lax.dynamic_update_index_in_dim(buffer_BxT, next_B, t + 1, axis=1), state

    buffer_BxT, _ = jax.lax.fori_loop(0, prompt_length + num_tokens - 1, body, (buffer_BxT, init_state(params)))
    return buffer_BxT[:, prompt_length:]


def generator(model: nn.Module, prompt_shape: tuple[int, int], num_tokens: int, sampling: Sampling, *, cached: bool = True, keep: int | None = None) -> Callable:
    """A jitted `fn(params, prompt_BxP) -> new tokens_BxN` for a GPT or a RecurrentLM. A GPT
    generates past its block_size by sliding its window, keeping `keep` tokens of context
    (None: half the block; see `_gpt_cached`)."""
    batch, prompt_length = prompt_shape
    if prompt_length < 1 or num_tokens < 1:
        raise ValueError(f"generation needs a prompt of at least one token and num_tokens >= 1, got {prompt_length} and {num_tokens}")
    if isinstance(model, GPT):
        total, keep = prompt_length + num_tokens, _check_keep(model, keep)
        init_state, step = _gpt_cached(model, batch, total, keep) if cached else _gpt_uncached(model, total, keep)
    elif isinstance(model, RecurrentLM):
        init_state, step = _recurrent(model, batch)  # its state is the cache: nothing to recompute
    else:
        raise ValueError(f"cannot generate with a {type(model).__name__}: only GPT and RecurrentLM models generate text")
    return jax.jit(functools.partial(_fill, num_tokens=num_tokens, sampling=sampling, init_state=init_state, step=step))


def generate(model: nn.Module, params: PyTree, prompt_BxP: np.ndarray, num_tokens: int, sampling: Sampling = Sampling(), *, cached: bool = True, keep: int | None = None) -> np.ndarray:
    """New tokens_BxN continuing each prompt row (all rows the same length)."""
    prompt_BxP = np.atleast_2d(np.asarray(prompt_BxP, np.int32))
    return np.asarray(generator(model, prompt_BxP.shape, num_tokens, sampling, cached=cached, keep=keep)(params, prompt_BxP))


def timed_generate(model: nn.Module, params: PyTree, prompt_BxP: np.ndarray, num_tokens: int, sampling: Sampling = Sampling(), *, cached: bool = True, keep: int | None = None) -> tuple[np.ndarray, float]:
    """(new tokens_BxN, new tokens per second), compiled first so the rate excludes compilation."""
    prompt_BxP = np.atleast_2d(np.asarray(prompt_BxP, np.int32))
    fill = generator(model, prompt_BxP.shape, num_tokens, sampling, cached=cached, keep=keep)
    compiled = fill.lower(params, prompt_BxP).compile()
    start = time.perf_counter()
    tokens = np.asarray(compiled(params, prompt_BxP))  # np.asarray waits for the device
    return tokens, tokens.size / (time.perf_counter() - start)
