"""Two checkpoint tiers (research/checkpoint.py `Tiers`): a local tier saved often, the workdir's rarely;
resume takes the newest complete, readable step of either, and ends bitwise where an uninterrupted run does."""

import shutil

import jax
import numpy as np
import pytest

from research import checkpoint, train, trained_run
from research.experiment import load

MODULE = load("experiments/linear_regression.py")


def config_for(local_dir):
    config = MODULE.get_config()
    config.update_from_flattened_dict(
        {
            "num_steps": 40,
            "log_every": 5,
            "eval_every": 0,
            "checkpoint.every_steps": 20,
            "checkpoint.local_dir": str(local_dir),
            "checkpoint.local_every_steps": 5,
            "checkpoint.local_keep": 2,
            "checkpoint.asynchronous": False,
        }
    )
    return config


def params_at(workdir, step):
    return jax.tree.leaves(trained_run.load_params(workdir, step)[0])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("uninterrupted")
    train.train_and_evaluate(config_for(base / "local"), MODULE, base / "run")
    return params_at(base / "run", 40)


def interrupted(tmp_path):
    """A run stopped at step 33 as a crash would leave it: the local tier has 30 and 33 (the last two it
    keeps), the workdir's tier 20; the forced save of step 33 is taken out of the workdir's tier."""
    workdir, local = tmp_path / "run", tmp_path / "local"
    train.train_and_evaluate(config_for(local), MODULE, workdir, stop_at_step=33)
    shutil.rmtree(workdir / checkpoint.CHECKPOINT_DIR / "33")
    assert checkpoint.complete_steps(local / checkpoint.CHECKPOINT_DIR) == [30, 33]
    assert checkpoint.complete_steps(workdir / checkpoint.CHECKPOINT_DIR) == [20]
    return workdir, local


def corrupt(step_directory):
    for path in (step_directory / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"not a checkpoint")


@pytest.mark.parametrize(
    "damage, resumed_from",
    [
        (None, 33),  # the local tier is newer: its step 33
        ("delete local 33", 30),
        ("corrupt local 33", 30),
        ("delete the local tier", 20),  # a new node: only the workdir's tier
        ("corrupt local 33 and 30", 20),
    ],
)
def test_resume_takes_the_newest_readable_step_of_either_tier(damage, resumed_from, reference, tmp_path, capsys):
    workdir, local = interrupted(tmp_path)
    steps = local / checkpoint.CHECKPOINT_DIR
    if damage == "delete local 33":
        shutil.rmtree(steps / "33")
    elif damage == "corrupt local 33":
        corrupt(steps / "33")
    elif damage == "delete the local tier":
        shutil.rmtree(local)
    elif damage == "corrupt local 33 and 30":
        corrupt(steps / "33")
        corrupt(steps / "30")
    capsys.readouterr()
    train.train_and_evaluate(config_for(local), MODULE, workdir)
    output = capsys.readouterr().out
    assert f"resuming from the checkpoint at step {resumed_from}" in output
    if damage and damage.startswith("corrupt"):
        assert "is unreadable" in output
    for ours, theirs in zip(params_at(workdir, 40), reference):
        np.testing.assert_array_equal(ours, theirs)


def test_a_rerun_on_another_node_may_name_another_local_directory(reference, tmp_path):
    workdir, _ = interrupted(tmp_path)
    train.train_and_evaluate(config_for(tmp_path / "elsewhere"), MODULE, workdir)  # no config-change error
    for ours, theirs in zip(params_at(workdir, 40), reference):
        np.testing.assert_array_equal(ours, theirs)
