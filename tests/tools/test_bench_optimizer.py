"""The CPU optimizer benchmark: workloads come from the experiments that declare one; the smallest reaches its
target."""

from conftest import EXPERIMENTS_DIR
from research.tools import bench_optimizer


def test_workloads_are_the_experiments_that_declare_one():
    declared = bench_optimizer.workloads(EXPERIMENTS_DIR)
    assert sorted(declared) == ["digits_mlp", "linear_regression", "lm"]
    assert (
        declared["digits_mlp"][1].target == 0.95
        and dict(declared["digits_mlp"][1].baseline_learning_rates)["adamw"] == 3e-3
    )
    assert (declared["lm"][1].metric, declared["lm"][1].target, declared["lm"][1].budget) == ("loss", 1.70, 2000)


def test_linear_regression_workload_reaches_its_target_and_tabulates():
    declared = bench_optimizer.workloads(EXPERIMENTS_DIR)
    module, workload = declared["linear_regression"]
    result = bench_optimizer.run_workload(module, workload, "adamw", learning_rate=0.1, name="linear_regression")
    assert result.steps is not None and result.steps <= 200  # measured: 80 steps, mse 0.0096 <= 0.0125
    assert result.best <= 0.0125 and result.seconds >= 0.0
    table = bench_optimizer.format_table(
        [result, result._replace(optimizer="sgd", steps=None, seconds=None, best=0.5)], declared
    )
    lines = table.splitlines()
    assert lines[1].split()[:5] == ["linear_regression", "adamw", "mse", "<=", "0.0125"]
    assert lines[2].split()[-3:] == ["-", "-", "0.5000"]
