"""The CPU optimizer benchmark on its smallest workload."""

from research.optim import benchmark


def test_linear_regression_workload_reaches_its_target_and_tabulates():
    result = benchmark.run_workload("linear_regression", "adamw", learning_rate=0.1)
    assert result.steps is not None and result.steps <= 200  # measured: 80 steps, mse 0.0096 <= 0.0125
    assert result.best <= 0.0125 and result.seconds >= 0.0
    table = benchmark.format_table([result, result._replace(optimizer="sgd", steps=None, seconds=None, best=0.5)])
    lines = table.splitlines()
    assert lines[1].split()[:5] == ["linear_regression", "adamw", "mse", "<=", "0.0125"]
    assert lines[2].split()[-3:] == ["-", "-", "0.5000"]
