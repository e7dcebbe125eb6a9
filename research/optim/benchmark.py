"""A CPU-sized optimizer benchmark in the spirit of AlgoPerf (Dahl et al., 2023): steps and seconds
until each workload's validation target, for one optimizer next to the adamw and momentum baselines.

  python launch.py --bench_optimizer path/to/my_opt.py:make

Each workload is an experiment's default config with the optimizer swapped; the candidate gets the
experiment's own learning rate, the baselines theirs. Seconds count train steps only: the first
(compiling) step and evaluations are excluded.
"""

import importlib
import time
from typing import NamedTuple

import jax
import ml_collections

from research import sharding, train
from research.optim.registry import check_against_params, make_optimizer, origin_of

BASELINES = ("adamw", "momentum")
# name: (experiment module, validation metric, target, "min"/"max", evaluate every, step budget, baseline learning rates)
WORKLOADS = {
    "linear_regression": ("experiments.linear_regression", "mse", 0.0125, "min", 10, 500, {"adamw": 0.1, "momentum": 0.05}),
    "digits_mlp": ("experiments.digits_mlp", "accuracy", 0.95, "max", 50, 2000, {"adamw": 3e-3, "momentum": 0.05}),
}


class BenchResult(NamedTuple):
    workload: str
    optimizer: str
    steps: int | None  # None: target not reached within the budget
    seconds: float | None
    best: float


def _reached(value: float, target: float, mode: str) -> bool:
    return value <= target if mode == "min" else value >= target


def run_workload(workload: str, optimizer: str, learning_rate: float | None = None, data_dir: str = "") -> BenchResult:
    """Trains `workload` with `optimizer` until its target or its step budget; evaluates every few steps."""
    module_name, metric, target, mode, every, budget, _ = WORKLOADS[workload]
    experiment = importlib.import_module(module_name)
    config = experiment.get_config()
    config.data_dir = data_dir or config.data_dir
    config.optimizer.name = optimizer
    config.optimizer.kwargs = ml_collections.ConfigDict()  # the experiment's arguments are for its own optimizer
    if learning_rate is not None:
        config.optimizer.learning_rate = learning_rate
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    functions = train.regularize(train.bind(experiment, experiment.make_model(config)), config.optimizer)
    tx = make_optimizer(config.optimizer, budget)
    iterator = iter(experiment.make_data(config, "train"))
    batch = sharding.put_batch(next(iterator), mesh)
    rng = jax.random.PRNGKey(config.seed)
    check_against_params(tx, jax.eval_shape(functions["init_variables"], rng, batch)["params"], origin_of(optimizer))
    state, state_shardings = train.init_state(rng, batch, init_variables=functions["init_variables"], tx=tx, mesh=mesh)
    train_fn, eval_fn = train.compile_steps(functions, tx, state_shardings, mesh)
    validation = experiment.make_data(config, "validation")
    seconds, best = 0.0, float("inf") if mode == "min" else float("-inf")
    for step in range(1, budget + 1):
        start = time.perf_counter()
        state, _ = train_fn(state, batch)
        jax.block_until_ready(state.step)
        seconds += time.perf_counter() - start if step > 1 else 0.0
        batch = sharding.put_batch(next(iterator), mesh)
        if step % every == 0:
            value = train.evaluate(state, validation, step_fn=eval_fn, mesh=mesh)[metric]
            best = min(best, value) if mode == "min" else max(best, value)
            if _reached(value, target, mode):
                return BenchResult(workload, optimizer, step, seconds, best)
    return BenchResult(workload, optimizer, None, None, best)


def run_benchmark(candidate: str, workloads: tuple[str, ...] = tuple(WORKLOADS), data_dir: str = "") -> list[BenchResult]:
    """The candidate (at each experiment's learning rate) and the baselines on every workload."""
    results = []
    for workload in workloads:
        baseline_rates = WORKLOADS[workload][-1]
        results.append(run_workload(workload, candidate, data_dir=data_dir))
        results += [run_workload(workload, name, baseline_rates[name], data_dir) for name in BASELINES if name != candidate]
    return results


def format_table(results: list[BenchResult]) -> str:
    """workload, optimizer, target, steps and seconds to it (or 'not reached' with the best value)."""
    lines = [f"{'workload':18s} {'optimizer':24s} {'target':>14s} {'steps':>6s} {'seconds':>8s} {'best':>8s}"]
    for result in results:
        _, metric, target, mode, *_ = WORKLOADS[result.workload]
        goal = f"{metric} {'<=' if mode == 'min' else '>='} {target:g}"
        steps = str(result.steps) if result.steps else "-"
        seconds = f"{result.seconds:.2f}" if result.seconds is not None else "-"
        lines.append(f"{result.workload:18s} {result.optimizer[-24:]:24s} {goal:>14s} {steps:>6s} {seconds:>8s} {result.best:8.4f}")
    return "\n".join(lines)
