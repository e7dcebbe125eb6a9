"""Schedules, penalties, decoupled weight decay, clipping, accumulation, EMA and early stopping, by the numbers."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close, launch
from experiments import cifar10_resnet, digits_mlp, linear_regression
from research import sharding, steps, train
from research.config import optimizer_config
from research.errors import ConfigError
from research.optim import accumulation, make_optimizer, regularizers
from research.optim.schedules import SCHEDULES


def schedule(name: str, **keys) -> optax.Schedule:
    config = optimizer_config().schedule
    config.update(keys)
    return SCHEDULES[name](config, 0.1, 100)


@pytest.mark.parametrize(
    "name, keys, values",
    [
        ("constant", {}, {0: 0.1, 99: 0.1}),
        ("linear_warmup", {"warmup_steps": 10}, {5: 0.05, 20: 0.1}),
        ("cosine", {"final_fraction": 0.1}, {0: 0.1, 50: 0.055, 100: 0.01}),
        (
            "warmup_cosine",
            {"warmup_steps": 10, "decay_steps": 110, "final_fraction": 0.1},
            {5: 0.05, 10: 0.1, 60: 0.055},
        ),
        ("step", {"step_every": 10, "step_factor": 0.1}, {9: 0.1, 10: 0.01, 25: 0.001}),
        ("inverse_sqrt", {"warmup_steps": 4}, {2: 0.05, 4: 0.1, 16: 0.05}),
        (
            "warmup_stable_decay",
            {"warmup_steps": 10, "decay_fraction": 0.2},
            {5: 0.05, 50: 0.1, 80: 0.1, 90: 0.05, 100: 0.0},
        ),
        (
            "piecewise",
            {"boundaries": (30, 60), "factors": (0.1, 0.5)},
            {0: 0.1, 29: 0.1, 30: 0.01, 59: 0.01, 60: 0.005},
        ),
    ],
)
def test_schedules_by_hand(name, keys, values):
    function = schedule(name, **keys)
    for step, value in values.items():
        assert float(function(step)) == pytest.approx(value, abs=1e-7), (name, step)


def test_cifar10_resnet_uses_he_et_al_2016_learning_rates():
    config = cifar10_resnet.get_config()
    learning_rate = SCHEDULES[config.optimizer.schedule.name](
        config.optimizer.schedule, config.optimizer.learning_rate, config.num_steps
    )
    expected = {0: 0.1, 31999: 0.1, 32000: 0.01, 47999: 0.01, 48000: 0.001, 63999: 0.001}
    assert {step: float(learning_rate(step)) for step in expected} == pytest.approx(expected, rel=1e-6)  # float32
    assert (config.num_steps, config.batch_size, config.optimizer.kwargs.momentum, config.optimizer.l2_penalty) == (
        64000,
        128,
        0.9,
        1e-4,
    )


@pytest.mark.parametrize("boundaries, factors", [((30,), (0.1, 0.1)), ((60, 30), (0.1, 0.1)), ((0,), (0.1,))])
def test_piecewise_schedule_rejects_bad_boundaries(boundaries, factors):
    with pytest.raises(ConfigError, match="piecewise schedule: boundaries"):
        schedule("piecewise", boundaries=boundaries, factors=factors)


def test_piecewise_boundaries_from_the_command_line(tmp_path):
    result = launch(
        "--config",
        "experiments/linear_regression.py:smoke",
        "--workdir",
        str(tmp_path),
        "--config.num_steps=6",
        "--config.log_every=1",
        "--config.optimizer.schedule.name=piecewise",
        "--config.optimizer.schedule.boundaries=(2,4)",
        "--config.optimizer.schedule.factors=(0.5,0.1)",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [record["train/learning_rate"] for record in records if "train/learning_rate" in record]
    peak = rates[0]
    assert rates == pytest.approx([peak, peak, peak / 2, peak / 2, peak / 20, peak / 20])


def test_learning_rate_is_logged_every_logging_step(tmp_path):
    config = linear_regression.get_config("smoke")
    config.update_from_flattened_dict({"num_steps": 12, "log_every": 1, "eval_every": 0})
    config.optimizer.schedule.update({"name": "warmup_cosine", "warmup_steps": 4})
    train.train_and_evaluate(
        config, linear_regression, tmp_path, mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1])
    )
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rates = [record["train/learning_rate"] for record in logged if "train/learning_rate" in record]
    expected = SCHEDULES["warmup_cosine"](config.optimizer.schedule, 0.1, 12)
    np.testing.assert_allclose(
        rates, [float(expected(step)) for step in range(12)], atol=1e-7
    )  # update k uses count k-1


PARAMS = {
    "Dense_0": {"kernel": jnp.array([[1.0, -2.0], [3.0, 0.0]]), "bias": jnp.array([5.0, 5.0])},
    "LayerNorm_0": {"scale": jnp.array([7.0])},
}
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)


def test_penalty_spares_biases_and_norm_scales():
    # 0.1 * (1 + 2 + 3) + 0.2 / 2 * (1 + 4 + 9) = 2.0; bias and scale excluded by default.
    value = regularizers.penalty(PARAMS, l1=0.1, l2=0.2, exclude=optimizer_config().decay_exclude)
    assert float(value) == pytest.approx(2.0, abs=1e-6)
    assert float(regularizers.penalty(PARAMS, l1=0.1, l2=0.0, exclude="")) == pytest.approx(0.1 * 23, abs=1e-6)


def one_update(**settings):
    tx = make_optimizer({"name": "sgd", "learning_rate": 0.1} | settings)
    state = tx.init(PARAMS)
    updates, state = tx.update(GRADS, state, PARAMS)
    return optax.apply_updates(PARAMS, updates), state


def test_decoupled_weight_decay_is_masked_and_scaled_by_the_learning_rate():
    params, _ = one_update(weight_decay=0.5)
    expected = jax.tree.map(lambda p: p - 0.1 * 0.5, PARAMS)
    expected["Dense_0"]["kernel"] = PARAMS["Dense_0"]["kernel"] * (1 - 0.1 * 0.5) - 0.05
    assert_trees_close(params, expected)


def test_clipping_by_global_norm():
    # ||g|| = 0.5 * sqrt(7) > 1: every gradient is scaled by 1 / (0.5 sqrt 7).
    params, _ = one_update(clip_global_norm=1.0)
    assert_trees_close(params, jax.tree.map(lambda p: p - 0.1 / math.sqrt(7), PARAMS))


def test_ema_of_params_is_what_evaluation_uses():
    params, state = one_update(ema_decay=0.75)
    ema = regularizers.eval_params(params, state)
    assert_trees_close(ema, jax.tree.map(lambda p, q: 0.75 * p + 0.25 * q, PARAMS, params))
    assert regularizers.eval_params(params, one_update()[1]) is params


def test_schedule_free_evaluates_its_averaged_sequence():
    tx = make_optimizer({"name": "schedule_free_adamw", "learning_rate": 0.1})
    state = tx.init(PARAMS)
    for _ in range(2):
        updates, state = tx.update(GRADS, state, PARAMS)
    params = optax.apply_updates(PARAMS, updates)
    free = state[0].inner_state  # chain -> inject_hyperparams -> ScheduleFreeState
    assert isinstance(free, optax.contrib.ScheduleFreeState)
    expected = jax.tree.map(lambda y, z: (y - (1.0 - free.b1) * z) / free.b1, params, free.z)
    assert_trees_close(regularizers.eval_params(params, state), expected)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "momentum"])
def test_accumulating_k_micro_batches_equals_the_large_batch_step(name, data_dir):
    """The train step's scan over 4 micro-batches of 16 gives the 64-example step, 3 steps running."""
    config = digits_mlp.get_config("smoke")
    config.data_dir = data_dir
    config.optimizer.update({"name": name, "learning_rate": 0.05, "clip_global_norm": 1.0, "weight_decay": 0.01})
    config.num_steps = 100
    mesh = sharding.make_mesh({"data": -1})  # 8 devices: each micro-batch stays split over them
    iterator = iter(digits_mlp.make_data(config, "train"))
    host_batches = [next(iterator) for _ in range(3)]
    setup = steps.build(config, digits_mlp, mesh, batch=host_batches[0])
    batches = [sharding.put_batch(batch, mesh) for batch in host_batches]
    state = setup.init_state(jax.random.PRNGKey(0))
    finals = {}
    for k in (1, 4):
        step = jax.jit(functools.partial(steps.train_step, loss_fn=setup.loss_fn, tx=setup.tx, accumulate_steps=k))
        current = state
        for batch in batches:
            current, metrics = step(current, batch)
        finals[k] = (current.params, metrics["loss"])
    assert_trees_close(finals[4][0], finals[1][0], atol=1e-6)
    assert float(finals[4][1]) == pytest.approx(float(finals[1][1]), abs=1e-6)


