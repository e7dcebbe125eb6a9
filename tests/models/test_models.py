"""Model families: parameter counts equal to written-out formulas (and the papers' numbers),
output shapes, causality to exact zero difference, dtypes, and the layouts other code relies on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close
from research import sharding
from research.models import param_count
from research.models.bert import BertClassifier, BertClozeClassifier, BertEncoder, BertForMaskedLM, BertForPreTraining
from research.models.cnn import CNN
from research.models.gpt import GPT
from research.models.resnet import CifarResNet, zero_padded_shortcut
from research.models.rnn import RecurrentLM
from research.models.vit import ViT

NANOGPT_CPU = dict(vocab_size=65, block_size=64, num_layers=4, num_heads=4, width=128)


def init_params(model, *inputs, **kwargs):
    """Shapes only where the values are not needed: eval_shape costs no compute."""
    return jax.eval_shape(lambda: model.init(key(0), *inputs, **kwargs))["params"]


def key(seed: int) -> jax.Array:
    """RBG keys: their random ops compile in a fraction of threefry's time, which dominates these tests."""
    return jax.random.key(seed, impl="rbg")


def init_variables(model, *inputs) -> dict:
    """Every variable collection, initialised under one jit."""
    return jax.jit(model.init)(key(0), *inputs)


def jit_apply(model, **keywords):
    """model.apply with fixed keyword arguments, jitted: (variables, *inputs, rngs=...) -> outputs."""
    return jax.jit(functools.partial(model.apply, **keywords))


def batch_sharding() -> jax.sharding.NamedSharding:
    """The trainer's batch sharding: leading axis split over all 8 devices of an Auto-axes mesh."""
    return sharding.batch_sharding(sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))


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


SMALL_GPT = NANOGPT_CPU | dict(block_size=16, num_layers=1, width=32, dropout_rate=0.5)


@pytest.fixture(scope="module")
def small_gpt():
    """A 1-layer GPT with dropout, its variables, a token batch and its jitted evaluation apply."""
    model = GPT(**SMALL_GPT)
    tokens_BxL = np.random.default_rng(0).integers(0, 65, size=(2, 16)).astype(np.int32)
    variables = init_variables(model, tokens_BxL)
    return model, variables, tokens_BxL, functools.partial(jit_apply(model), variables)


def test_gpt_shapes_and_causality(small_gpt):
    model, variables, tokens_BxL, apply = small_gpt
    logits_BxLxV = apply(tokens_BxL)  # deterministic by default: dropout off
    assert logits_BxLxV.shape == (2, 16, 65) and logits_BxLxV.dtype == jnp.float32
    assert_causal(apply, tokens_BxL, 65, position=9)
    with pytest.raises(ValueError, match="block_size"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 17), jnp.int32))


def test_gpt_dropout_and_bfloat16(small_gpt):
    model, variables, tokens_BxL, apply = small_gpt
    evaluate = apply(tokens_BxL)
    train_apply = jit_apply(model, deterministic=False)
    train = [train_apply(variables, tokens_BxL, rngs={"dropout": key(seed)}) for seed in (1, 2)]
    assert np.abs(train[0] - evaluate).max() > 0 and np.abs(train[0] - train[1]).max() > 0
    half = GPT(**SMALL_GPT, dtype=jnp.bfloat16)
    half_params = init_params(half, tokens_BxL)
    assert {leaf.dtype for leaf in jax.tree.leaves(half_params)} == {jnp.dtype(jnp.float32)}
    reduced = jit_apply(half)(variables, tokens_BxL)
    assert reduced.dtype == jnp.float32
    assert 0.0 < np.abs(reduced - evaluate).max() < 0.1, "bfloat16 compute should differ from float32, slightly"


