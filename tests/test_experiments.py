"""End-to-end runs of each experiment through train_and_evaluate: the numbers they promise."""

import json

import pytest

from experiments import digits_mlp, linear_regression
from research import train


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def digits_smoke(data_dir, tmp_path_factory):
    config = digits_mlp.get_config("smoke")
    config.data_dir = data_dir
    workdir = tmp_path_factory.mktemp("digits_smoke")
    return train.train_and_evaluate(config, digits_mlp, workdir), workdir


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


def test_digits_smoke_learns(digits_smoke):
    final, workdir = digits_smoke
    assert final["test/accuracy"] >= 0.9
    for name in ("precision", "recall", "f1"):
        assert 0.85 <= final[f"test/{name}"] <= 1.0
    losses = [record["train/loss"] for record in read_metrics(workdir) if "train/loss" in record]
    assert losses[-1] < 0.25 * losses[0]


def test_digits_run_writes_jsonl_tensorboard_and_results(digits_smoke):
    final, workdir = digits_smoke
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
    final = train.train_and_evaluate(config, digits_mlp, tmp_path)
    assert final["test/accuracy"] >= 0.95
