"""A CPU-sized optimizer benchmark in the spirit of AlgoPerf (Dahl et al., 2023): steps and seconds
until each workload's validation target, for one optimizer next to the adamw and momentum baselines.

  python launch.py --bench_optimizer path/to/my_opt.py:make

A workload is an experiment that declares `BENCHMARK = Workload(...)` (research/experiment.py):
its default config with the optimizer swapped. The candidate gets the experiment's own learning
rate, the baselines theirs. Seconds count train steps only: the first (compiling) step and the
evaluations are excluded. The conformance kit's table comes first (correct under sharding,
checkpointing and accumulation?), then the benchmark's (how fast?); the exit status is 1 if a check failed.
"""

import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections

from research import experiment as experiment_lib
from research import sharding
from research.experiment import Workload, hook
from research.steps import build
from research.tools import check_optimizer
from research.train import evaluate

BASELINES = ("adamw", "momentum")


class BenchResult(NamedTuple):
    workload: str
    optimizer: str
    steps: int | None  # None: target not reached within the budget
    seconds: float | None
    best: float


def workloads(experiments_dir: str | Path) -> dict[str, tuple[Any, Workload]]:
    """{experiment name: (module, its Workload)} for every experiment in the directory that declares one."""
    found = {}
    for name, _ in experiment_lib.describe(experiments_dir):
        module = experiment_lib.load(Path(experiments_dir) / f"{name}.py")
        workload = hook(module, "BENCHMARK")
        if workload is not None:
            found[name] = (module, workload)
    return found


def _reached(value: float, workload: Workload) -> bool:
    return value <= workload.target if workload.mode == "min" else value >= workload.target


def run_workload(
    module: Any,
    workload: Workload,
    optimizer: str,
    learning_rate: float | None = None,
    data_dir: str = "",
    name: str = "",
) -> BenchResult:
    """Trains the workload with `optimizer` until its target or its step budget, evaluating every few steps."""
    config = module.get_config()
    config.update_from_flattened_dict(
        {"data_dir": data_dir or config.data_dir, "optimizer.name": optimizer, "num_steps": workload.budget}
    )
    config.optimizer.kwargs = ml_collections.ConfigDict()  # the experiment's arguments are for its own optimizer
    if learning_rate is not None:
        config.optimizer.learning_rate = learning_rate
    iterator = iter(module.make_data(config, "train"))
    batch = next(iterator)
    setup = build(config, module, sharding.make_mesh({"data": 1}, jax.devices()[:1]), batch=batch)
    state, batch = setup.init_state(), sharding.put_batch(batch, setup.mesh)
    validation = module.make_data(config, "validation")
    seconds, best = 0.0, float("inf") if workload.mode == "min" else float("-inf")
    for step in range(1, workload.budget + 1):
        start = time.perf_counter()
        state, _ = setup.train_step(state, batch)
        jax.block_until_ready(state.step)
        seconds += time.perf_counter() - start if step > 1 else 0.0
        batch = sharding.put_batch(next(iterator), setup.mesh)
        if step % workload.eval_every == 0:
            value = evaluate(state, validation, step_fn=setup.eval_step, mesh=setup.mesh)[workload.metric]
            best = min(best, value) if workload.mode == "min" else max(best, value)
            if _reached(value, workload):
                return BenchResult(name, optimizer, step, seconds, best)
    return BenchResult(name, optimizer, None, None, best)


def run_benchmark(candidate: str, declared: dict[str, tuple[Any, Workload]], data_dir: str = "") -> list[BenchResult]:
    """The candidate (at each experiment's learning rate) and the baselines on every workload of `declared`."""
    results = []
    for name, (module, workload) in declared.items():
        rates = dict(workload.baseline_learning_rates)
        results.append(run_workload(module, workload, candidate, data_dir=data_dir, name=name))
        for baseline in BASELINES:
            if baseline != candidate:
                results.append(run_workload(module, workload, baseline, rates[baseline], data_dir, name))
    return results


def format_table(results: Sequence[BenchResult], declared: dict[str, tuple[Any, Workload]]) -> str:
    """workload, optimizer, target, steps and seconds to it (or '-' with the best value reached)."""
    lines = [f"{'workload':18s} {'optimizer':24s} {'target':>14s} {'steps':>6s} {'seconds':>8s} {'best':>8s}"]
    for result in results:
        workload = declared[result.workload][1]
        goal = f"{workload.metric} {'<=' if workload.mode == 'min' else '>='} {workload.target:g}"
        steps = str(result.steps) if result.steps else "-"
        seconds = f"{result.seconds:.2f}" if result.seconds is not None else "-"
        lines.append(
            f"{result.workload:18s} {result.optimizer[-24:]:24s} {goal:>14s} {steps:>6s} {seconds:>8s} "
            f"{result.best:8.4f}"
        )
    return "\n".join(lines)


def main(candidate: str, experiments_dir: str | Path) -> bool:
    """launch.py --bench_optimizer: the conformance kit's table, then steps to target on every declared workload;
    True when every check passed."""
    rows = check_optimizer.check_optimizer(candidate)
    print(f"conformance kit: {candidate}\n{check_optimizer.format_table(rows)}\n")
    if not rows[0].passed:
        return False  # it does not load: nothing to benchmark
    declared = workloads(experiments_dir)
    print(format_table(run_benchmark(candidate, declared), declared))
    return all(row.passed for row in rows)
