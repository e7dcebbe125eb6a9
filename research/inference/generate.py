"""Sampling text from a language model: any model with a `make_decoder` (research/models/gpt.py:
the GPT with or without its key/value cache; rnn.py: the LSTM/GRU carrying its state token by token).

One jitted loop fills a token buffer: step t reads token t and writes token t + 1, which is the
prompt's own token while t + 1 is inside the prompt and a sample from the logits after that. So
the cached GPT and the recurrent model take the prompt one token at a time too (no separate
prefill), and the uncached GPT recomputes its whole context window each step, the baseline the
cache is measured against. The sample at step t uses the key `fold_in(PRNGKey(seed), t)`, so any two
paths whose logits agree produce the same tokens.

A GPT generates any number of tokens: past its block_size the context window slides (see
research/models/gpt.py for why it jumps by block_size - keep tokens rather than one), and the
uncached path reads exactly the same windows, so both still give the same tokens.

Legend: B batch, P prompt length, N new tokens, T = P + N, V vocabulary.
"""

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def generator(
    model: nn.Module,
    prompt_shape: tuple[int, int],
    num_tokens: int,
    sampling: Sampling,
    *,
    cached: bool = True,
    keep: int | None = None,
) -> Callable:
    """A jitted `fn(params, prompt_BxP) -> new tokens_BxN` for a model with `make_decoder`; a GPT
    generates past its block_size by sliding its window, keeping `keep` tokens of context."""
    batch, prompt_length = prompt_shape
    if prompt_length < 1 or num_tokens < 1:
        raise ValueError(
            f"generation needs a prompt of at least one token and num_tokens >= 1, got {prompt_length} and {num_tokens}"
        )
    if not callable(getattr(model, "make_decoder", None)):
        raise ValueError(
            f"a {type(model).__name__} does not generate text: it has no make_decoder (research/models/gpt.py has one)"
        )
    init_state, step = model.make_decoder(batch, prompt_length + num_tokens, cached=cached, keep=keep)
    return jax.jit(functools.partial(_fill, num_tokens=num_tokens, sampling=sampling, init_state=init_state, step=step))


def generate(
    model: nn.Module,
    params: PyTree,
    prompt_BxP: np.ndarray,
    num_tokens: int,
    sampling: Sampling = Sampling(),
    **options,
) -> np.ndarray:
    """New tokens_BxN continuing each prompt row (all rows the same length); `options`: `generator`'s cached, keep."""
    prompt_BxP = np.atleast_2d(np.asarray(prompt_BxP, np.int32))
    return np.asarray(generator(model, prompt_BxP.shape, num_tokens, sampling, **options)(params, prompt_BxP))


def timed_generate(
    model: nn.Module,
    params: PyTree,
    prompt_BxP: np.ndarray,
    num_tokens: int,
    sampling: Sampling = Sampling(),
    **options,
) -> tuple[np.ndarray, float]:
    """(new tokens_BxN, new tokens per second), compiled first so the rate excludes compilation."""
    prompt_BxP = np.atleast_2d(np.asarray(prompt_BxP, np.int32))
    fill = generator(model, prompt_BxP.shape, num_tokens, sampling, **options)
    compiled = fill.lower(params, prompt_BxP).compile()
    start = time.perf_counter()
    tokens = np.asarray(compiled(params, prompt_BxP))  # np.asarray waits for the device
    return tokens, tokens.size / (time.perf_counter() - start)
