"""The registry: every optimizer passes the core of the conformance kit; names and arguments fail clearly."""

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from research.errors import ConfigError
from research.optim import OPTIMIZERS, make_optimizer
from research.tools import check_optimizer as conformance

# The kit's gradients have rank 8 (a batch of 8): SOAP's factors on a longer side are rank-deficient, their null
# space has no one eigenbasis, and micro-batches' rounding picks another (tests/optim/test_research_optimizers.py).
KIT_KWARGS = {"soap": {"max_precond_dim": 4}}


def build(name: str) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    config = {"name": name, "learning_rate": 0.05, "kwargs": KIT_KWARGS.get(name, {})}
    tx = make_optimizer(config)
    return tx, optax.MultiSteps(tx, conformance.ACCUMULATE).gradient_transformation()


# Built once, so each optimizer's jitted step compiles once for all the tests below.
OPTIMIZERS_BUILT = {name: build(name) for name in sorted(OPTIMIZERS)}


SLOW_TO_COMPILE = ("adafactor", "muon", "soap")


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=pytest.mark.slow) if name in SLOW_TO_COMPILE else name for name in sorted(OPTIMIZERS)],
)
def test_every_registered_optimizer_conforms(name):
    """Finite jitted steps, f32/bf16 kept, and under optax.MultiSteps k micro-batches = one large batch (to 1e-5)."""
    tx, accumulating = OPTIMIZERS_BUILT[name]
    assert "finite" in conformance.check_finite(lambda: tx)
    assert conformance.check_dtypes(lambda: tx) == "float32 and bfloat16 kept"
    assert "max diff" in conformance.check_accumulation(lambda: tx, lambda: accumulating)


def test_every_registered_optimizer_state_checkpoints_bitwise(tmp_path):
    """All the optimizers' states after 2 steps in one orbax checkpoint: restored bit for bit."""
    states = {
        name: conformance.run_steps(tx, conformance.mlp_params(), [conformance.mlp_batch(8, seed=s) for s in range(2)])[
            1
        ]
        for name, (tx, _) in OPTIMIZERS_BUILT.items()
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "states", states)
        checkpointer.wait_until_finished()
        restored = checkpointer.restore(tmp_path / "states", jax.tree.map(ocp.utils.to_shape_dtype_struct, states))
    assert jax.tree.structure(restored) == jax.tree.structure(states)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(states)):
        assert got.dtype == want.dtype and np.array_equal(np.asarray(got), np.asarray(want))


def test_unknown_optimizer_names_the_nearest():
    with pytest.raises(ConfigError, match="did you mean 'adam'"):
        make_optimizer({"name": "adm", "learning_rate": 1e-3})


def test_unknown_argument_lists_accepted_ones():
    with pytest.raises(ConfigError, match="optimizer 'sgd'.*accepts: learning_rate, momentum, nesterov"):
        make_optimizer({"name": "sgd", "learning_rate": 1e-3, "kwargs": {"beta": 0.9}})


def test_unknown_schedule_and_config_key():
    with pytest.raises(ConfigError, match="unknown schedule 'cosin'"):
        make_optimizer({"name": "sgd", "learning_rate": 1e-3, "schedule": {"name": "cosin"}})
    with pytest.raises(ConfigError, match=r"unknown optimizer config keys \['lr'\]"):
        make_optimizer({"name": "sgd", "lr": 1e-3})


def test_float_arguments_are_state_so_changing_them_does_not_recompile():
    tx = make_optimizer({"name": "adamw", "learning_rate": 0.1, "kwargs": {"weight_decay": 0.1}})
    params = {"w": jax.numpy.array([1.0, -2.0])}
    grads = {"w": jax.numpy.array([0.5, 0.5])}
    update = jax.jit(tx.update)
    state = tx.init(params)
    first, _ = update(grads, state, params)
    heavier = optax.tree_utils.tree_set(state, weight_decay=jax.numpy.asarray(0.5, jax.numpy.float32))
    second, _ = update(grads, heavier, params)
    assert update._cache_size() == 1
    # Adam's first step is -lr * sign(g); the decay adds -lr * wd * w.
    np.testing.assert_allclose(first["w"], [-0.1 - 0.01, -0.1 + 0.02], atol=1e-6)
    np.testing.assert_allclose(second["w"], [-0.1 - 0.05, -0.1 + 0.1], atol=1e-6)


def test_another_optimizer_by_name_leaves_the_experiments_arguments_behind():
    """lm's config gives adam b2=0.99: naming muon on the command line drops it (muon takes no b2), naming lion with
    its own b2 keeps that one; the same name keeps everything; the generic settings carry over."""
    from conftest import load_experiment
    from research.config import keep_optimizer_settings_apart

    experiment = load_experiment("lm").get_config("smoke")
    switched = experiment.copy_and_resolve_references()
    switched.optimizer.name = "muon"
    keep_optimizer_settings_apart(experiment, switched, ["optimizer.name"])
    assert experiment.optimizer.kwargs.to_dict() == {"b2": 0.99} and switched.optimizer.kwargs.to_dict() == {}
    assert switched.optimizer.learning_rate == experiment.optimizer.learning_rate
    make_optimizer(switched.optimizer, 10)  # builds: no b2 reaches muon
    lion = experiment.copy_and_resolve_references()
    lion.optimizer.name, lion.optimizer.kwargs.b2, lion.optimizer.kwargs.b1 = "lion", 0.95, 0.9
    keep_optimizer_settings_apart(experiment, lion, ["optimizer.name", "optimizer.kwargs.b2"])
    assert lion.optimizer.kwargs.to_dict() == {"b2": 0.95}
    same = experiment.copy_and_resolve_references()
    keep_optimizer_settings_apart(experiment, same, ["optimizer.learning_rate"])
    assert same.optimizer.kwargs.to_dict() == {"b2": 0.99}
