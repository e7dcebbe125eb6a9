"""The tuned optimizer comparison: its arithmetic (steps to target between evaluations, ratios with their spread,
the grid) on made-up curves, and (slow) the whole command on linear regression, resumed."""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, load_experiment
from research.errors import ConfigError
from research.experiment import Workload
from research.tools import compare_optimizers as compare
from research.tools.report import RunRecord


def curve(values, every=100) -> RunRecord:
    records = [{"step": every * (index + 1), "eval/loss": value} for index, value in enumerate(values)]
    return RunRecord("run", {"batch_size": 4}, records)


def test_steps_to_target_is_linear_between_the_evaluations_around_it():
    assert compare.steps_to_target(curve([2.0, 1.8, 1.6]), "eval/loss", 1.7, "min") == pytest.approx(250.0)
    assert compare.steps_to_target(curve([1.5, 1.4]), "eval/loss", 1.7, "min") == 100.0  # at the first evaluation
    assert compare.steps_to_target(curve([2.0, 1.9]), "eval/loss", 1.7, "min") is None
    accuracy = RunRecord("run", {}, [{"step": 10, "eval/acc": 0.5}, {"step": 20, "eval/acc": 0.9}])
    assert compare.steps_to_target(accuracy, "eval/acc", 0.8, "max") == pytest.approx(17.5)


def test_ratios_propagate_both_relative_spreads_and_the_grid_grows_past_its_edges():
    rows = compare.with_ratios([{"steps": 1000.0, "steps_std": 100.0}, {"steps": 500.0, "steps_std": 50.0}])
    assert rows[0]["ratio"] == 1.0 and rows[1]["ratio"] == 0.5
    assert rows[1]["ratio_std"] == pytest.approx(0.5 * math.hypot(0.1, 0.1))
    assert compare.grid(1e-3, (0, 0)) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    assert compare.grid(1e-3, (1, 2)) == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2])
    named = Workload("eval/loss", 1.7, "min", 100, 300, ())
    row = compare.summarize("adamw", 1e-3, [curve([2.0, 1.8, 1.6]), curve([2.0, 1.6, 1.5])], named, 4 * 64)
    assert row["reached"] == 2 and row["steps"] == pytest.approx((250 + 175) / 2)
    assert row["tokens"] == pytest.approx(row["steps"] * 256) and row["final"] == pytest.approx(1.55)


@pytest.mark.slow
def test_the_comparison_tunes_each_rate_runs_the_seeds_and_resumes(tmp_path):
    """adam and sgd on linear regression, 2 seeds (measured: ~35 s on 2 cores, 16 runs of launch.py)."""
    command = [
        sys.executable,
        str(ROOT / "launch.py"),
        "--config=experiments/linear_regression.py",
        "--compare_optimizers=adam,sgd",
        "--compare_seeds=2",
        f"--workdir={tmp_path}",
        "--sweep_parallel=2",
    ]
    first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    for row in saved["rows"]:
        grid = dict(saved["grids"][row["optimizer"]])
        finals = {float(rate): value for rate, value in grid.items()}
        assert finals[row["learning_rate"]] == min(finals.values())  # the best of its grid
        assert len(finals) >= 5 and row["seeds"] == 2 and row["reached"] == 2
        assert row["final"] <= 0.0125 and 0 < row["steps"] <= 500  # the workload's target and budget
        best = sorted(finals).index(row["learning_rate"])
        assert 0 < best < len(finals) - 1 or len(finals) == 5 + compare.EXTEND  # inside, or the grid grew its most
    assert saved["rows"][0]["ratio"] == 1.0
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "rates.png").stat().st_size > 10_000
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 to run" in again.stdout and "done in" not in again.stdout  # resumed: nothing
    assert json.loads((tmp_path / "comparison.json").read_text()) == saved


def test_an_unknown_optimizer_or_a_repeated_one_stops_before_any_run(tmp_path):
    module = load_experiment("linear_regression")
    options = dict(overrides={}, parallel=1, seeds=2, launch=ROOT / "launch.py")
    for names, message in ((["adamw", "muom"], "unknown optimizer 'muom'"), (["adamw", "adamw"], "name each")):
        with pytest.raises(ConfigError, match=message):
            compare.main(module.get_config(), module, "linear_regression.py", names, str(tmp_path), **options)
    assert not list(tmp_path.iterdir())  # nothing ran, nothing written
