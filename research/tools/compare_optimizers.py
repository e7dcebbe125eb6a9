"""A tuned comparison of optimizers on an experiment's benchmark workload (its `BENCHMARK`), as one command.

  python launch.py --config experiments/lm.py --compare_optimizers adamw,muon,schedule_free_adamw,soap \
      --workdir runs/compare --sweep_parallel 2

Each optimizer (a registry name or file.py:fn) gets its recipe (RECIPES: the settings its paper trains with that
differ from the experiment's own optimizer; none for others) and the workload's step budget and evaluation
cadence. Its learning rate is tuned on a log grid of factor 2, five rates centred on the experiment's, seed 0,
by the final value of the workload's metric; a best rate at the grid's edge adds the next rate beyond it (up to
EXTEND times), so that the chosen rate is a grid's interior point when it can be. Then seeds 1 .. seeds-1 run at
each best rate. Reported for the seeds at the best rate, mean +- sample std: steps to the workload's target (linear
between the two evaluations around it), tokens and seconds to it, the final metric, and each optimizer's ratio of
steps to the first optimizer's (std by propagation of both relative stds). Written to WORKDIR: comparison.md
(printed), comparison.json, curves.png (the seeds at the best rates) and rates.png (final metric against rate).

The runs are research/tools/sweep.py's, WORKDIR/OPTIMIZER/lr=RATE,seed=S, `--sweep_parallel` at once: a finished run
is skipped, so the same command again resumes where it stopped (an unfinished or failed run counts as
diverged until it finishes).
Expected (2026-12-07, the command above, 2-core VM): 31 runs in 48 minutes; steps to validation loss 1.70 relative
to AdamW's (1,472 +- 14): muon 0.68 +- 0.05, schedule_free_adamw 0.68 +- 0.04, soap 0.61 +- 0.07
(docs/results.md, "lm: optimizers compared, each tuned").
"""

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from research.errors import ConfigError
from research.experiment import Workload, hook
from research.optim import registry
from research.tools import report, sweep

EXTEND = 2  # grid points added beyond an edge, at most, per optimizer
GRID = (-2, -1, 0, 1, 2)  # powers of 2 around the centre


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optimizer's settings for the comparison: config overrides from the experiment's config, and where from."""

    overrides: Callable[[ml_collections.ConfigDict], dict[str, Any]]
    source: str


RECIPES = {
    "adamw": Recipe(
        lambda config: {"optimizer.kwargs.b2": 0.99, "optimizer.kwargs.weight_decay": 0.0},
        "Loshchilov & Hutter 2019; b2 0.99 as nanoGPT's small batches; the decay is the trainer's (decoupled)",
    ),
    "muon": Recipe(
        lambda config: {"optimizer.kwargs.consistent_rms": 0.2, "optimizer.kwargs.adam_b2": 0.99},
        "Liu et al. 2025 (Moonlight) sec. 2.2: matrix updates scaled to RMS 0.2 x rate, so AdamW's rate and decay "
        "carry over; AdamW on embeddings and vectors (research/optim/matrices.py)",
    ),
    "schedule_free_adamw": Recipe(
        lambda config: {
            "optimizer.schedule.name": "linear_warmup",  # the warmup kept, no decay: the point of the method
            "optimizer.weight_decay": 0.0,
            "optimizer.kwargs.weight_decay": config.optimizer.weight_decay,  # at y, as the paper (optax's)
            "optimizer.kwargs.b2": 0.99,
        },
        "Defazio et al. 2024: a constant rate after warmup, weight decay at the interpolated point y",
    ),
    "soap": Recipe(
        lambda config: {},
        "Vyas et al. 2024: b1 = b2 = 0.95, eigenbases refreshed every 10 steps (research/optim/soap.py defaults)",
    ),
}


def recipe(name: str) -> Recipe:
    return RECIPES.get(name, Recipe(lambda config: {}, "its own defaults"))


def run_name(name: str, rate: float, seed: int) -> str:
    return f"{name.replace('/', '_').replace(':', '.')}/lr={rate:.3g},seed={seed}"


def grid(centre: float, extended: tuple[int, int]) -> list[float]:
    """The grid's rates, low to high, with `extended` (below, above) points added beyond its edges."""
    return [centre * 2.0**power for power in range(GRID[0] - extended[0], GRID[-1] + extended[1] + 1)]


