"""Tables and learning curves of the runs under a directory (a sweep's root, or any tree of workdirs).

  python -m research.tools.report RUNS_DIR [--metric eval/accuracy] [--best_per optimizer.name] [--out DIR]
  python -m research.tools.report runs/pruning/digits_mlp --metric test/accuracy --against pruning.sparsity

Every directory below RUNS_DIR that holds config.json and metrics.jsonl is a run. Runs whose
configs differ only in `seed` form a group; the groups are labelled by the config keys that vary
across runs. Written to --out (default RUNS_DIR): report.md (the tables, also printed),
groups.csv, runs.csv and one PNG per plotted key (against step and against wall time).

Final is a run's last logged value of a key, best its minimum (losses, errors, perplexities) or
maximum (anything else); a group shows mean ± std over its seeds (sample std, ddof 1; 0 for one
seed). Wall time is the training time the logger measured: the sum over logging windows of
examples / (examples per second), so compilation and evaluations count and restarts do not.
"""

import argparse
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LOWER_IS_BETTER = ("loss", "error", "perplexity", "mse", "mae")
SPEED_KEY = "perf/examples_per_second"


@dataclasses.dataclass
class RunRecord:
    """One run's workdir, flattened config and logged metrics."""

    name: str  # the workdir relative to RUNS_DIR
    config: dict[str, Any]
    records: list[dict[str, Any]]

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of every logged value of `key` (nulls, i.e. non-finite values, dropped)."""
        pairs = [(record["step"], record[key]) for record in self.records if record.get(key) is not None]
        steps, values = zip(*pairs) if pairs else ((), ())
        return np.asarray(steps, np.int64), np.asarray(values, np.float64)

    def elapsed(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, seconds since the start) at each train logging step."""
        steps, speed = self.series(SPEED_KEY)
        previous = np.concatenate([[0], steps[:-1]])
        return steps, np.cumsum((steps - previous) * self.config["batch_size"] / speed)

    @property
    def steps(self) -> int:
        return max((record["step"] for record in self.records), default=0)

    @property
    def wall_seconds(self) -> float:
        seconds = self.elapsed()[1]
        return float(seconds[-1]) if len(seconds) else float("nan")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become tuples so that they compare and hash."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = tuple(value) if isinstance(value, list) else value
    return flat


def collect(root: str | Path) -> list[RunRecord]:
    """Every run under `root`, sorted by its relative path."""
    root = Path(root)
    runs = []
    for metrics_file in sorted(root.rglob("metrics.jsonl")):
        workdir = metrics_file.parent
        if not (workdir / "config.json").exists():
            continue
        config = flatten(json.loads((workdir / "config.json").read_text())["config"])
        records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
        runs.append(RunRecord(str(workdir.relative_to(root)) if workdir != root else workdir.name, config, records))
    return runs


def varying_keys(runs: Sequence[RunRecord]) -> list[str]:
    """Config keys whose values differ between runs (a key missing from a run counts as None)."""
    keys = sorted({key for run in runs for key in run.config})
    return [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]


def group_runs(runs: Sequence[RunRecord]) -> dict[tuple, list[RunRecord]]:
    """Runs grouped by the varying keys other than seed: {((key, value), ...): runs}, in first-seen order."""
    keys = [key for key in varying_keys(runs) if key != "seed"]
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(tuple((key, run.config.get(key)) for key in keys), []).append(run)
    return groups


def label(group: tuple) -> str:
    """A legend label from a group's key: `name=adam, learning_rate=0.001` (keys shortened)."""
    return ", ".join(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in group) or "all runs"


def lower_is_better(key: str) -> bool:
    return any(word in key.rsplit("/", 1)[-1] for word in LOWER_IS_BETTER)


