"""Every experiment: its :smoke config learns, its first step's loss is the recorded one, and the
experiments stand alone; end-to-end runs of the small ones and the numbers they promise."""

import ast
import json

import jax
import pytest

from conftest import EXPERIMENTS_DIR, experiment_names, read_metrics, smoke_config, train_losses
from experiments import digits_mlp, linear_regression
from research import sharding, train
from research.steps import build

# The loss of the first train step of each :smoke config (seed 0, its first batch, 8 devices),
# recorded before the layout changed (2026-11-30): a change to any model's, loss's, optimizer's or
# data pipeline's numerics moves it.
FIRST_STEP_LOSS = {
    "bert_finetune": 2.0788896083831787,
    "bert_pretrain": 5.727075099945068,
    "cifar10_resnet": 2.704991579055786,
    "digits_mlp": 2.3671998977661133,
    "linear_regression": 4.961414337158203,
    "lm": 4.2081828117370605,
    "mnist_cnn": 2.305858612060547,
    "mnist_logreg": 2.387629747390747,
    "mnist_mlp": 2.3798818588256836,
    "shakespeare_gpt": 4.205211639404297,
    "shakespeare_lstm": 4.1937384605407715,
    "vit_digits": 2.3025853633880615,
}


def test_every_experiment_has_a_golden_first_loss():
    assert sorted(FIRST_STEP_LOSS) == experiment_names()


QUICK = ("digits_mlp", "linear_regression", "mnist_logreg")  # the others compile for seconds each: slow


@pytest.mark.parametrize(
    "name", [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in sorted(FIRST_STEP_LOSS)]
)
def test_first_step_loss_is_the_recorded_one(name, data_dir, request):
    if name not in QUICK:  # the session's smoke runs compile the same programs: after them, cached
        request.getfixturevalue("smoke_runs")
    module, config = smoke_config(name, data_dir)
    batch = next(iter(module.make_data(config, "train")))
    setup = build(config, module, batch=batch)
    _, metrics = setup.train_step(setup.init_state(), sharding.put_batch(batch, setup.mesh))
    assert float(metrics["loss"]) == pytest.approx(FIRST_STEP_LOSS[name], abs=1e-5)


@pytest.mark.parametrize("name", experiment_names())
def test_every_smoke_config_learns(name, smoke_runs):
    workdir, final = smoke_runs[name]
    losses = train_losses(workdir)
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    assert all(value == value for value in final.values())  # no NaN in the final metrics


def test_no_experiment_imports_another_and_each_is_short():
    for path in sorted(EXPERIMENTS_DIR.glob("[!_]*.py")):
        tree = ast.parse(path.read_text())
        imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
        assert not [name for name in imported if name.split(".")[0] == "experiments"], path.name
        assert len(ast.get_docstring(tree).splitlines()) <= 20, path.name
        assert len(path.read_text().splitlines()) <= 250, path.name


def test_linear_regression_recovers_slope_and_intercept(tmp_path):
    config = linear_regression.get_config()
    final = train.train_and_evaluate(config, linear_regression, tmp_path)
    assert final["test/slope"] == pytest.approx(3.0, abs=0.05)
    assert final["test/intercept"] == pytest.approx(2.0, abs=0.05)
    # The noise has variance 0.01: a fitted line cannot do much better or worse on fresh samples.
    assert 0.007 < final["test/mse"] < 0.013


def test_linear_regression_recovers_other_generating_values(tmp_path):
    config = linear_regression.get_config("smoke")
    config.data.slope, config.data.intercept = -1.5, 0.5
    final = train.train_and_evaluate(config, linear_regression, tmp_path)
    assert final["test/slope"] == pytest.approx(-1.5, abs=0.05)
    assert final["test/intercept"] == pytest.approx(0.5, abs=0.05)


def test_digits_smoke_learns(smoke_runs):
    workdir, final = smoke_runs["digits_mlp"]
    assert final["test/accuracy"] >= 0.9
    for name in ("precision", "recall", "f1"):
        assert 0.85 <= final[f"test/{name}"] <= 1.0
    losses = train_losses(workdir)
    assert losses[-1] < 0.25 * losses[0]


def test_digits_run_writes_jsonl_tensorboard_and_results(smoke_runs):
    workdir, final = smoke_runs["digits_mlp"]
    records = read_metrics(workdir)
    assert [record["step"] for record in records if "train/loss" in record] == list(range(50, 201, 50))
    assert [record["step"] for record in records if "eval/accuracy" in record] == [100, 200]
    assert records[-1] == {"step": 200} | {name: value for name, value in final.items() if name.startswith("test/")}
    assert json.loads((workdir / "results.json").read_text()) == {"step": 200} | final
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_digits_default_config_reaches_95_percent(data_dir, tmp_path):
    config = digits_mlp.get_config()
    config.data_dir = data_dir
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    final = train.train_and_evaluate(config, digits_mlp, tmp_path, mesh=mesh)
    assert final["test/accuracy"] >= 0.95
