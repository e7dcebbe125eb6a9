"""Checkpoints: exact resume for every experiment, fallbacks, non-finite steps, topology, init_from."""

import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import assert_trees_close, smoke_config
from research import checkpoint, sharding, train
from research.config import trainer_config
from research.errors import ConfigError, NonFiniteError
from research.experiment import describe, load
from research.steps import build

EXPERIMENTS = [name for name, _ in describe("experiments")]


def smoke(name, data_dir, **overrides):
    module = load(f"experiments/{name}.py")
    config = module.get_config("smoke")
    config.data_dir = data_dir
    config.update_from_flattened_dict({"log_every": 1, "eval_every": 0, "checkpoint.every_steps": 0} | overrides)
    return module, config


def saved_state(workdir, step):
    """The train state saved at `step`, as host arrays."""
    with ocp.CheckpointManager(
        workdir / checkpoint.CHECKPOINT_DIR, options=ocp.CheckpointManagerOptions(read_only=True)
    ) as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def losses_by_step(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["train/loss"] for record in records if "train/loss" in record}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_resume_is_bitwise_exact(name, data_dir, tmp_path, smoke_runs):
    """The :smoke run stopped at a logging step near its middle, as a preemption would, then resumed:
    every logged loss, the final state and the final metrics are those of the session's uninterrupted run."""
    straight, final = smoke_runs[name]
    module, config = smoke_config(name, data_dir)
    stop = max(config.num_steps // 2 // config.log_every, 1) * config.log_every
    assert train.train_and_evaluate(config, module, tmp_path, stop_at_step=stop) == {}
    assert sorted(checkpoint_steps(tmp_path)) == [stop]
    resumed_final = train.train_and_evaluate(config, module, tmp_path)
    assert_trees_close(saved_state(tmp_path, config.num_steps), saved_state(straight, config.num_steps), atol=0.0)
    assert losses_by_step(tmp_path) == losses_by_step(straight)  # every logged loss, before and after the stop
    assert resumed_final == final


def checkpoint_steps(workdir):
    return [int(path.name) for path in (workdir / checkpoint.CHECKPOINT_DIR).iterdir() if path.name.isdigit()]


def test_changed_config_is_refused_unless_allowed(data_dir, tmp_path):
    module, config = smoke("linear_regression", data_dir, num_steps=6)
    train.train_and_evaluate(config, module, tmp_path, stop_at_step=3)
    config.optimizer.learning_rate = 0.05
    with pytest.raises(ConfigError, match=r"optimizer.learning_rate: 0.1 -> 0.05 \(pass --allow_config_change"):
        train.train_and_evaluate(config, module, tmp_path)
    train.train_and_evaluate(config, module, tmp_path, allow_config_change=True)
    # Allowed, the run goes on from its step-3 checkpoint (each step logged once: no restart, and the refused call
    # trained nothing) under the changed learning rate.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [record for record in records if "train/loss" in record]
    assert [record["step"] for record in trained] == [1, 2, 3, 4, 5, 6]
    assert [record["train/learning_rate"] for record in trained] == pytest.approx([0.1] * 3 + [0.05] * 3)


def test_unreadable_latest_checkpoint_falls_back_and_is_kept(data_dir, tmp_path, capsys):
    module, config = smoke(
        "linear_regression", data_dir, num_steps=8, **{"checkpoint.every_steps": 4, "checkpoint.asynchronous": False}
    )
    train.train_and_evaluate(config, module, tmp_path, stop_at_step=6)  # saves 4 and 6
    for path in (tmp_path / checkpoint.CHECKPOINT_DIR / "6" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")
    train.train_and_evaluate(config, module, tmp_path)
    assert re.search(r"checkpoint at step 6 in \S+ is unreadable", capsys.readouterr().out)
    assert [path.name.split("-")[0] for path in (tmp_path / checkpoint.UNREADABLE_DIR).iterdir()] == ["6"]
    reference = tmp_path / "reference"
    train.train_and_evaluate(config, module, reference)
    assert_trees_close(saved_state(tmp_path, 8), saved_state(reference, 8), atol=0.0)


def test_non_finite_loss_stops_the_run_without_saving_it(data_dir, tmp_path):
    # SGD at learning rate 30 on this regression diverges to inf within a few dozen steps.
    module, config = smoke(
        "linear_regression", data_dir, num_steps=100, **{"optimizer.learning_rate": 30.0, "checkpoint.every_steps": 1}
    )
    with pytest.raises(
        NonFiniteError, match=r"non-finite loss or gradients at step (\d+).*last good checkpoint is step"
    ) as error:
        train.train_and_evaluate(config, module, tmp_path)
    bad_step = int(error.value.args[0].split("at step ")[1].split(" ")[0])
    steps = checkpoint_steps(tmp_path)
    assert max(steps) < bad_step
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved_state(tmp_path, max(steps))["params"]))