def final_and_best(run: RunRecord, key: str) -> tuple[float, float]:
    """The last logged value of `key` and its best (min or max by the key's name); NaN if never logged."""
    values = run.series(key)[1]
    if not len(values):
        return float("nan"), float("nan")
    return float(values[-1]), float(values.min() if lower_is_better(key) else values.max())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def summarize(groups: dict[tuple, list[RunRecord]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group: its label, seeds, steps, wall time and mean/std of each key's final and best."""
    rows = []
    for group, runs in groups.items():
        row = {"group": label(group), "runs": len(runs), "steps": max(run.steps for run in runs)}
        row["wall_s"], row["wall_s_std"] = mean_std([run.wall_seconds for run in runs])
        for key in keys:
            finals, bests = zip(*(final_and_best(run, key) for run in runs))
            row[f"{key} final"], row[f"{key} final_std"] = mean_std(finals)
            row[f"{key} best"], row[f"{key} best_std"] = mean_std(bests)
        rows.append(row | {"_group": group})
    return rows


def rank(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows sorted best first by the mean final `metric` (groups that never logged it last)."""
    sign = 1.0 if lower_is_better(metric) else -1.0
    value = lambda row: sign * row[f"{metric} final"] if math.isfinite(row[f"{metric} final"]) else math.inf
    return sorted(rows, key=value)


def best_per(rows: list[dict[str, Any]], key: str, metric: str) -> list[dict[str, Any]]:
    """For each value of config `key`, the best group by `metric` (the paper's 'best setting of each method')."""
    chosen: dict[Any, dict[str, Any]] = {}
    for row in rank(rows, metric):
        value = dict(row["_group"]).get(key)
        chosen.setdefault(value, row)
    return list(chosen.values())


def _cell(mean: float, std: float, runs: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.4g} ± {std:.2g}" if runs > 1 else f"{mean:.4g}"


def format_markdown(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """A Markdown table: group, seeds, steps, wall time, then each key's final and best (test keys, logged
    once, only final; groups.csv has every column)."""
    columns = [
        (key, kind) for key in keys for kind in ("final", "best") if kind == "final" or not key.startswith("test/")
    ]
    header = ["group", "seeds", "steps", "wall time (s)"] + [f"{key} {kind}" for key, kind in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [
            row["group"],
            str(row["runs"]),
            str(row["steps"]),
            _cell(row["wall_s"], row["wall_s_std"], row["runs"]),
        ]
        cells += [_cell(row[f"{key} {kind}"], row[f"{key} {kind}_std"], row["runs"]) for key, kind in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV, every numeric column at full precision."""
    columns = [column for column in rows[0] if not column.startswith("_")] if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def run_rows(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: its workdir, steps, wall time and each key's final and best."""
    rows = []
    for run in runs:
        row = {"run": run.name, "seed": run.config["seed"], "steps": run.steps, "wall_s": run.wall_seconds}
        for key in keys:
            row[f"{key} final"], row[f"{key} best"] = final_and_best(run, key)
        rows.append(row)
    return rows


def metric_keys(runs: Sequence[RunRecord]) -> list[str]:
    """The keys the table reports: train/loss, then every eval/ and test/ key logged by any run."""
    logged = {key for run in runs for record in run.records for key in record}
    keys = ["train/loss"] if "train/loss" in logged else []
    return keys + sorted(key for key in logged if key.startswith(("eval/", "test/")))


def seed_curves(runs: Sequence[RunRecord], key: str) -> dict[str, np.ndarray] | None:
    """A group's curve of `key`: on the steps every seed logged, the mean, min and max over seeds and the
    mean wall time at those steps; None when no run logged the key."""
    series = [run.series(key) for run in runs if len(run.series(key)[0])]
    if not series:
        return None
    steps = series[0][0]
    for other_steps, _ in series[1:]:
        steps = np.intersect1d(steps, other_steps)
    values = np.stack([values[np.searchsorted(run_steps, steps)] for run_steps, values in series])
    times = np.stack([np.interp(steps, *run.elapsed()) for run in runs if len(run.series(key)[0])])
    return {
        "steps": steps,
        "mean": values.mean(0),
        "low": values.min(0),
        "high": values.max(0),
        "seconds": times.mean(0),
    }


def plot_curves(groups: dict[tuple, list[RunRecord]], key: str, path: Path, title: str = "") -> Path:
    """One PNG: `key` against step (left) and wall time (right), a line per group, a band for its seeds' spread."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    colors = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    positive = True
    for index, (group, runs) in enumerate(groups.items()):
        curve = seed_curves(runs, key)
        if curve is None:
            continue
        positive &= bool((curve["low"] > 0).all())
        seeds = f" ({len(runs)} seeds)" if len(runs) > 1 else ""
        for axis, x in zip(axes, (curve["steps"], curve["seconds"])):
            axis.plot(x, curve["mean"], color=colors[index % len(colors)], linewidth=1.6, label=label(group) + seeds)
            if len(runs) > 1:
                axis.fill_between(
                    x, curve["low"], curve["high"], color=colors[index % len(colors)], alpha=0.2, linewidth=0
                )
    for axis, xlabel in zip(axes, ("step", "wall time (s)")):
        axis.set_xlabel(xlabel)
        axis.grid(True, which="both", alpha=0.3)
        if lower_is_better(key) and positive:
            axis.set_yscale("log")  # losses fall over decades; accuracies do not
    axes[0].set_ylabel(key)
    axes[1].legend(fontsize=8, loc="best")
    figure.suptitle(f"{title}: {key}, mean over seeds, band min-max" if title else key)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_against(
    groups: dict[tuple, list[RunRecord]], key: str, metric: str, path: Path, title: str = "", log_x: bool = False
) -> Path:
    """One PNG: the final `metric` of each group (mean, error bar min-max over seeds) against the config `key`
    (accuracy against pruning.sparsity, say; a learning rate with `log_x`), the other varying keys as separate lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    for group, runs in groups.items():
        finals = [final_and_best(run, metric)[0] for run in runs]
        others = label(tuple((name, value) for name, value in group if name != key))
        x = runs[0].config.get(key)
        lines.setdefault(others, []).append((float(x), np.mean(finals), np.min(finals), np.max(finals)))
    figure, axis = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    for name, points in lines.items():
        x, mean, low, high = np.asarray(sorted(points)).T
        axis.errorbar(x, mean, yerr=[mean - low, high - mean], marker="o", capsize=3, label=name)
    axis.set_xlabel(key)
    if log_x:
        axis.set_xscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the decades' labels only
    axis.set_ylabel(f"final {metric}")
    axis.grid(True, alpha=0.3)
    if len(lines) > 1:
        axis.legend(fontsize=8)
    figure.suptitle(f"{title}: final {metric} against {key}" if title else f"final {metric} against {key}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def report(
    root: str | Path,
    out: str | Path | None = None,
    metric: str = "",
    best_key: str = "",
    plot_keys: Sequence[str] = (),
    against: str = "",
) -> str:
    """Writes report.md, groups.csv, runs.csv and the curves' PNGs for the runs under `root`; returns report.md."""
    runs = collect(root)
    if not runs:
        raise SystemExit(f"error: no runs (directories with config.json and metrics.jsonl) under {root}")
    out = Path(out or root)
    out.mkdir(parents=True, exist_ok=True)
    keys = metric_keys(runs)
    metric = metric or ("eval/loss" if "eval/loss" in keys else keys[0])
    if metric not in keys:
        raise SystemExit(f"error: --metric {metric!r} was never logged; choose one of {keys}")
    groups = group_runs(runs)
    rows = rank(summarize(groups, keys), metric)
    sections = [f"# {Path(root).name}: {len(runs)} runs in {len(groups)} groups, ranked by final {metric}"]
    shown = rows
    if best_key:
        shown = best_per(rows, best_key, metric)
        sections += [f"## Best {best_key.rsplit('.', 1)[-1]} by final {metric}", format_markdown(shown, keys)]
    sections += ["## All groups", format_markdown(rows, keys)]
    chosen = {row["_group"]: groups[row["_group"]] for row in shown}
    for key in plot_keys or ["train/loss"] + [key for key in keys if key.startswith("eval/")]:
        path = plot_curves(chosen, key, out / f"{key.replace('/', '_')}.png", title=Path(root).name)
        sections.append(f"![{key}]({path.name})")
    if against:
        if against not in varying_keys(runs):
            raise SystemExit(
                f"error: --against {against!r} does not vary across the runs; choose one of {varying_keys(runs)}"
            )
        path = plot_against(
            chosen, against, metric, out / f"{metric.replace('/', '_')}_against_{against}.png", Path(root).name
        )
        sections.append(f"![{metric} against {against}]({path.name})")
    text = "\n\n".join(sections) + "\n"
    (out / "report.md").write_text(text)
    write_csv(out / "groups.csv", rows)
    write_csv(out / "runs.csv", run_rows(runs, keys))
    return text


def main(argv: Sequence[str]) -> None:
    """`python -m research.tools.report RUNS_DIR ...`: the only argument parsing of this module."""
    parser = argparse.ArgumentParser(prog="python -m research.tools.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", help="a sweep's root or any directory of run workdirs")
    parser.add_argument("--out", default=None, help="where report.md, the CSVs and PNGs go (default RUNS_DIR)")
    parser.add_argument("--metric", default="", help="key that ranks the groups (default eval/loss)")
    parser.add_argument(
        "--best_per", default="", help="config key: plot and tabulate only the best group of each of its values"
    )
    parser.add_argument(
        "--plot", default="", help="comma-separated keys to plot (default train/loss and every eval/ key)"
    )
    parser.add_argument(
        "--against", default="", help="a numeric config key: also plot the final --metric against it per group"
    )
    args = parser.parse_args(argv)
    if not Path(args.runs_dir).is_dir():
        raise SystemExit(f"error: no directory {args.runs_dir}")
    plot_keys = [key for key in args.plot.split(",") if key]
    print(report(args.runs_dir, args.out, args.metric, args.best_per, plot_keys, args.against), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
