"""Distillation (research/features/distill.py): the soft loss is optax's KL at a temperature, a student with the
soft term weighted 0 trains as one without a teacher, a distilled run resumes bitwise with its teacher inside its
checkpoints, and prediction reads the student without the teacher run."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import restored_state, smoke_config, train_as_launch
from research import experiment, sharding, train
from research.errors import ConfigError
from research.features import distill
from research.inference import predict


def test_the_soft_loss_is_optax_kl_divergence_at_temperature_times_its_square():
    teacher, student = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7)) * 3, jnp.zeros((2, 5, 7))
    student = student + jax.random.normal(jax.random.PRNGKey(1), (2, 5, 7))
    for temperature in (1.0, 4.0):
        expected = temperature**2 * optax.losses.kl_divergence(
            jax.nn.log_softmax(student / temperature), jax.nn.softmax(teacher / temperature)
        )
        ours = distill.kl_at_temperature(teacher, student, temperature)
        np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert float(distill.kl_at_temperature(teacher, teacher, 2.0).max()) < 1e-6


@pytest.fixture
def teacher(smoke_runs, tmp_path):
    """A copy of the mnist_cnn smoke run, the test's own to delete."""
    shutil.copytree(smoke_runs["mnist_cnn"][0], tmp_path / "teacher")
    return tmp_path / "teacher"


def final_params(workdir, step=30):
    return restored_state(workdir, step)["params"]


def test_a_zero_soft_weight_trains_the_student_as_alone(smoke_runs, data_dir, teacher, tmp_path):
    overrides = {"distill.teacher": str(teacher), "distill.kl_weight": 0.0, "distill.loss_weight": 1.0}
    results = train_as_launch("mnist_mlp", data_dir, tmp_path / "student", overrides)
    alone, student = final_params(smoke_runs["mnist_mlp"][0]), final_params(tmp_path / "student")
    for ours, theirs in zip(jax.tree.leaves(student), jax.tree.leaves(alone)):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert abs(results["test/accuracy"] - smoke_runs["mnist_mlp"][1]["test/accuracy"]) < 1e-6


def test_a_distilled_run_resumes_bitwise_and_predicts_without_its_teacher(data_dir, teacher, tmp_path):
    overrides = {"distill.teacher": str(teacher), "distill.temperature": 4.0, "checkpoint.every_steps": 10}
    whole = train_as_launch("mnist_mlp", data_dir, tmp_path / "whole", overrides)
    module, config = smoke_config("mnist_mlp", data_dir, **overrides)
    experiment.claim_workdir(tmp_path / "half", "mnist_mlp", config)
    train.train_and_evaluate(config, module, tmp_path / "half", stop_at_step=20)  # stopped, as if preempted
    resumed = train.train_and_evaluate(config, module, tmp_path / "half")
    saved = restored_state(tmp_path / "whole", 30)
    for ours, theirs in zip(jax.tree.leaves(final_params(tmp_path / "half")), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(ours, theirs)
    assert resumed == whole
    # The teacher inside the checkpoint is the teacher run's parameters, unchanged by training.
    teacher_params = final_params(teacher)
    for ours, theirs in zip(jax.tree.leaves(saved["model_state"]["teacher"]), jax.tree.leaves(teacher_params)):
        np.testing.assert_array_equal(ours, theirs)
    shutil.rmtree(teacher)  # the student is a model of its own
    run = predict.load_run(tmp_path / "whole")
    assert "teacher" not in run.model_state
    assert abs(predict.evaluate(run, "test")["accuracy"] - whole["test/accuracy"]) < 1e-6


def test_a_teacher_that_is_not_a_run_is_a_one_line_error(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^distill.teacher: no config.json in .*nowhere"):
        train_as_launch("mnist_mlp", data_dir, tmp_path / "student", {"distill.teacher": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="temperature 0.0 must be > 0"):
        train_as_launch("mnist_mlp", data_dir, tmp_path / "s2", {"distill.teacher": "x", "distill.temperature": 0.0})


def test_a_teacher_saved_with_another_optimizer_state_layout_teaches_with_its_raw_parameters(
    data_dir, teacher, tmp_path, capsys
):
    """An older version's optimizer state (here: the record says another optimizer) cannot be restored into
    today's; the teacher's parameters are read alone, the same arrays, and a note says so."""
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    module, config = smoke_config("mnist_mlp", data_dir, **{"distill.teacher": str(teacher)})
    first = distill.load_teacher(config, module, mesh)
    restored = first.load(first.abstract_variables)
    record = json.loads((teacher / "config.json").read_text())
    assert record["config"]["optimizer"]["name"] == "momentum"  # a trace; RMSProp keeps a second moment too
    record["config"]["optimizer"]["name"] = "rmsprop"
    (teacher / "config.json").write_text(json.dumps(record))
    again = distill.load_teacher(config, module, mesh)
    raw = again.load(again.abstract_variables)
    assert "using its raw parameters" in capsys.readouterr().err
    assert jax.tree.structure(raw) == jax.tree.structure(restored)
    for ours, theirs in zip(jax.tree.leaves(raw), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(ours, theirs)
