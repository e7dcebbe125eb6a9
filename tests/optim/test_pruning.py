"""Magnitude pruning (research/optim/pruning.py): the schedule, exact sparsity, pruned weights stay zero,
and a resumed run prunes exactly as an uninterrupted one (the masks live in the optimizer state)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from research import train, trained_run
from research.errors import ConfigError
from research.experiment import load
from research.optim import pruning


def test_the_cubic_schedule_and_the_exact_count_pruned():
    assert float(pruning.sparsity_at(0, 0.9, 10, 110)) == 0.0
    assert float(pruning.sparsity_at(60, 0.9, 10, 110)) == pytest.approx(0.9 * (1 - 0.5**3))
    assert float(pruning.sparsity_at(500, 0.9, 10, 110)) == pytest.approx(0.9)
    magnitudes = [jnp.arange(10.0).reshape(2, 5), jnp.arange(10.0, 20.0).reshape(5, 2)]
    kept = pruning._keep_largest(magnitudes, 0.75)  # 15 of 20 pruned, the smallest, across both
    assert int(sum(mask.sum() for mask in kept)) == 5 and bool(kept[1].ravel()[-5:].all()) and not bool(kept[0].any())


def test_pruned_weights_are_exactly_zero_and_stay_so_under_updates():
    params = {"dense": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(8, 8)), jnp.float32)}}
    params["dense"]["bias"] = jnp.ones(8)
    tx = optax.chain(optax.sgd(0.1), pruning.magnitude_pruning(0.5, start_step=1, end_step=1, every=1))
    state = tx.init(params)
    for _ in range(3):
        gradients = jax.tree.map(lambda leaf: jnp.ones_like(leaf), params)
        updates, state = tx.update(gradients, state, params)
        params = optax.apply_updates(params, updates)
        assert pruning.sparsity_of(params) == (0.5, 32, 64)
    assert bool((params["dense"]["bias"] != 0).all())  # biases are not pruned
    assert pruning.sparse_report(params).startswith("kernels 50.0% zero (32 of 64 weights): 256 bytes dense, 256 as")
    with pytest.raises(ConfigError, match=r"pruning.sparsity is 1.0"):
        pruning.magnitude_pruning(1.0, 0, 10, 1)


@pytest.mark.slow
def test_a_pruned_run_reaches_its_sparsity_and_resumes_exactly(data_dir, tmp_path):
    module = load("experiments/digits_mlp.py")
    config = module.get_config("smoke")
    config.data_dir = data_dir
    config.update_from_flattened_dict(
        {"pruning.sparsity": 0.75, "pruning.every": 20, "pruning.end_step": 110, "eval_every": 0, "log_every": 20}
    )
    final = train.train_and_evaluate(config, module, tmp_path / "straight")
    straight, _ = trained_run.load_params(tmp_path / "straight")
    fraction, _, total = pruning.sparsity_of(straight)
    assert abs(fraction - 0.75) <= 1 / total  # reached at end_step, which is not a multiple of every
    assert final["test/accuracy"] > 0.85
    train.train_and_evaluate(config, module, tmp_path / "resumed", stop_at_step=60)  # mid-schedule
    train.train_and_evaluate(config, module, tmp_path / "resumed")
    resumed, _ = trained_run.load_params(tmp_path / "resumed")
    for ours, theirs in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(ours, theirs)