@pytest.mark.slow
def test_gpt_gradients_reach_every_parameter_and_sharded_equals_unsharded(small_gpt):
    model, variables, _, _ = small_gpt
    tokens_BxL = np.random.default_rng(2).integers(0, 65, size=(8, 16)).astype(np.int32)

    def loss(params, tokens_BxL):
        logits_BxLxV = model.apply({"params": params}, tokens_BxL)
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV[:, :-1], tokens_BxL[:, 1:]).mean()

    gradient = jax.jit(jax.value_and_grad(loss))
    sharded_BxL = jax.device_put(tokens_BxL, batch_sharding())
    local_loss, local_grads = gradient(variables["params"], tokens_BxL)
    sharded_loss, sharded_grads = gradient(variables["params"], sharded_BxL)
    np.testing.assert_allclose(sharded_loss, local_loss, rtol=1e-6)
    assert_trees_close(sharded_grads, local_grads, atol=1e-6)
    assert np.log(65) - 0.1 < local_loss < np.log(65) + 0.1, "small initial weights: near-uniform predictions"
    smallest = jax.tree.map(lambda gradient: float(np.abs(gradient).max()), local_grads)
    assert min(jax.tree.leaves(smallest)) > 0.0, "every parameter, the tied embedding included, gets a gradient"


# CNN --------------------------------------------------------------------------------------------


def test_cnn_param_count_and_shapes():
    model = CNN()
    conv1, conv2 = 3 * 3 * 1 * 64 + 64, 3 * 3 * 64 * 128 + 128
    dense1, dense2 = 7 * 7 * 128 * 1000 + 1000, 1000 * 10 + 10
    assert param_count(init_params(model, jnp.zeros((1, 28, 28, 1)))) == conv1 + conv2 + dense1 + dense2 == 6_357_506
    small = CNN(conv_features=(4, 8), dense_features=16, pooling="max")
    images_BxHxW = np.random.default_rng(0).random((3, 28, 28), dtype=np.float32)
    variables = init_variables(small, images_BxHxW)
    apply = jit_apply(small)
    logits_BxK = apply(variables, images_BxHxW)
    assert logits_BxK.shape == (3, 10) and logits_BxK.dtype == jnp.float32
    np.testing.assert_array_equal(logits_BxK, apply(variables, images_BxHxW[..., None]))
    average = jit_apply(CNN(conv_features=(4, 8), dense_features=16))(variables, images_BxHxW)
    assert np.abs(average - logits_BxK).max() > 0, "average and max pooling must differ"
    with pytest.raises(ValueError, match="pooling"):
        jax.eval_shape(CNN(pooling="median").init, key(0), images_BxHxW)


# ResNet -----------------------------------------------------------------------------------------


def resnet_param_formula(depth, num_classes=10, width=16):
    """Bias-free 3x3 convolutions, BatchNorm scale and bias after each, parameter-free shortcuts, dense head."""
    blocks = (depth - 2) // 6
    total = 9 * 3 * width + 2 * width + 4 * width * num_classes + num_classes
    for stage in range(3):
        features = width * 2**stage
        for block in range(blocks):
            inputs = features // 2 if stage > 0 and block == 0 else features
            total += 9 * inputs * features + 9 * features * features + 4 * features
    return total


@pytest.mark.parametrize("depth,expected", [(20, 269_722), (32, 464_154), (56, 853_018)])
def test_resnet_param_counts_match_paper(depth, expected):
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M.
    variables = jax.eval_shape(lambda: CifarResNet(depth=depth).init(key(0), jnp.zeros((1, 32, 32, 3))))
    assert param_count(variables["params"]) == resnet_param_formula(depth) == expected
    norms = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"]) if "norm" in str(path)]
    assert param_count(variables["batch_stats"]) == param_count(norms)  # a mean and a variance per scale and bias


@pytest.fixture(scope="module")
def small_resnet():
    """ResNet-8 at width 4, its variables, 16 images whose two halves differ, and a jitted training apply."""
    model = CifarResNet(depth=8, width=4)
    images_BxHxWxC = np.random.default_rng(1).normal(size=(16, 8, 8, 3)).astype(np.float32)
    images_BxHxWxC[8:] += 3.0  # so statistics over a part of the batch differ from the global ones
    variables = init_variables(model, images_BxHxWxC)
    return model, variables, images_BxHxWxC, jit_apply(model, train=True, mutable=["batch_stats"])


