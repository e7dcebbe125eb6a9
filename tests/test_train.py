import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import assert_trees_close, read_metrics
from experiments import digits_mlp, linear_regression
from research import early_stopping, metrics, sharding, steps, train
from research.errors import ConfigError


def smoke_config(data_dir, **overrides):
    config = digits_mlp.get_config("smoke")
    config.data_dir = data_dir
    config.update_from_flattened_dict(overrides)
    return config


def first_batch_and_state(config):
    """(setup, fresh state, first batch on the mesh) of digits_mlp under `config`."""
    setup = steps.build(config, digits_mlp)
    batch = sharding.put_batch(next(iter(digits_mlp.make_data(config, "train"))), setup.mesh)
    return setup, setup.init_state(jax.random.PRNGKey(0)), batch


def test_train_step_is_pure(data_dir):
    setup, state, batch = first_batch_and_state(smoke_config(data_dir))
    step = jax.jit(
        functools.partial(steps.train_step, loss_fn=setup.loss_fn, tx=setup.tx)
    )  # the same step, state not donated
    first_state, first_metrics = step(state, batch)
    second_state, second_metrics = step(state, batch)
    assert_trees_close(first_state, second_state, atol=0.0)
    assert_trees_close(first_metrics, second_metrics, atol=0.0)
    assert int(state.step) == 0 and int(first_state.step) == 1
    moved = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), first_state.params, state.params
    )
    assert min(jax.tree.leaves(moved)) > 0.0, "every parameter should move after one Adam step"


@pytest.mark.slow
def test_data_parallel_over_8_devices_matches_1_device(data_dir, tmp_path):
    assert jax.device_count() == 8
    config = smoke_config(data_dir, num_steps=8, log_every=1, eval_every=0)
    runs = {}
    for devices in (jax.devices(), jax.devices()[:1]):
        workdir = tmp_path / f"devices{len(devices)}"
        final = train.train_and_evaluate(config, digits_mlp, workdir, mesh=sharding.make_mesh(config.mesh, devices))
        losses = [record["train/loss"] for record in read_metrics(workdir) if "train/loss" in record]
        runs[len(devices)] = (np.array(losses), final)
    assert len(runs[8][0]) == 8
    np.testing.assert_allclose(runs[8][0], runs[1][0], atol=1e-5)
    for name, value in runs[1][1].items():
        assert runs[8][1][name] == pytest.approx(value, abs=1e-5), name


def test_eval_counts_every_example_once_whatever_the_batch_size(data_dir):
    config = smoke_config(data_dir)
    setup, state, _ = first_batch_and_state(config)
    mesh, step_fn = setup.mesh, setup.eval_step
    results = {}
    for eval_batch_size in (64, 1800):  # 1797 test images: 29 batches with 5 padded rows, or 1 with 3
        config.eval_batch_size = eval_batch_size
        dataset = digits_mlp.make_data(config, "test")
        accumulated = None
        for batch in dataset:
            accumulated = metrics.merge(accumulated, step_fn(state, sharding.put_batch(batch, mesh)))
        assert float(accumulated["accuracy"].count) == 1797.0
        assert float(accumulated["confusion"].counts_CxC.sum()) == 1797.0
        results[eval_batch_size] = train.evaluate(state, dataset, step_fn=step_fn, mesh=mesh)
    for name, value in results[64].items():
        assert results[1800][name] == pytest.approx(value, rel=1e-5), name


def test_loss_as_eval_fn_weights_by_real_examples(data_dir):
    config = linear_regression.get_config("smoke")
    model = linear_regression.make_model(config)
    eval_fn = steps.loss_as_eval_fn(functools.partial(linear_regression.loss_fn, model=model))
    params = {"kernel": np.array([[1.0]], np.float32), "bias": np.array([0.0], np.float32)}
    batch = {
        "inputs": np.array([[1.0], [2.0], [9.0]], np.float32),
        "targets": np.array([[2.0], [2.0], [0.0]], np.float32),
        "mask": np.array([1.0, 1.0, 0.0], np.float32),
    }
    loss = eval_fn(params, batch)["loss"]
    assert float(loss.count) == 2.0 and float(loss.compute()) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "axes, message",
    [
        ({"data": -1, "fsdp": -1}, "at most one axis"),
        ({"data": 3, "fsdp": -1}, "do not divide"),
        ({"data": 4}, "needs 4 devices"),
    ],
)
def test_bad_mesh_is_a_config_error(axes, message):
    with pytest.raises(ConfigError, match=message):
        sharding.make_mesh(axes)


def test_batch_not_divisible_by_mesh_is_a_config_error(data_dir, tmp_path):
    config = smoke_config(data_dir, batch_size=60)
    with pytest.raises(ConfigError, match="multiple of the 8 batch shards"):
        train.train_and_evaluate(config, digits_mlp, tmp_path)


class ShiftedBatchNormRegression(nn.Module):
    """BatchNorm then one Dense unit: exercises model_state (running statistics)."""

    @nn.compact
    def __call__(self, inputs, train: bool):
        return nn.Dense(1)(nn.BatchNorm(use_running_average=not train, momentum=0.9)(inputs))


def test_model_state_is_updated_in_training_and_used_in_evaluation(tmp_path):
    config = linear_regression.get_config("smoke")
    config.checkpoint.every_steps = 0

    def make_data(config, split):  # inputs shifted by +5 so the running mean has somewhere to go
        return (dict(batch, inputs=batch["inputs"] + 5.0) for batch in linear_regression.make_data(config, split))

    def loss_fn(params, batch, rng, *, model, model_state):
        predictions, updated = model.apply(
            {"params": params, **model_state}, batch["inputs"], train=True, mutable=["batch_stats"]
        )
        return metrics.masked_mean(jnp.square(predictions - batch["targets"]), batch["mask"][:, None]), {
            "model_state": updated
        }

    def eval_fn(params, batch, *, model, model_state):
        predictions = model.apply({"params": params, **model_state}, batch["inputs"], train=False)
        return {"mse": metrics.MeanSquaredError.from_predictions(predictions, batch["targets"], batch["mask"][:, None])}

    experiment = types.SimpleNamespace(
        make_data=make_data,
        make_model=lambda config: ShiftedBatchNormRegression(),
        loss_fn=loss_fn,
        eval_fn=eval_fn,
        init_variables=lambda model, rng, batch: model.init(rng, batch["inputs"], train=False),
    )
    final = train.train_and_evaluate(config, experiment, tmp_path)
    # With the initial statistics (mean 0, variance 1) the shift alone would cost an MSE near 75.
    assert final["test/mse"] < 0.5
    state = ocp.CheckpointManager(tmp_path / "checkpoints").restore(
        100, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    assert float(state["model_state"]["batch_stats"]["BatchNorm_0"]["mean"][0]) == pytest.approx(5.0, abs=0.1)


def test_should_stop_after_patience_evaluations_without_improvement():
    assert early_stopping.should_stop([1.0, 0.9, 0.95, 0.93], mode="min", patience=2)
    assert not early_stopping.should_stop([1.0, 0.9, 0.95, 0.85], mode="min", patience=2)
    assert not early_stopping.should_stop([1.0, 0.9, 0.95], mode="min", patience=2)
    assert early_stopping.should_stop([0.5, 0.7, 0.6], mode="max", patience=1)
