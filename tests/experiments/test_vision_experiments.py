"""Vision experiments: each smoke config learns, configs build the stated models, and the CIFAR-10
experiment runs its whole pipeline (tfds builder, crop + flip, BatchNorm state) on a generated archive."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import smoke_config, train_losses, write_cifar_archive
from experiments import cifar10_resnet, mnist_cnn, mnist_logreg, mnist_mlp, vit_digits
from research import checkpoint, train
from research.data import augment, cifar10, files, mnist
from research.models.mlp import MLP
from research.steps import default_init_variables

# (last logged loss at most this fraction of the first, test accuracy at least): measured, the
# last losses were 0.55, 0.66, 0.42, 0.24 and 0.83 of the first, the test accuracies 0.57,
# 0.74, 0.80, 0.75 and 0.41 (chance is 0.1).
SMOKE_BARS = {
    "mnist_cnn": (0.75, 0.4),
    "mnist_mlp": (0.8, 0.6),
    "mnist_logreg": (0.6, 0.65),
    "cifar10_resnet": (0.5, 0.5),
    "vit_digits": (0.92, 0.3),
}


@pytest.mark.parametrize("name", list(SMOKE_BARS))
def test_smoke_config_learns(name, data_dir, smoke_runs):
    _, config = smoke_config(name, data_dir)
    workdir, final = smoke_runs[name]
    losses = train_losses(workdir)
    loss_fraction, min_accuracy = SMOKE_BARS[name]
    assert len(losses) == config.num_steps // config.log_every
    assert losses[-1] < loss_fraction * losses[0], losses
    assert final["test/accuracy"] >= min_accuracy


def parameter_count(module, arg: str | None = None, **overrides) -> int:
    config = module.get_config(arg)
    config.update_from_flattened_dict(overrides)
    model = module.make_model(config)
    shape = {cifar10_resnet: (1, 32, 32, 3), mnist_cnn: (1, 28, 28, 1), vit_digits: (1, 28, 28, 1)}.get(
        module, (1, 784)
    )
    init = getattr(module, "init_variables", default_init_variables)
    variables = jax.eval_shape(lambda rng: init(model, rng, {"inputs": jnp.zeros(shape)}), jax.random.PRNGKey(0))
    return sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))


def test_configs_build_the_stated_models():
    # conv 3x3x1x64 + 3x3x64x128 + dense 6272x1000 + 1000x10, with biases.
    assert parameter_count(mnist_cnn) == 640 + 73856 + 6273000 + 10010
    assert parameter_count(mnist_mlp) == 785000 + 1001000 + 10010
    assert parameter_count(mnist_logreg) == 7850
    # He et al. 2016, Table 6: 0.27M, 0.46M, 0.85M parameters.
    counts = [parameter_count(cifar10_resnet, **{"model.depth": depth}) for depth in (20, 32, 56)]
    assert [round(count / 1e6, 2) for count in counts] == [0.27, 0.46, 0.85]
    # Patch embedding 7x7x1x64 + 64, [CLS] 64, positions 17x64, 4 blocks of (2 LayerNorms,
    # Q/K/V/out 64x64 + 64, MLP 64x128 + 128 and 128x64 + 64), final LayerNorm, head 64x10 + 10.
    block = 2 * 128 + 4 * (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    assert parameter_count(vit_digits) == 3200 + 64 + 17 * 64 + 4 * block + 128 + 650


def test_mlp_dropout_only_in_training():
    model = MLP(features=(64, 10), dropout_rate=0.5, input_dropout_rate=0.2)
    inputs = jnp.ones((4, 16))
    params = model.init(jax.random.PRNGKey(0), inputs)["params"]
    first, second = (
        model.apply({"params": params}, inputs, train=True, rngs={"dropout": jax.random.PRNGKey(seed)})
        for seed in (1, 2)
    )
    assert float(jnp.max(jnp.abs(first - second))) > 1e-3
    np.testing.assert_array_equal(model.apply({"params": params}, inputs), model.apply({"params": params}, inputs))


@pytest.mark.slow
def test_cifar10_resnet_full_pipeline_on_a_generated_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "online", lambda url: False)
    data_dir = tmp_path / "data"
    manual = files.manual_dir(str(data_dir))
    manual.mkdir(parents=True)
    written = write_cifar_archive(
        manual / cifar10.ARCHIVE, {f"data_batch_{number}.bin": 40 for number in range(1, 6)} | {"test_batch.bin": 40}
    )
    config = cifar10_resnet.get_config("smoke")
    config.update_from_flattened_dict(
        {"data.name": "cifar10", "data_dir": str(data_dir), "num_steps": 6, "log_every": 3}
    )

    train_batch = next(iter(cifar10_resnet.make_data(config, "train")))
    assert train_batch["inputs"].shape == (32, 32, 32, 3) and train_batch["inputs"].dtype == np.float32
    # 4-pixel zero padding shows as the normalized value of black somewhere in most crops.
    black = (0.0 - augment.CIFAR10_MEAN[0]) / augment.CIFAR10_STD[0]
    assert np.mean([np.isclose(image[..., 0], black).any() for image in train_batch["inputs"]]) > 0.9
    test_masks = [batch["mask"] for batch in cifar10_resnet.make_data(config, "test")]
    assert sum(float(mask.sum()) for mask in test_masks) == 40.0

    final = train.train_and_evaluate(config, cifar10_resnet, tmp_path / "run")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(tmp_path / "run" / checkpoint.CHECKPOINT_DIR, options=options) as manager:
        state = manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    # The reported test metrics are the saved model's (running averages, no augmentation) on the 40 test images as
    # written, each counted once: recomputed here from the archive's arrays, outside the data pipeline.
    images_NxHxWxC, labels_N = written["test_batch.bin"]
    mean, std = np.asarray(augment.CIFAR10_MEAN, np.float32), np.asarray(augment.CIFAR10_STD, np.float32)
    inputs_NxHxWxC = (images_NxHxWxC.astype(np.float32) / 255.0 - mean) / std
    variables = {"params": state["params"], **state["model_state"]}
    logits_NxK = cifar10_resnet.make_model(config).apply(variables, inputs_NxHxWxC, train=False)
    cross_entropy_N = -jnp.take_along_axis(jax.nn.log_softmax(logits_NxK), labels_N[:, None], axis=-1)[:, 0]
    accuracy = float(np.mean(np.argmax(logits_NxK, -1) == labels_N))
    assert final["test/accuracy"] == pytest.approx(accuracy, abs=1e-6)  # one example more or less is 0.025
    assert final["test/loss"] == pytest.approx(float(jnp.mean(cross_entropy_N)), rel=1e-5)
    # Running averages start at mean 0 and variance 1; six training steps must have moved them.
    stem = state["model_state"]["batch_stats"]["stem_norm"]
    assert float(np.max(np.abs(stem["mean"]))) > 1e-3
    assert float(np.max(np.abs(stem["var"] - 1.0))) > 1e-3


def test_mnist_random_shift_moves_the_digit_and_keeps_its_ink():
    image = np.zeros((28, 28), np.uint8)
    image[10:14, 10:14] = 255
    shifted = [
        augment.random_shift(
            {"image": image, "label": 3}, np.random.default_rng(seed), max_shift=2, scale=mnist.MAX_PIXEL
        )
        for seed in range(60)
    ]
    assert {example["inputs"].shape for example in shifted} == {(28, 28, 1)} and {
        int(example["labels"]) for example in shifted
    } == {3}
    assert {float(example["inputs"].sum()) for example in shifted} == {16.0}
    corners = {tuple(int(i) for i in np.argwhere(example["inputs"][..., 0])[0]) for example in shifted}
    assert all(8 <= row <= 12 and 8 <= column <= 12 for row, column in corners) and len(corners) >= 15
