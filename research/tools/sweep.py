"""Sweeps: a grid (or lists) of config overrides, expanded into runs of launch.py in sub-workdirs.

A sweep file is plain Python with `get_sweep()` returning data:

  def get_sweep():
      return [  # a list of grids: their runs, in order
          {"optimizer.name": "adam", "optimizer.learning_rate": [1e-3, 3e-4], "seed": [0, 1]},
          {"optimizer.name": "nesterov", "optimizer.learning_rate": [0.1, 0.03], "seed": [0, 1]},
      ]

A grid maps a dotted config key to a Python *list* of values (one axis of the cartesian product)
or to a single value (any non-list, tuples included: `model.features=(128, 10)` is one value).
A list of grids is their union, so explicit runs are a list of dicts of single values.

Every run lives in ROOT/NAME, NAME made of its overrides (`learning_rate=0.001,name=adam,seed=0`).
A run whose workdir holds final results is skipped; an interrupted one is started again and
resumes from its checkpoints (launch.py does that). Runs are subprocesses of launch.py, up to
`parallel` at once, each pinned to its own share of the cores so that they do not oversubscribe.
"""

import copy
import dataclasses
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from research.config import OPEN_SECTIONS
from research.errors import ConfigError
from research.experiment import import_file, unknown_key_message
from research.resilience import slurm

Overrides = dict[str, Any]
LOG_FILE = "sweep.log"  # a run's launch.py output, inside its workdir
MANIFEST = "sweep.json"  # in the sweep's root: the base config and every run's overrides


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a sweep: its sub-workdir name and the overrides it applies to the base config."""

    name: str
    overrides: tuple[tuple[str, Any], ...]


def expand(spec: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Overrides]:
    """The override dicts of a sweep spec (a grid or a list of grids), in order, duplicates dropped."""
    grids = [spec] if isinstance(spec, Mapping) else list(spec)
    runs: list[Overrides] = []
    for grid in grids:
        if not isinstance(grid, Mapping) or not grid:
            raise ConfigError(f"a sweep is a dict of config overrides or a list of them, not {grid!r}")
        axes = [value if isinstance(value, list) else [value] for value in grid.values()]
        empty = [key for key, values in zip(grid, axes) if not values]
        if empty:
            raise ConfigError(f"sweep key {empty[0]!r} has an empty list of values")
        for values in itertools.product(*axes):
            overrides = dict(zip(grid, values))
            if overrides not in runs:
                runs.append(overrides)
    return runs


def format_value(value: Any) -> str:
    """A value as config_flags parses it on the command line (and as it appears in run names)."""
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "(" + ",".join(format_value(item) for item in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def run_name(overrides: Overrides) -> str:
    """A stable directory name: `key=value` sorted by key, joined by ','; keys shortened to their last
    part where that stays unambiguous (`optimizer.learning_rate` -> `learning_rate`)."""
    last = [key.rsplit(".", 1)[-1] for key in overrides]
    parts = []
    for key, short in zip(overrides, last):
        label = short if last.count(short) == 1 else key
        parts.append(f"{label}={format_value(overrides[key])}".replace("/", "_").replace(" ", ""))
    return ",".join(sorted(parts)) or "base"


def make_runs(spec) -> list[Run]:
    """Expanded runs with their names; two runs with one name (values that print alike) are an error."""
    runs = [Run(run_name(overrides), tuple(overrides.items())) for overrides in expand(spec)]
    names = [run.name for run in runs]
    clash = next((name for name in names if names.count(name) > 1), None)
    if clash:
        raise ConfigError(f"two runs of the sweep would share the workdir {clash!r}: make their values differ")
    return runs


def load_sweep(path: str | Path) -> list[Run]:
    """Imports a sweep file and expands its `get_sweep()`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no sweep file {str(path)!r}: pass --sweep sweeps/NAME.py")
    module = import_file(path, f"sweeps.{path.stem}")
    if not callable(getattr(module, "get_sweep", None)):
        raise ConfigError(f"{path} is not a sweep: it has no get_sweep()")
    return make_runs(module.get_sweep())


