"""Reference results and their reproduction: `python launch.py --reproduce EXPERIMENT[:config]`.

An experiment declares what it should reach as plain data, a module-level tuple:

  REFERENCES = (
      Reference(config="cpu", metric="eval/loss", value=1.88, tolerance=0.05, better="min",
                source="nanoGPT README, shakespeare_char on a CPU", kind="published"),
  )

`Reference` (research/experiment.py) says when a result passes and what kind of number it is:
`published` (a paper, README or leaderboard), `ours` (this repository's own earlier run, a
regression guard) or `truth` (the value the data was generated with). `config` is the `get_config`
argument (None: the default config) and `overrides` any dotted keys on top of it (ResNet
depths); references sharing both share one training run. The run goes to
WORKDIR/EXPERIMENT[_config][/overrides], so a finished one is reported, not retrained.
"""

import dataclasses
import itertools
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import ml_collections

from research import experiment as experiment_lib
from research.errors import ConfigError
from research.experiment import REFERENCE_KINDS, Reference, hook


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One reference checked: what was measured and whether it passed."""

    experiment: str
    reference: Reference
    measured: float | None

    @property
    def passed(self) -> bool:
        return self.reference.passes(self.measured)


def parse_target(target: str) -> tuple[str, str | None]:
    """'shakespeare_gpt:cpu' -> ('shakespeare_gpt', 'cpu'); 'all:smoke' names every experiment."""
    name, _, config = target.partition(":")
    if not name:
        raise ConfigError(f"--reproduce {target!r}: pass EXPERIMENT[:config], e.g. shakespeare_gpt:cpu or all:smoke")
    return name, config or None


def references_of(module: ModuleType) -> tuple[Reference, ...]:
    """The module's REFERENCES (empty when it declares none); anything else there is an error."""
    references = hook(module, "REFERENCES", ())
    if not all(isinstance(reference, Reference) for reference in references):
        raise ConfigError(f"{module.__name__}.REFERENCES must be a tuple of research.experiment.Reference")
    return tuple(references)


def select(
    target: str, load: Callable[[str], ModuleType], names: Sequence[str]
) -> list[tuple[str, ModuleType, list[Reference]]]:
    """(experiment, module, its references for the target's config) for each experiment the target names."""
    name, config = parse_target(target)
    if name != "all" and name not in names:
        raise ConfigError(f"--reproduce: no experiment {name!r}; choose one of {sorted(names)} or 'all'")
    chosen = []
    for experiment in names if name == "all" else [name]:
        module = load(experiment)
        references = [reference for reference in references_of(module) if reference.config == config]
        if references:
            chosen.append((experiment, module, references))
        elif name != "all":
            declared = sorted(
                {
                    experiment + (f":{reference.config}" if reference.config else "")
                    for reference in references_of(module)
                }
            )
            raise ConfigError(
                f"--reproduce: {experiment} has no reference for config {config!r}; try {', '.join(declared) or 'none'}"
            )
    if not chosen:
        raise ConfigError(f"--reproduce: no experiment has a reference for config {config!r}")
    return chosen


def run_directory(root: str | Path, experiment: str, reference: Reference) -> Path:
    """Where the run of a reference lives: one per (experiment, config, overrides)."""
    from research.tools.sweep import run_name

    directory = Path(root) / (experiment + (f"_{reference.config}" if reference.config else ""))
    return directory / run_name(dict(reference.overrides)) if reference.overrides else directory


def build_config(module: ModuleType, reference: Reference, extra: dict[str, Any]) -> ml_collections.ConfigDict:
    """The reference's config: get_config(config), its overrides, then `extra` (a data_dir, say); locked."""
    config = module.get_config(reference.config)
    try:
        config.update_from_flattened_dict(dict(reference.overrides) | extra)
    except (KeyError, AttributeError, TypeError) as error:
        raise ConfigError(f"reference of {module.__name__}: bad override ({error})") from None
    config.lock()
    return config


def train_reference(config: ml_collections.ConfigDict, module: ModuleType, workdir: Path) -> dict[str, float]:
    """Claims the workdir and trains (or reports the finished run there), as launch.py does."""
    from research import train

    print(f"reproduce: {module.__name__} in {workdir}")
    experiment_lib.claim_workdir(workdir, module.__name__.rpartition(".")[2], config)
    return train.train_and_evaluate(config, module, workdir)


def reproduce(
    target: str,
    root: str | Path,
    *,
    load: Callable[[str], ModuleType],
    names: Sequence[str],
    train: Callable[..., dict[str, float]] = train_reference,
    extra: dict[str, Any] | None = None,
) -> list[Outcome]:
    """Trains (or finds finished) the run of every selected reference and compares its final metrics."""
    outcomes = []
    for experiment, module, references in select(target, load, names):
        key = lambda reference: (reference.config or "", reference.overrides)
        for _, group in itertools.groupby(sorted(references, key=key), key=key):
            group = list(group)
            config = build_config(module, group[0], extra or {})
            results = train(config, module, run_directory(root, experiment, group[0]))
            for reference in group:
                if reference.metric not in results:
                    raise ConfigError(
                        f"{experiment}: reference metric {reference.metric!r} is not among {sorted(results)}"
                    )
                outcomes.append(Outcome(experiment, reference, results[reference.metric]))
    return outcomes


def format_table(outcomes: Sequence[Outcome]) -> str:
    """Measured next to the reference value and its kind, PASS or FAIL, one Markdown row per reference; a legend."""
    lines = [
        "| experiment | config | metric | reference | kind | tolerance | measured | result | source |",
        "|" + " --- |" * 9,
    ]
    for outcome in outcomes:
        reference = outcome.reference
        config = (reference.config or "default") + "".join(f" {key}={value}" for key, value in reference.overrides)
        bound = {"": "±", "min": "lower or ±", "max": "higher or ±"}[reference.better]
        measured = "n/a" if outcome.measured is None else f"{outcome.measured:.4f}"
        lines.append(
            f"| {outcome.experiment} | {config} | {reference.metric} | {reference.value:.4f} | {reference.kind} "
            f"| {bound}{reference.tolerance:g} "
            f"| {measured} | {'PASS' if outcome.passed else 'FAIL'} | {reference.source} |"
        )
    shown = {outcome.reference.kind for outcome in outcomes}
    legend = "; ".join(f"{kind} = {meaning}" for kind, meaning in REFERENCE_KINDS.items() if kind in shown)
    return "\n".join(lines) + f"\n\nkind: {legend}"


def main(target: str, workdir: str, experiments_dir: str | Path) -> bool:
    """launch.py --reproduce: trains (or finds) each selected reference's run, prints the table; True if all pass."""
    names = [name for name, _ in experiment_lib.describe(experiments_dir)]
    load = lambda name: experiment_lib.load(Path(experiments_dir) / f"{name}.py")
    outcomes = reproduce(target, workdir or "runs/reproduce", load=load, names=names)
    print(format_table(outcomes))
    return all(outcome.passed for outcome in outcomes)
