"""Model families: parameter counts equal to written-out formulas (and the papers' numbers),
output shapes, causality to exact zero difference, dtypes, and the layouts other code relies on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.models import param_count
from research.models.cnn import CNN
from research.models.gpt import GPT

NANOGPT_CPU = dict(vocab_size=65, block_size=64, num_layers=4, num_heads=4, width=128)


def init_params(model, *inputs, **kwargs):
    """Shapes only where the values are not needed: eval_shape costs no compute."""
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs, **kwargs))["params"]


def assert_causal(apply, tokens_BxL: np.ndarray, vocab_size: int, position: int) -> None:
    """Changing the token at `position` leaves every earlier output bit-identical and changes that position's."""
    changed_BxL = tokens_BxL.copy()
    changed_BxL[:, position] = (changed_BxL[:, position] + 1) % vocab_size
    before, after = np.asarray(apply(tokens_BxL)), np.asarray(apply(changed_BxL))
    np.testing.assert_array_equal(after[:, :position], before[:, :position])
    assert np.abs(after[:, position:] - before[:, position:]).min(axis=-1).max() > 0.0


# GPT --------------------------------------------------------------------------------------------


def gpt_param_formula(vocab_size, block_size, num_layers, width, use_bias=True, tie_embeddings=True, **_):
    """Embeddings + per block (2 LayerNorms, Q/K/V/out projections, 4x MLP) + final LayerNorm + untied head."""
    bias = int(use_bias)
    layer_norm = width * (1 + bias)
    attention = 4 * width * width + 4 * width * bias
    mlp = 8 * width * width + (4 * width + width) * bias
    block = 2 * layer_norm + attention + mlp
    head = 0 if tie_embeddings else vocab_size * width
    return (vocab_size + block_size) * width + num_layers * block + layer_norm + head


@pytest.mark.parametrize("use_bias,tie_embeddings", [(True, True), (False, True), (True, False)])
def test_gpt_param_count_matches_formula(use_bias, tie_embeddings):
    config = NANOGPT_CPU | dict(use_bias=use_bias, tie_embeddings=tie_embeddings)
    params = init_params(GPT(**config), jnp.zeros((1, 64), jnp.int32))
    assert param_count(params) == gpt_param_formula(**config)
    assert "head" in params if not tie_embeddings else "head" not in params


def test_gpt_nanogpt_cpu_config_size():
    # nanoGPT prints 0.80M for this config: it leaves the position embeddings out of its count.
    params = init_params(GPT(**NANOGPT_CPU, use_bias=False), jnp.zeros((1, 64), jnp.int32))
    assert param_count(params) == 804_096
    assert param_count(params) - 64 * 128 == 795_904


def test_gpt_shapes_and_causality():
    model = GPT(**NANOGPT_CPU | dict(block_size=16, num_layers=2, width=32))
    tokens_BxL = np.random.default_rng(0).integers(0, 65, size=(2, 16)).astype(np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens_BxL)["params"]
    apply = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    logits_BxLxV = apply(tokens_BxL)
    assert logits_BxLxV.shape == (2, 16, 65) and logits_BxLxV.dtype == jnp.float32
    assert_causal(apply, tokens_BxL, 65, position=9)
    with pytest.raises(ValueError, match="block_size"):
        model.apply({"params": params}, np.zeros((1, 17), np.int32))


def test_gpt_dropout_and_bfloat16():
    config = NANOGPT_CPU | dict(block_size=8, num_layers=1, width=32)
    tokens_BxL = np.arange(16, dtype=np.int32).reshape(2, 8)
    model = GPT(**config, dropout_rate=0.5)
    params = model.init(jax.random.PRNGKey(0), tokens_BxL)["params"]
    evaluate = model.apply({"params": params}, tokens_BxL)
    again = model.apply({"params": params}, tokens_BxL, deterministic=True)
    train = [
        model.apply({"params": params}, tokens_BxL, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)})
        for seed in (1, 2)
    ]
    np.testing.assert_array_equal(evaluate, again)
    assert np.abs(train[0] - evaluate).max() > 0 and np.abs(train[0] - train[1]).max() > 0
    half = GPT(**config, dtype=jnp.bfloat16)
    half_params = half.init(jax.random.PRNGKey(0), tokens_BxL)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(half_params)} == {jnp.dtype(jnp.float32)}
    full = GPT(**config).apply({"params": half_params}, tokens_BxL)
    reduced = half.apply({"params": half_params}, tokens_BxL)
    assert reduced.dtype == jnp.float32
    assert 0.0 < np.abs(reduced - full).max() < 0.1, "bfloat16 compute should differ from float32, slightly"


# CNN --------------------------------------------------------------------------------------------


def test_cnn_param_count_and_shapes():
    model = CNN()
    conv1, conv2 = 3 * 3 * 1 * 64 + 64, 3 * 3 * 64 * 128 + 128
    dense1, dense2 = 7 * 7 * 128 * 1000 + 1000, 1000 * 10 + 10
    assert param_count(init_params(model, jnp.zeros((1, 28, 28, 1)))) == conv1 + conv2 + dense1 + dense2 == 6_357_506
    small = CNN(conv_features=(4, 8), dense_features=16, pooling="max")
    images_BxHxW = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    variables = small.init(jax.random.PRNGKey(0), images_BxHxW)
    logits_BxK = small.apply(variables, images_BxHxW)
    assert logits_BxK.shape == (3, 10) and logits_BxK.dtype == jnp.float32
    np.testing.assert_array_equal(logits_BxK, small.apply(variables, images_BxHxW[..., None]))
    average = CNN(conv_features=(4, 8), dense_features=16).apply(variables, images_BxHxW)
    assert np.abs(average - logits_BxK).max() > 0, "average and max pooling must differ"
    with pytest.raises(ValueError, match="pooling"):
        CNN(pooling="median").init(jax.random.PRNGKey(0), images_BxHxW)