def check_overrides(config: ml_collections.ConfigDict, runs: Sequence[Run]) -> None:
    """Fails in one line on the first override key the config does not have (open sections excepted)."""
    keys = {key for run in runs for key, _ in run.overrides}
    closed = sorted(key for key in keys if not key.startswith(tuple(section + "." for section in OPEN_SECTIONS)))
    message = unknown_key_message(config, closed)
    if message:
        raise ConfigError(f"sweep: {message}")
    for run in runs:  # a value of the wrong type fails here, not minutes later in a child process
        trial = copy.deepcopy(config)
        try:
            trial.update_from_flattened_dict({key: value for key, value in run.overrides if key in closed})
        except (TypeError, ValueError) as error:
            raise ConfigError(f"sweep run {run.name}: {str(error).splitlines()[0]}") from None


def command(
    run: Run, config_argument: str, root: str | Path, launch: str | Path = "launch.py", extra: Sequence[str] = ()
) -> list[str]:
    """The launch.py command line of one run; `extra` flags (the sweep command's own overrides) come first."""
    overrides = [f"--config.{key}={format_value(value)}" for key, value in run.overrides]
    return [
        sys.executable,
        str(launch),
        f"--config={config_argument}",
        f"--workdir={Path(root) / run.name}",
        *extra,
        *overrides,
    ]


def is_finished(workdir: str | Path) -> bool:
    """Whether the workdir holds a run that reached its last step (or stopped early) and wrote results."""
    workdir = Path(workdir)
    results_file, config_file = workdir / "results.json", workdir / "config.json"
    if not results_file.exists() or not config_file.exists():
        return False
    results = json.loads(results_file.read_text())
    num_steps = json.loads(config_file.read_text())["config"]["num_steps"]
    return (
        results.get("stopped_early", False) or results["step"] == num_steps
    )  # train.py writes the flag only when True


def emit(
    runs: Sequence[Run],
    config_argument: str,
    root: str | Path,
    launch: str | Path = "launch.py",
    extra: Sequence[str] = (),
) -> list[str]:
    """One shell command per unfinished run, for a cluster scheduler (a job array, GNU parallel)."""
    return [
        shlex.join(command(run, config_argument, root, launch, extra))
        for run in runs
        if not is_finished(Path(root) / run.name)
    ]


def core_slots(parallel: int, cores: Sequence[int]) -> list[set[int]]:
    """`parallel` disjoint sets of cores covering `cores` (a slot per concurrent run)."""
    cores = sorted(cores)
    if parallel > len(cores):
        raise ConfigError(f"--sweep_parallel {parallel} exceeds the {len(cores)} cores this process may use")
    share = len(cores) // parallel
    return [set(cores[index * share : (index + 1) * share]) for index in range(parallel)]


def child_environment(threads: int) -> dict[str, str]:
    """The environment of one of several concurrent runs: XLA and BLAS limited to `threads` threads."""
    environment = dict(os.environ)
    xla = f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
    environment["XLA_FLAGS"] = f"{environment.get('XLA_FLAGS', '')} {xla}".strip()
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        environment[name] = str(threads)
    return environment


