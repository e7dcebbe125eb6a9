"""Generation: the GPT key/value cache gives the same logits and tokens as the full forward pass,
the recurrent LM carried token by token matches its full-sequence run, and the samplers cut where they should."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.inference import generate
from research.inference.generate import Sampling
from research.models import gpt
from research.models.gpt import GPT
from research.models.rnn import RecurrentLM

SAMPLINGS = [Sampling(temperature=0.0), Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=7)]


@functools.cache
def small_gpt():
    """A 2-layer GPT of width 16 and its parameters, initialised once for the module."""
    model = GPT(vocab_size=17, block_size=24, num_layers=2, num_heads=2, width=16)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 24), jnp.int32))["params"]
    return model, params


def decode_every_position(decoder, params, tokens_BxT) -> np.ndarray:
    """logits_BxTxV of a decoder's step run over every position of `tokens_BxT` (the input already known)."""
    init_state, step = decoder
    step, state, logits = jax.jit(step), init_state(params), []
    for t in range(tokens_BxT.shape[1]):
        step_logits, state = step(params, state, tokens_BxT, t)
        logits.append(step_logits)
    return np.stack(logits, axis=1)


def test_decode_path_keeps_the_parameter_tree():
    model, params = small_gpt()
    decoding = jax.eval_shape(model.clone(decode=True).init, jax.random.PRNGKey(0), jnp.zeros((1, 24), jnp.int32))
    assert jax.tree.structure(decoding["params"]) == jax.tree.structure(params)
    assert decoding["cache"]["block_0"]["attention"]["cached_key"].shape == (1, 24, 2, 8)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_cached_and_uncached_gpt_give_the_same_tokens(sampling):
    model, params = small_gpt()
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
    cached = generate.generate(model, params, prompt, 19, sampling, cached=True)
    uncached = generate.generate(model, params, prompt, 19, sampling, cached=False)
    assert cached.shape == (2, 19) and cached.min() >= 0 and cached.max() < 17
    np.testing.assert_array_equal(cached, uncached)


def test_cached_logits_equal_the_full_forward_pass():
    model, params = small_gpt()
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, 17)
    full = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_allclose(
        decode_every_position(model.make_decoder(2, 24, keep=12), params, tokens), full, atol=1e-5
    )


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_recurrent_state_carried_token_by_token_matches_the_full_run(cell):
    model = RecurrentLM(vocab_size=11, width=12, num_layers=2, cell=cell)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, 11)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)["params"]
    full = jax.jit(model.apply)({"params": params}, tokens)
    np.testing.assert_allclose(decode_every_position(model.make_decoder(2, 9), params, tokens), full, atol=1e-5)
    greedy = generate.generate(model, params, tokens[:1, :3], 6, Sampling(temperature=0.0))
    np.testing.assert_array_equal(greedy[0, 0], np.argmax(model.apply({"params": params}, tokens[:1, :3])[0, -1]))


@pytest.mark.slow
def test_greedy_continues_with_the_arg_max_of_the_full_pass():
    model, params = small_gpt()
    prompt = np.array([[1, 2, 3]], np.int32)
    tokens = generate.generate(model, params, prompt, 4, Sampling(temperature=0.0))
    sequence = np.concatenate([prompt, tokens], axis=1)
    expected = np.argmax(model.apply({"params": params}, sequence)[0, 2:-1], axis=-1)
    np.testing.assert_array_equal(tokens[0], expected)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    keys = jax.random.PRNGKey(0)
    top2 = np.asarray(generate.sample_logits(logits, keys, Sampling(top_k=2)))
    assert set(np.unique(top2)) == {0, 1} and abs(np.mean(top2 == 0) - 0.5 / 0.8) < 0.03
    nucleus = np.asarray(generate.sample_logits(logits, keys, Sampling(top_p=0.9)))  # 0.5 + 0.3 < 0.9: three kept
    assert set(np.unique(nucleus)) == {0, 1, 2}
    assert set(np.unique(np.asarray(generate.sample_logits(logits, keys, Sampling(temperature=0.0))))) == {0}


@pytest.mark.slow
@pytest.mark.parametrize("keep", [1, 12, 23])
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_cached_and_uncached_gpt_agree_far_past_the_block(sampling, keep):
    model, params = small_gpt()  # block_size 24: 5 + 55 tokens slide the window 2 to 36 times
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
    cached = generate.generate(model, params, prompt, 55, sampling, keep=keep)
    uncached = generate.generate(model, params, prompt, 55, sampling, cached=False, keep=keep)
    assert cached.shape == (2, 55) and cached.min() >= 0 and cached.max() < 17
    np.testing.assert_array_equal(cached, uncached)


def test_window_start_slides_by_block_size_minus_keep():
    starts = [int(gpt.window_start(t, 8, 3)) for t in range(20)]
    assert starts == [0] * 8 + [5] * 5 + [10] * 5 + [15] * 2  # positions t - start stay within 0..7
    assert [int(gpt.window_start(t, 8, 7)) for t in range(7, 12)] == [0, 1, 2, 3, 4]  # nanoGPT: the last 8 tokens


@pytest.mark.slow
def test_keep_block_minus_one_is_nanogpts_sliding_window():
    model, params = small_gpt()
    sampling = Sampling(temperature=0.8, top_k=5, seed=3)
    prompt = list(range(1, 31))  # longer than the block: only its last 24 tokens condition the first sample
    tokens = generate.generate(model, params, np.array([prompt]), 20, sampling, keep=23)
    sequence, key = list(prompt), jax.random.PRNGKey(sampling.seed)
    for _ in range(20):  # nanoGPT's loop: crop to block_size, run the model, sample the last position
        logits = jax.jit(model.apply)({"params": params}, jnp.array([sequence[-24:]]))[:, -1]
        sequence.append(int(generate.sample_logits(logits, jax.random.fold_in(key, len(sequence) - 1), sampling)[0]))
    np.testing.assert_array_equal(tokens[0], sequence[30:])


def test_keep_outside_the_block_is_a_one_line_error():
    model, params = small_gpt()
    with pytest.raises(ValueError, match="keep must be between 1 and block_size - 1 = 23 tokens of context, got 24"):
        generate.generate(model, params, np.ones((1, 5), np.int32), 30, keep=24)