def test_skip_mode_skips_non_finite_updates_and_counts_them(data_dir, tmp_path):
    module, config = smoke("linear_regression", data_dir, num_steps=100, nonfinite="skip", log_every=100)

    def sometimes_nan_loss(params, batch, rng, *, model):
        loss, aux = module.loss_fn(params, batch, rng, model=model)
        poisoned = rng is not None and jax.random.uniform(jax.random.fold_in(rng, 7)) < 0.2
        return jnp.where(poisoned, jnp.nan, loss), aux

    experiment = types.SimpleNamespace(
        **{name: getattr(module, name) for name in ("make_data", "make_model", "eval_fn")}
    )
    experiment.loss_fn = sometimes_nan_loss
    final = train.train_and_evaluate(config, experiment, tmp_path)
    record = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][0]
    assert 5 <= record["train/skipped_steps"] <= 40
    assert final["test/slope"] == pytest.approx(3.0, abs=0.1)


def test_checkpoint_from_8_devices_restores_on_1(data_dir, tmp_path):
    module, config = smoke("digits_mlp", data_dir, num_steps=3)
    train.train_and_evaluate(config, module, tmp_path)
    restored = {}
    for devices in (jax.devices()[:1], jax.devices()):
        iterator = iter(module.make_data(config, "train"))
        setup = build(config, module, sharding.make_mesh(config.mesh, devices), batch=next(iterator))
        manager = checkpoint.make_manager(tmp_path, config.checkpoint)
        state, _ = checkpoint.restore(manager, 3, setup.abstract_state, iterator)
        manager.close()
        assert {leaf.sharding.mesh.size for leaf in jax.tree.leaves(state)} == {len(devices)}
        restored[len(devices)] = jax.device_get(state)
    assert_trees_close(restored[1], restored[8], atol=0.0)
    assert_trees_close(restored[1].params, saved_state(tmp_path, 3)["params"], atol=0.0)


def test_saving_a_small_replicated_state_compiles_nothing(tmp_path):
    """Orbax would write each replica's slice of a replicated array, one eager slicing program per
    shape and offset; below MIN_REPLICA_SLICE_BYTES one replica writes the whole array instead."""
    mesh = sharding.make_mesh({"data": 8})
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {name: jax.device_put(jnp.full(shape, 0.5), replicated) for name, shape in (("w", (64, 48)), ("b", (48,)))}
    compiled = []
    listener = lambda event, duration, **kwargs: compiled.append(event)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with checkpoint.tier_manager(tmp_path, trainer_config().checkpoint) as manager:
            manager.save(0, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state)), force=True)
            manager.wait_until_finished()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled.count("/jax/core/compile/jaxpr_trace_duration") == 0
    assert_trees_close(saved_state(tmp_path, 0), jax.device_get(state), atol=0.0)


@pytest.mark.slow
def test_init_from_loads_matching_parameters_and_freeze_keeps_them(data_dir, tmp_path, capsys):
    module, config = smoke("digits_mlp", data_dir, num_steps=20)
    train.train_and_evaluate(config, module, tmp_path / "pretrained")
    pretrained = saved_state(tmp_path / "pretrained", 20)["params"]
    _, config = smoke("digits_mlp", data_dir, num_steps=5, freeze="Dense_0/")
    config.init_from.workdir = str(tmp_path / "pretrained")
    config.init_from.exclude = "Dense_2"
    train.train_and_evaluate(config, module, tmp_path / "finetuned")
    assert "loaded 4 arrays; left at random init: Dense_2/bias, Dense_2/kernel" in capsys.readouterr().out
    finetuned = saved_state(tmp_path / "finetuned", 5)["params"]
    assert_trees_close(finetuned["Dense_0"], pretrained["Dense_0"], atol=0.0)  # loaded and frozen
    assert not np.allclose(finetuned["Dense_1"]["kernel"], pretrained["Dense_1"]["kernel"])  # loaded, then trained


@pytest.mark.slow
def test_init_from_with_mismatched_shapes_is_an_error(data_dir, tmp_path):
    module, config = smoke("digits_mlp", data_dir, num_steps=2)
    train.train_and_evaluate(config, module, tmp_path / "source")
    _, config = smoke("digits_mlp", data_dir, num_steps=2, **{"model.features": (48, 32, 10)})
    config.init_from.workdir = str(tmp_path / "source")
    with pytest.raises(ConfigError, match=r"init_from: shapes differ for Dense_0/bias \(64,\) vs \(48,\)"):
        train.train_and_evaluate(config, module, tmp_path / "target")


def test_keeps_the_latest_plus_the_best_by_the_chosen_metric(data_dir, tmp_path):
    # "best" = highest eval/mse, i.e. the earliest evaluation: it must survive keep=1.
    module, config = smoke(
        "linear_regression",
        data_dir,
        num_steps=40,
        eval_every=10,
        **{
            "checkpoint.every_steps": 5,
            "checkpoint.keep": 1,
            "checkpoint.best_metric": "eval/mse",
            "checkpoint.best_mode": "max",
        },
    )
    train.train_and_evaluate(config, module, tmp_path)
    assert sorted(checkpoint_steps(tmp_path)) == [10, 40]


def test_restoring_never_unpickles(data_dir, tmp_path, monkeypatch):
    module, config = smoke("digits_mlp", data_dir, num_steps=4)
    train.train_and_evaluate(config, module, tmp_path, stop_at_step=2)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    import pickle

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    train.train_and_evaluate(config, module, tmp_path)
    assert max(checkpoint_steps(tmp_path)) == 4