def test_micro_batches_interleave_rows():
    micro = accumulation.micro_batches({"x": jnp.arange(8)}, 4)
    np.testing.assert_array_equal(micro["x"], [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_early_stopping_ends_the_run(tmp_path):
    config = linear_regression.get_config("smoke")
    # In "max" mode a falling mse never improves: the run stops after 1 + patience evaluations.
    config.update_from_flattened_dict(
        {
            "num_steps": 100,
            "eval_every": 10,
            "early_stopping.metric": "mse",
            "early_stopping.mode": "max",
            "early_stopping.patience": 2,
        }
    )
    train.train_and_evaluate(
        config, linear_regression, tmp_path, mesh=sharding.make_mesh({"data": 1}, jax.devices()[:1])
    )
    assert json.loads((tmp_path / "results.json").read_text())["step"] == 30


def train_digits(data_dir, l1: float, num_steps: int):
    """Kernel magnitudes before and after `num_steps` Adam steps with an L1 penalty, and the test accuracy."""
    config = digits_mlp.get_config("smoke")
    config.data_dir, config.optimizer.l1_penalty, config.num_steps = data_dir, l1, num_steps
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    iterator = iter(digits_mlp.make_data(config, "train"))
    batch = next(iterator)
    setup = steps.build(config, digits_mlp, mesh, batch=batch)
    state, batch, step_fn, eval_fn = (
        setup.init_state(jax.random.PRNGKey(0)),
        sharding.put_batch(batch, mesh),
        setup.train_step,
        setup.eval_step,
    )
    initial = [
        np.abs(np.asarray(leaf)).ravel()
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
        if "kernel" in str(path)
    ]
    for _ in range(num_steps):
        state, _ = step_fn(state, batch)
        batch = sharding.put_batch(next(iterator), mesh)
    kernels = [
        np.abs(np.asarray(leaf)).ravel()
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
        if "kernel" in str(path)
    ]
    accuracy = train.evaluate(state, digits_mlp.make_data(config, "test"), step_fn=eval_fn, mesh=mesh)["accuracy"]
    return np.concatenate(initial), np.concatenate(kernels), accuracy


@pytest.mark.slow
def test_l1_drives_digits_mlp_weights_to_zero(data_dir):
    """Measured after 200 steps with l1 1e-3: 38% of kernel weights below 1e-3 (0.8% at init, 0.5%
    after 300 steps without L1), test accuracy 0.91 (0.94 without)."""
    initial, sparse, accuracy = train_digits(data_dir, 1e-3, num_steps=200)
    print(
        f"kernel weights below 1e-3: {np.mean(initial < 1e-3):.3f} at init, {np.mean(sparse < 1e-3):.3f} after; "
        f"accuracy {accuracy:.3f}"
    )
    assert np.mean(initial < 1e-3) < 0.02
    assert np.mean(sparse < 1e-3) > 0.25
    assert accuracy > 0.88


def test_float32_moments_and_master_weights_for_bfloat16_parameters():
    """moment_dtype float32 keeps Adam's moments in float32 for bfloat16 parameters; with master weights, 200 SGD
    steps of 1e-4 on a parameter of 1.0 (each far below bfloat16's step there, 2^-7) reach 0.98 as in float32, and
    the parameter is the float32 copy rounded; without the copy each update is lost."""
    from research.optim import make_optimizer

    params = {"w": jnp.ones((4,), jnp.bfloat16)}
    adam = make_optimizer({"name": "adam", "learning_rate": 1e-3, "moment_dtype": "float32"})
    moments = [leaf for leaf in jax.tree.leaves(adam.init(params)) if leaf.shape == (4,)]
    assert moments and all(leaf.dtype == jnp.float32 for leaf in moments)

    def trained(master: bool, dtype=jnp.bfloat16):
        tx = make_optimizer({"name": "sgd", "learning_rate": 1e-4, "master_weights": master})
        values = {"w": jnp.ones((4,), dtype)}
        state = tx.init(values)
        step = jax.jit(lambda values, state: tx.update({"w": jnp.ones((4,), dtype)}, state, values))
        for _ in range(200):
            updates, state = step(values, state)
            values = optax.apply_updates(values, updates)
        return values["w"], state

    exact, _ = trained(False, jnp.float32)
    kept, state = trained(True)
    lost, _ = trained(False)
    assert float(exact[0]) == pytest.approx(0.98, abs=1e-5) and float(lost[0]) == 1.0
    assert kept.dtype == jnp.bfloat16 and float(kept[0]) == float(jnp.asarray(0.98, jnp.bfloat16))
    assert float(state.master["w"][0]) == pytest.approx(0.98, abs=1e-5)