def _start(run: Run, argv: list[str], workdir: Path, cores: set[int] | None) -> subprocess.Popen:
    """Starts one run, its output in WORKDIR/sweep.log; pinned to `cores` when given."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / LOG_FILE, "a")
    log.write(f"$ {shlex.join(argv)}\n")
    log.flush()
    environment = child_environment(len(cores)) if cores else None
    if cores:  # pinned by a Python that then execs the run: a preexec_fn would fork this (maybe threaded) process
        pin = f"import os, sys; os.sched_setaffinity(0, {sorted(cores)}); os.execvp(sys.argv[1], sys.argv[1:])"
        argv = [sys.executable, "-c", pin, *argv]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=environment)


def write_manifest(root: Path, config_argument: str, runs: Sequence[Run]) -> None:
    """ROOT/sweep.json: the base config and each run's overrides (research.tools.report labels runs by them)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "config": config_argument,
        "runs": [{"name": run.name, "overrides": dict(run.overrides)} for run in runs],
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def run_sweep(
    runs: Sequence[Run],
    config_argument: str,
    root: str | Path,
    *,
    parallel: int = 1,
    launch: str | Path = "launch.py",
    extra: Sequence[str] = (),
    echo: Callable[[str], None] = print,
) -> dict[str, int]:
    """Runs every unfinished run, `parallel` at a time; returns {name: exit code} of those started."""
    root = Path(root)
    pending = [run for run in runs if not is_finished(root / run.name)]
    echo(
        f"sweep: {len(runs)} runs in {root}, {len(runs) - len(pending)} finished already, {len(pending)} to run, "
        f"{parallel} at a time"
    )
    slots = core_slots(parallel, sorted(os.sched_getaffinity(0))) if parallel > 1 else [None]
    free, running, codes = list(range(len(slots))), {}, {}
    write_manifest(root, config_argument, runs)

    def forward(number, frame):  # the runs save a checkpoint and exit; nothing new starts
        pending.clear()
        for process, *_ in running.values():
            process.send_signal(number)

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            while pending and free:
                run, slot = pending.pop(0), free.pop(0)
                argv = command(run, config_argument, root, launch, extra)
                running[run.name] = (_start(run, argv, root / run.name, slots[slot]), slot, time.perf_counter())
            time.sleep(0.2)
            for name, (process, slot, started) in list(running.items()):
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # wait4: the run's CPU time too
                if pid == 0:
                    continue
                process.returncode = os.waitstatus_to_exitcode(status)
                del running[name]
                free.append(slot)
                codes[name] = process.returncode
                outcome = f"FAILED (exit {process.returncode}, see {root / name / LOG_FILE})"
                if process.returncode == 0:  # a run stopped by a signal saves, exits 0 and resumes next time
                    outcome = "done" if is_finished(root / name) else "stopped, resumable"
                seconds, cpu = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
                echo(
                    f"[{len(codes)}/{len(codes) + len(running) + len(pending)}] {name}: {outcome} "
                    f"in {seconds:.0f} s (CPU {cpu:.0f} s)"
                )
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return codes


def main(
    config: ml_collections.ConfigDict,
    config_argument: str,
    sweep_file: str,
    workdir: str | None,
    *,
    overrides: Mapping[str, Any],
    parallel: int,
    emit_only: bool,
    launch: str | Path,
    slurm_script: str = "",
) -> bool:
    """launch.py --sweep: checks every run's overrides, then prints the unfinished runs' commands
    (`emit_only`, absolute paths for a scheduler), writes them as a SLURM job array (`slurm_script`)
    or runs them; True when none failed."""
    path, _, variant = config_argument.partition(":")
    default_root = Path("runs") / Path(sweep_file).stem / (Path(path).stem + (f"_{variant}" if variant else ""))
    root = workdir or str(default_root)
    runs = load_sweep(sweep_file)
    check_overrides(config, runs)
    extra = [f"--config.{key}={format_value(value)}" for key, value in overrides.items()]  # to every run
    absolute = str(Path(path).resolve()) + (f":{variant}" if variant else "")
    if emit_only:
        for line in emit(runs, absolute, Path(root).resolve(), launch, extra):
            print(line)
        return True
    if slurm_script:
        unfinished = [run for run in runs if not is_finished(Path(root) / run.name)]
        commands = [command(run, absolute, Path(root).resolve(), launch, extra) for run in unfinished]
        if not commands:
            print(f"every run of the sweep in {root} is finished: no job array written")
            return True
        logs = Path(root).resolve() / "slurm_logs"
        logs.mkdir(parents=True, exist_ok=True)
        script = slurm.array_script(commands, job_name=Path(sweep_file).stem, log_dir=str(logs))
        Path(slurm_script).write_text(script)
        print(f"wrote a job array of {len(commands)} unfinished runs to {slurm_script}: sbatch {slurm_script}")
        return True
    codes = run_sweep(
        runs, config_argument, root, parallel=parallel or len(os.sched_getaffinity(0)), launch=launch, extra=extra
    )
    failed = sorted(name for name, code in codes.items() if code)
    print(f"sweep finished in {root}: {len(codes) - len(failed)} ran, {len(failed)} failed {failed or ''}".rstrip())
    print(f"tables and figures: python -m research.tools.report {root}")
    return not failed
