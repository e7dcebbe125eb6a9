"""Rollback past a bad stretch (research/resilience/rollback.py): a poisoned batch is rolled back, skipped and the
run finishes as a clean one would; the recovery is reproducible; attempts are bounded; loss spikes."""

import json
import types

import jax
import numpy as np
import pytest

from research import checkpoint, train, trained_run
from research.errors import LossSpikeError, NonFiniteError
from research.experiment import load
from research.resilience import rollback
from research.resilience.rollback import LossSpikes


class Poisoned:
    """A training iterator whose batches at `positions` (0-based, counted by the iterator's own state) have
    their inputs multiplied by `factor`: NaN poisons the step, a large number makes a loss spike."""

    def __init__(self, iterator, positions, factor):
        self.iterator, self.positions, self.factor = iterator, set(positions), factor

    def __iter__(self):
        return self

    def __next__(self):
        position = self.iterator.get_state()["next_index"]
        batch = next(self.iterator)
        if position in self.positions:
            batch = dict(batch, inputs=batch["inputs"] * np.float32(self.factor))
        return batch

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def poisoned_experiment(positions=(), factor=float("nan")):
    """linear_regression with its training batches at `positions` poisoned."""
    module = load("experiments/linear_regression.py")
    experiment = types.SimpleNamespace(**{name: getattr(module, name) for name in ("make_model", "loss_fn", "eval_fn")})

    def make_data(config, split):
        data = module.make_data(config, split)
        if split != "train":
            return data
        return _Iterable(data, positions, factor)

    experiment.make_data = make_data
    return experiment


class _Iterable:
    """What make_data returns: each iter() a fresh poisoned iterator."""

    def __init__(self, data, positions, factor):
        self.data, self.positions, self.factor = data, positions, factor

    def __iter__(self):
        return Poisoned(iter(self.data), self.positions, self.factor)


def regression_config(**overrides):
    config = load("experiments/linear_regression.py").get_config()
    config.update_from_flattened_dict(
        {
            "log_every": 10,
            "eval_every": 0,
            "nonfinite": "rollback",
            "checkpoint.every_steps": 50,
            "checkpoint.asynchronous": False,
            "optimizer.schedule.name": "warmup_cosine",  # to 0: the final loss is the optimum's, not SGD's last noise
        }
        | overrides
    )
    return config


def final_params(workdir, step):
    return trained_run.load_params(workdir, step)[0]


def rollbacks_of(workdir):
    return [json.loads(line) for line in (workdir / "rollbacks.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("clean")
    final = train.train_and_evaluate(regression_config(), poisoned_experiment(), workdir)
    return final, final_params(workdir, 300)


def test_a_poisoned_batch_is_rolled_back_skipped_and_the_run_finishes_like_a_clean_one(clean, tmp_path):
    """NaN inputs in the batch of step 121: found when the log of step 130 is read (at step 131), the run goes
    back to the checkpoint of step 100, its data going on from the batch after step 131's (the 31 batches
    read since step 100 skipped), and finishes as a clean run does; twice the same, bitwise."""
    finals, params = [], []
    for attempt in ("first", "second"):
        workdir = tmp_path / attempt
        finals.append(train.train_and_evaluate(regression_config(), poisoned_experiment([120]), workdir))
        params.append(final_params(workdir, 300))
        (record,) = rollbacks_of(workdir)
        assert (record["kind"], record["bad_step"], record["restored_step"], record["skipped_batches"]) == (
            "non-finite",
            121,
            100,
            31,
        )
    clean_final, _ = clean
    assert finals[0]["test/mse"] == pytest.approx(clean_final["test/mse"], rel=0.02)
    assert finals[0] == finals[1]
    for first, second in zip(jax.tree.leaves(params[0]), jax.tree.leaves(params[1])):
        np.testing.assert_array_equal(first, second)


def test_rollbacks_are_bounded_and_the_error_says_what_was_tried(tmp_path):
    """Every batch from position 100 on is poisoned: two rollbacks (each skipping the 11 batches read since
    step 100 and 5 more), then the run stops with their history."""
    config = regression_config(**{"rollback.attempts": 2, "rollback.skip_batches": 5})
    with pytest.raises(
        NonFiniteError, match=r"after 2 rollback\(s\) \(non-finite at step 101 -> step 100 \+ 16 skipped"
    ):
        train.train_and_evaluate(config, poisoned_experiment(range(100, 1000)), tmp_path)
    assert [record["skipped_batches"] for record in rollbacks_of(tmp_path)] == [16, 16]
    assert 100 in checkpoint.make_manager(tmp_path, config.checkpoint).all_steps()  # the good step is kept


def test_a_loss_spike_rolls_back_to_a_checkpoint_before_it(clean, tmp_path):
    """Inputs x30 for the batches of steps 141-143 (a loss ~1000x the median): the spike rule finds it before
    the save at step 150, which does not happen; the run goes back to step 100, its data going on after the
    spike, and ends as the clean run does."""
    config = regression_config(
        **{"rollback.spike_factor": 10.0, "rollback.spike_window": 20, "rollback.spike_steps": 2}
    )
    final = train.train_and_evaluate(config, poisoned_experiment([140, 141, 142], factor=30.0), tmp_path)
    (record,) = rollbacks_of(tmp_path)
    assert (record["kind"], record["bad_step"], record["restored_step"], record["skipped_batches"]) == (
        "loss spike",
        141,
        100,
        50,
    )
    assert final["test/mse"] == pytest.approx(clean[0]["test/mse"], rel=0.02)


def test_spike_rule_counts_consecutive_steps_against_the_median_before_them():
    spikes = LossSpikes(factor=3.0, window=4, steps=2)
    for step, loss in enumerate([1.0, 1.2, 0.8, 1.0, 5.0, 1.0], start=1):  # one high step alone is not a spike
        spikes.check(step, loss)
    spikes.check(6, 99.0)  # a step seen already is not judged again
    spikes.check(7, 3.5)
    with pytest.raises(LossSpikeError, match=r"loss spike at steps 7-8: loss 4 above 3 x the median 1") as error:
        spikes.check(8, 4.0)
    assert error.value.step == 7
    spikes.restart(6)  # a rollback to step 6: steps 7 and 8 are judged again, from scratch
    spikes.check(7, 1.1)
    spikes.check(8, 0.9)


def test_set_aside_moves_later_steps_and_keeps_earlier_ones(tmp_path):
    config = regression_config(**{"checkpoint.every_steps": 10, "checkpoint.keep": 5})
    train.train_and_evaluate(config, poisoned_experiment(), tmp_path, stop_at_step=40)
    manager = checkpoint.make_manager(tmp_path, config.checkpoint)
    assert rollback.set_aside_from(manager, 25) == [30, 40]
    assert sorted(manager.all_steps()) == [10, 20]
    assert sorted(path.name for path in (tmp_path / rollback.ROLLED_BACK_DIR).iterdir()) == ["30", "40"]
    manager.close()