def stem_mean_update(variables, images_BxHxWxC: np.ndarray) -> jax.Array:
    """The stem BatchNorm's first running-mean update from zero, computed outside the model."""
    stem_kernel = variables["params"]["stem_conv"]["kernel"]
    stem_conv = jax.lax.conv_general_dilated(
        images_BxHxWxC, stem_kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return 0.1 * stem_conv.mean(axis=(0, 1, 2))


def test_resnet_shapes_batch_norm_modes_and_shortcuts(small_resnet):
    model, variables, images_BxHxWxC, train_apply = small_resnet
    logits_BxK, updates = train_apply(variables, images_BxHxWxC)
    assert logits_BxK.shape == (16, 10) and logits_BxK.dtype == jnp.float32
    expected_mean = stem_mean_update(variables, images_BxHxWxC)
    np.testing.assert_allclose(updates["batch_stats"]["stem_norm"]["mean"], expected_mean, atol=1e-6)
    # Evaluation uses the running statistics: one example's logits do not depend on the rest of the batch.
    evaluate = jit_apply(model)
    others_changed = images_BxHxWxC.copy()
    others_changed[1:] *= -2.0
    np.testing.assert_array_equal(evaluate(variables, others_changed)[0], evaluate(variables, images_BxHxWxC)[0])
    shortcut = zero_padded_shortcut(jnp.ones((1, 4, 4, 2)), features=4, stride=2)
    assert shortcut.shape == (1, 2, 2, 4)
    np.testing.assert_array_equal(shortcut[..., 2:], 0.0)
    with pytest.raises(ValueError, match="6n"):
        jax.eval_shape(CifarResNet(depth=21).init, key(0), images_BxHxWxC)


def test_resnet_batch_norm_over_sharded_batch_uses_global_statistics(small_resnet):
    _, variables, images_BxHxWxC, train_apply = small_resnet
    sharded_logits, sharded_stats = train_apply(variables, jax.device_put(images_BxHxWxC, batch_sharding()))
    local_logits, local_stats = train_apply(variables, jax.device_put(images_BxHxWxC, jax.devices()[0]))
    assert_trees_close(sharded_stats, local_stats, atol=1e-5)
    np.testing.assert_allclose(sharded_logits, local_logits, atol=1e-5)
    first_shard_mean = stem_mean_update(variables, images_BxHxWxC[:2])
    assert np.abs(first_shard_mean - sharded_stats["batch_stats"]["stem_norm"]["mean"]).max() > 1e-2


# RNN --------------------------------------------------------------------------------------------


def rnn_param_formula(vocab_size, width, num_layers, cell, embedding_dim):
    """Embedding + per layer (LSTM: 4 gates, bias-free input kernels; GRU: 3 + 3 kernels, 4 biases) + head."""
    total = vocab_size * embedding_dim + width * vocab_size + vocab_size
    for layer in range(num_layers):
        inputs = embedding_dim if layer == 0 else width
        if cell == "lstm":
            total += 4 * (inputs * width + width * width + width)
        else:
            total += 3 * inputs * width + 3 * width * width + 4 * width
    return total


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_param_count_shapes_and_causality(cell):
    config = dict(vocab_size=65, width=32, num_layers=2, cell=cell, embedding_dim=16)
    model = RecurrentLM(**config)
    tokens_BxL = np.random.default_rng(0).integers(0, 65, size=(2, 12)).astype(np.int32)
    variables = init_variables(model, tokens_BxL)
    assert param_count(variables["params"]) == rnn_param_formula(**config)
    assert sorted(variables["params"]) == ["head", "layer_0", "layer_1", "token_embedding"]
    apply = functools.partial(jit_apply(model), variables)
    logits_BxLxV = apply(tokens_BxL)
    assert logits_BxLxV.shape == (2, 12, 65) and logits_BxLxV.dtype == jnp.float32
    assert_causal(apply, tokens_BxL, 65, position=5)


def test_rnn_rejects_unknown_cell():
    with pytest.raises(ValueError, match="cell"):
        jax.eval_shape(RecurrentLM(vocab_size=5, width=4, cell="rnn").init, key(0), jnp.zeros((1, 3), jnp.int32))


# BERT -------------------------------------------------------------------------------------------

BERT_BASE = dict(vocab_size=30522, max_length=512, num_layers=12, num_heads=12, width=768)
TINY_BERT = dict(vocab_size=50, max_length=16, num_layers=2, num_heads=2, width=16)


def bert_encoder_param_formula(vocab_size, max_length, num_layers, width, num_segments=2, **_):
    """Token, position, segment embeddings + one LayerNorm + per block (attention, 2 LayerNorms, 4x MLP)."""
    attention = 4 * width * width + 4 * width
    mlp = 8 * width * width + 5 * width
    return (vocab_size + max_length + num_segments) * width + 2 * width + num_layers * (attention + 4 * width + mlp)


def test_bert_base_param_counts():
    encoder = BertEncoder(**BERT_BASE)
    tokens_BxL = jnp.zeros((1, 8), jnp.int32)
    classifier = init_params(BertClassifier(encoder, num_classes=2), tokens_BxL)
    masked_lm = init_params(BertForMaskedLM(encoder), tokens_BxL)
    assert param_count(classifier["encoder"]) == bert_encoder_param_formula(**BERT_BASE) == 108_891_648
    # BERT-base as usually counted (encoder + pooler): 109,482,240, the paper's "110M".
    assert param_count(classifier["encoder"]) + param_count(classifier["pooler"]) == 109_482_240
    assert param_count(classifier) - param_count(classifier["encoder"]) == (768 * 768 + 768) + (768 * 2 + 2)
    # The output layer is the tied token embedding: only the transform, its LayerNorm and a bias are new.
    assert param_count(masked_lm) - param_count(masked_lm["encoder"]) == (768 * 768 + 768) + 2 * 768 + 30522
    # Untied, the head has its own 768 x 30,522 output matrix; the encoder (what transfers) is unchanged.
    untied = init_params(BertForMaskedLM(encoder, tie_embeddings=False), tokens_BxL)
    assert param_count(untied) - param_count(masked_lm) == 768 * 30522
    assert untied["mlm_output"]["kernel"].shape == (768, 30522) and param_count(untied["encoder"]) == 108_891_648
    pre_norm = init_params(BertClassifier(BertEncoder(**BERT_BASE, pre_layer_norm=True), num_classes=2), tokens_BxL)
    assert param_count(pre_norm) == param_count(classifier)
    assert "final_norm" in pre_norm["encoder"] and "embedding_norm" not in pre_norm["encoder"]


def test_bert_encoder_restores_from_masked_lm_into_classifier():
    encoder = BertEncoder(**TINY_BERT)
    tokens_BxL = np.random.default_rng(0).integers(0, 50, size=(2, 16)).astype(np.int32)
    masked_lm, classifier = BertForMaskedLM(encoder), BertClassifier(encoder, num_classes=3)
    pretrained = init_variables(masked_lm, tokens_BxL)["params"]
    fresh = init_params(classifier, tokens_BxL)

    def shapes(tree):
        return jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)

    assert shapes(pretrained["encoder"]) == shapes(fresh["encoder"])
    restored = {"params": {**jax.tree.map(jnp.zeros_like, fresh), "encoder": pretrained["encoder"]}}

    def encode(model, variables):
        return model.apply(variables, tokens_BxL, method=lambda bound, tokens: bound.encoder(tokens))

    @jax.jit
    def outputs(restored, pretrained):
        """Both encoders' states and the classifier's logits, compiled once."""
        logits_BxK = classifier.apply(restored, tokens_BxL)
        return encode(classifier, restored), encode(masked_lm, {"params": pretrained}), logits_BxK

    restored_BxLxD, pretrained_BxLxD, logits_BxK = outputs(restored, pretrained)
    np.testing.assert_array_equal(restored_BxLxD, pretrained_BxLxD)
    assert logits_BxK.shape == (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_bert_pretraining_and_cloze_heads_share_the_masked_lm_tree(tie_embeddings):
    encoder = BertEncoder(**TINY_BERT, pre_layer_norm=True)
    tokens_BxL = np.random.default_rng(3).integers(1, 50, size=(2, 16)).astype(np.int32)
    segments_BxL = (np.arange(16) >= 7).astype(np.int32)[None].repeat(2, 0)
    masked_lm = init_variables(BertForMaskedLM(encoder, tie_embeddings), tokens_BxL)["params"]
    pretraining = BertForPreTraining(encoder, tie_embeddings)
    both = init_variables(pretraining, tokens_BxL)["params"]
    assert set(both) == set(masked_lm) | {"pooler", "next_sentence"} and ("mlm_output" in both) != tie_embeddings
    classifier = init_params(BertClassifier(encoder, num_classes=3, pooling="cls"), tokens_BxL)
    assert jax.tree.map(jnp.shape, classifier["pooler"]) == jax.tree.map(jnp.shape, both["pooler"])  # transfers by name
    logits_BxLxV, next_Bx2 = pretraining.apply({"params": both}, tokens_BxL, None, segments_BxL)
    np.testing.assert_allclose(
        logits_BxLxV,
        BertForMaskedLM(encoder, tie_embeddings).apply(
            {"params": {key: value for key, value in both.items() if key in masked_lm}}, tokens_BxL, None, segments_BxL
        ),
        atol=1e-6,
    )
    assert next_Bx2.shape == (2, 2)
    # The cloze classifier is the masked LM read at one position, for the label words only.
    label_ids = (7, 3, 41)
    cloze = BertClozeClassifier(encoder, tie_embeddings, position=4, label_ids=label_ids)
    assert jax.tree.map(jnp.shape, init_params(cloze, tokens_BxL)) == jax.tree.map(jnp.shape, masked_lm)
    full_BxLxV = BertForMaskedLM(encoder, tie_embeddings).apply({"params": masked_lm}, tokens_BxL)
    np.testing.assert_allclose(
        cloze.apply({"params": masked_lm}, tokens_BxL), full_BxLxV[:, 4][:, label_ids], atol=1e-6
    )


def test_bert_padding_mask_and_bidirectional_attention():
    model = BertForMaskedLM(BertEncoder(**TINY_BERT, num_segments=0, pre_layer_norm=True))
    tokens_BxL = np.random.default_rng(1).integers(0, 50, size=(2, 16)).astype(np.int32)
    mask_BxL = (np.arange(16) < np.array([[10], [16]])).astype(np.int32)  # the first sequence has 6 padding tokens
    variables = init_variables(model, tokens_BxL, mask_BxL)
    apply = jax.jit(functools.partial(model.apply, variables))
    logits_BxLxV = apply(tokens_BxL, mask_BxL)
    assert logits_BxLxV.shape == (2, 16, 50) and logits_BxLxV.dtype == jnp.float32
    repadded_BxL = tokens_BxL.copy()
    repadded_BxL[0, 10:] = (repadded_BxL[0, 10:] + 1) % 50
    np.testing.assert_array_equal(apply(repadded_BxL, mask_BxL)[0, :10], logits_BxLxV[0, :10])
    unmasked = apply(repadded_BxL, np.ones_like(mask_BxL))
    assert np.abs(unmasked[0, :10] - logits_BxLxV[0, :10]).max() > 0, "without the mask, padding is attended to"
    changed_BxL = tokens_BxL.copy()
    changed_BxL[1, -1] = (changed_BxL[1, -1] + 1) % 50
    assert np.abs(apply(changed_BxL, mask_BxL)[1, 0] - logits_BxLxV[1, 0]).max() > 0, "the first token sees the last"


@pytest.mark.slow
def test_bert_classifier_mean_pooling_averages_the_real_tokens():
    encoder = BertEncoder(**TINY_BERT, num_segments=0, pre_layer_norm=True)
    tokens_BxL = np.random.default_rng(2).integers(1, 50, size=(2, 16)).astype(np.int32)
    mask_BxL = (np.arange(16) < np.array([[5], [16]])).astype(np.int32)
    model = BertClassifier(encoder, num_classes=3, pooling="mean")
    variables = init_variables(model, tokens_BxL, mask_BxL)
    states_BxLxD = model.apply(
        variables, tokens_BxL, mask_BxL, method=lambda bound, tokens, mask: bound.encoder(tokens, mask)
    )
    head = variables["params"]
    mean_BxD = np.stack([states_BxLxD[0, :5].mean(0), states_BxLxD[1].mean(0)])
    pooled_BxD = np.tanh(mean_BxD @ head["pooler"]["kernel"] + head["pooler"]["bias"])
    expected_BxK = pooled_BxD @ head["classifier"]["kernel"] + head["classifier"]["bias"]
    np.testing.assert_allclose(model.apply(variables, tokens_BxL, mask_BxL), expected_BxK, atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be 'cls' or 'mean', not 'max'"):
        BertClassifier(encoder, num_classes=3, pooling="max").init(key(0), tokens_BxL)


# ViT --------------------------------------------------------------------------------------------


def vit_param_formula(num_classes, patch_size, num_layers, width, mlp_dim, image_size, channels=3, **_):
    """Patch embedding, [CLS], positions, per block (2 LayerNorms, attention, MLP), final LayerNorm, head."""
    patches = (image_size // patch_size) ** 2
    block = 2 * 2 * width + (4 * width * width + 4 * width) + (2 * width * mlp_dim + mlp_dim + width)
    embedding = patch_size * patch_size * channels * width + width + width + (patches + 1) * width
    return embedding + num_layers * block + 2 * width + width * num_classes + num_classes


def test_vit_param_counts():
    base = dict(num_classes=1000, patch_size=16, num_layers=12, num_heads=12, width=768, mlp_dim=3072)
    params = init_params(ViT(**base), jnp.zeros((1, 224, 224, 3)))
    assert param_count(params) == vit_param_formula(**base, image_size=224) == 86_567_656  # ViT-B/16: "86M"
    small = dict(num_classes=10, patch_size=4, num_layers=2, num_heads=2, width=16, mlp_dim=32)
    small_params = init_params(ViT(**small), jnp.zeros((1, 8, 8, 1)))
    assert param_count(small_params) == vit_param_formula(**small, image_size=8, channels=1)


def test_vit_shapes_and_zero_initial_logits():
    model = ViT(num_classes=10, patch_size=4, num_layers=1, num_heads=2, width=16, dropout_rate=0.1)
    images_BxHxWxC = np.random.default_rng(0).normal(size=(3, 8, 8, 1)).astype(np.float32)
    variables = init_variables(model, images_BxHxWxC)
    assert variables["params"]["position_embedding"].shape == (1, 5, 16)
    apply = jit_apply(model)
    logits_BxK = apply(variables, images_BxHxWxC)
    assert logits_BxK.shape == (3, 10) and logits_BxK.dtype == jnp.float32
    np.testing.assert_array_equal(logits_BxK, 0.0)
    head = {"kernel": jnp.ones((16, 10)), "bias": jnp.zeros(10)}
    logits_BxK = apply({"params": variables["params"] | {"head": head}}, images_BxHxWxC)
    assert np.isfinite(logits_BxK).all() and np.abs(logits_BxK[0] - logits_BxK[1]).max() > 0
    with pytest.raises(ValueError, match="patches"):
        jax.eval_shape(model.init, key(0), jnp.zeros((1, 9, 8, 1)))