def final(root: Path, name: str, rate: float, seed: int, metric: str, mode: str) -> float:
    """A finished run's last value of `metric`; the worst value (inf) for a run unfinished, failed or diverged."""
    workdir = root / run_name(name, rate, seed)
    bad = math.inf if mode == "min" else -math.inf
    if not sweep.is_finished(workdir):
        return bad
    values = [json.loads(line).get(metric) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    values = [value for value in values if value is not None]
    return values[-1] if values and math.isfinite(values[-1]) else bad


def steps_to_target(run: report.RunRecord, metric: str, target: float, mode: str) -> float | None:
    """The step at which `metric` reaches the target, linear between the two evaluations around it; None if never."""
    steps, values = run.series(metric)
    sign = 1.0 if mode == "min" else -1.0
    for index, (step, value) in enumerate(zip(steps, values)):
        if sign * (value - target) <= 0:
            if index == 0:
                return float(step)
            before, after = values[index - 1], value
            return float(steps[index - 1] + (before - target) / (before - after) * (step - steps[index - 1]))
    return None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return report.mean_std(values) if values else (math.nan, math.nan)


def summarize(
    name: str, rate: float, runs: list[report.RunRecord], workload: Workload, tokens_per_step: float
) -> dict[str, Any]:
    """One optimizer's row: its rate and, over its seeds, steps/tokens/seconds to target and the final metric."""
    reached = [(run, steps_to_target(run, workload.metric, workload.target, workload.mode)) for run in runs]
    reached = [(run, steps) for run, steps in reached if steps is not None]
    steps = [steps for _, steps in reached]
    seconds = [float(np.interp(steps, *run.elapsed())) for run, steps in reached if len(run.elapsed()[0])]
    finals = [report.final_and_best(run, workload.metric)[0] for run in runs]
    per_step = [run.wall_seconds / run.steps for run in runs]
    row = {"optimizer": name, "learning_rate": rate, "seeds": len(runs), "reached": len(reached)}
    for key, values in (("steps", steps), ("seconds", seconds), ("final", finals), ("seconds_per_step", per_step)):
        row[key], row[f"{key}_std"] = mean_std(values)
    row["tokens"], row["tokens_std"] = row["steps"] * tokens_per_step, row["steps_std"] * tokens_per_step
    return row


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's steps to target over the first row's, its std by propagating both relative stds."""
    base = rows[0]
    for row in rows:
        ratio = row["steps"] / base["steps"]
        relative = math.hypot(row["steps_std"] / row["steps"], base["steps_std"] / base["steps"])
        row["ratio"], row["ratio_std"] = ratio, ratio * relative
    return rows


def format_markdown(
    rows: Sequence[dict[str, Any]], workload: Workload, rates: dict[str, dict[float, float]], unit: str
) -> str:
    goal = f"{workload.metric} {'<=' if workload.mode == 'min' else '>='} {workload.target:g}"
    cell = lambda row, key, fmt: f"{row[key]:{fmt}} ± {row[key + '_std']:{fmt}}" if math.isfinite(row[key]) else "-"
    lines = [
        f"Target {goal} within {workload.budget} steps; mean ± std over seeds at each optimizer's best rate.\n",
        f"| optimizer | rate | reached | steps to target | {unit} to target | seconds to target | final "
        f"{workload.metric} | s/step | steps vs {rows[0]['optimizer']} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['optimizer']} | {row['learning_rate']:.3g} | {row['reached']}/{row['seeds']} | "
            f"{cell(row, 'steps', '.0f')} | {cell(row, 'tokens', '.3g')} | {cell(row, 'seconds', '.3g')} | "
            f"{cell(row, 'final', '.4f')} | {cell(row, 'seconds_per_step', '.3f')} | {cell(row, 'ratio', '.2f')} |"
        )
    lines += ["", f"Learning-rate grids (seed 0, final {workload.metric}; inf: diverged or unfinished):", ""]
    for name, finals in rates.items():
        lines.append(f"- {name}: " + ", ".join(f"{rate:.3g} -> {value:.4f}" for rate, value in sorted(finals.items())))
    return "\n".join(lines) + "\n"


def main(
    config: ml_collections.ConfigDict,
    module: Any,
    config_argument: str,
    optimizers: Sequence[str],
    workdir: str,
    *,
    overrides: dict[str, Any],
    parallel: int,
    seeds: int,
    launch: str | Path,
) -> bool:
    """launch.py --compare_optimizers: tunes each optimizer's rate, runs its seeds, reports; True when none failed."""
    workload = hook(module, "BENCHMARK")
    if workload is None:
        raise ConfigError(
            f"{config_argument} declares no BENCHMARK workload; lm.py, digits_mlp.py and linear_regression.py do"
        )
    if len(set(optimizers)) != len(optimizers) or not all(optimizers):
        raise ConfigError(f"--compare_optimizers {','.join(optimizers)}: name each optimizer once, comma-separated")
    if seeds < 1:
        raise ConfigError(f"--compare_seeds {seeds}: at least 1")
    workload = dataclasses.replace(workload, metric=f"eval/{workload.metric}")  # as metrics.jsonl names it
    for name in optimizers:
        registry.load_factory(name)  # an unknown name or file is one line before any run
    root, centre = Path(workdir), float(config.optimizer.learning_rate)
    fixed = {"num_steps": workload.budget, "eval_every": workload.eval_every, **overrides}
    extra = [f"--config.{key}={sweep.format_value(value)}" for key, value in fixed.items()]
    parallel = parallel or len(os.sched_getaffinity(0))

    def run(name: str, rate: float, seed: int) -> sweep.Run:
        settings = {"optimizer.name": name, **recipe(name).overrides(config), "optimizer.learning_rate": rate}
        return sweep.Run(run_name(name, rate, seed), tuple((settings | {"seed": seed}).items()))

    def execute(runs: list[sweep.Run]) -> None:
        sweep.check_overrides(config, runs)
        sweep.run_sweep(runs, config_argument, root, parallel=parallel, launch=launch, extra=extra)

    extended = {name: (0, 0) for name in optimizers}
    for _ in range(EXTEND + 1):
        execute([run(name, rate, 0) for name in optimizers for rate in grid(centre, extended[name])])
        rates = {
            name: {rate: final(root, name, rate, 0, workload.metric, workload.mode) for rate in grid(centre, ext)}
            for name, ext in extended.items()
        }
        pick = min if workload.mode == "min" else max
        best = {name: pick(finals, key=finals.get) for name, finals in rates.items()}
        grown = {}
        for name, (low, high) in extended.items():  # a best rate at an edge: one more rate beyond it
            low += best[name] == min(rates[name]) and low < EXTEND
            high += best[name] == max(rates[name]) and high < EXTEND
            grown[name] = (low, high)
        if grown == extended:
            break
        extended = grown
    execute([run(name, best[name], seed) for name in optimizers for seed in range(1, seeds)])
    return write_report(root, optimizers, best, rates, workload, config, module, seeds)


def write_report(
    root: Path,
    optimizers: Sequence[str],
    best: dict[str, float],
    rates: dict[str, dict[float, float]],
    workload: Workload,
    config: ml_collections.ConfigDict,
    module: Any,
    seeds: int,
) -> bool:
    """comparison.md/.json, curves.png and rates.png under `root`; True when every chosen run finished."""
    collected = {run.name: run for run in report.collect(root)}
    tokens_per_example = hook(module, "tokens_per_example")
    tokens_per_step = config.batch_size * (tokens_per_example(config) if tokens_per_example else 1)
    chosen, rows = {}, []
    for name in optimizers:
        runs = [collected[key] for seed in range(seeds) if (key := run_name(name, best[name], seed)) in collected]
        runs = [run for run in runs if sweep.is_finished(root / run.name)]
        if len(runs) < seeds:
            print(f"{name}: {seeds - len(runs)} of its {seeds} seeds at rate {best[name]:.3g} did not finish")
        if runs:
            chosen[(("optimizer", name), ("lr", f"{best[name]:.3g}"))] = runs
            rows.append(summarize(name, best[name], runs, workload, tokens_per_step))
    if not rows:
        return False
    rows = with_ratios(rows)
    text = format_markdown(rows, workload, rates, "tokens" if tokens_per_example else "examples")
    (root / "comparison.md").write_text(text)
    saved = {
        "workload": dataclasses.asdict(workload),
        "rows": rows,
        "grids": {k: list(v.items()) for k, v in rates.items()},
    }
    (root / "comparison.json").write_text(json.dumps(saved, indent=2) + "\n")
    report.plot_curves(chosen, workload.metric, root / "curves.png", title="best rate per optimizer")
    grids = {
        (("optimizer", name), ("optimizer.learning_rate", rate)): [collected[run_name(name, rate, 0)]]
        for name, finals in rates.items()
        for rate, value in finals.items()
        if math.isfinite(value)
    }
    report.plot_against(grids, "optimizer.learning_rate", workload.metric, root / "rates.png", log_x=True)
    print(text + f"\nwritten: {root / 'comparison.md'}, comparison.json, curves.png, rates.png")
    return len(rows) == len(optimizers) and all(row["seeds"] == seeds for row in rows)
