"""The training loop: `train_and_evaluate` resumes or starts a run, steps it, evaluates, checkpoints.

The loop knows nothing about any one experiment: it calls `research.steps.build` for the jitted
steps, feeds them batches, keeps the host at most two steps ahead of the devices
(`DispatchWindow`), logs metrics a step late, evaluates every `eval_every` steps (stopping early
when the configured metric stops improving) and checkpoints by the config's policy.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
from jax.sharding import Mesh

from research import checkpoint, perf, rollback, runtime, saved, sharding, slurm, watchdog
from research import experiment as experiment_lib
from research import metrics as metrics_lib
from research.config import ConfigError, check_trainer
from research.logger import Logger, LossSpikes, NonFiniteError, TrainMetrics, read_jsonl
from research.optim.regularizers import eval_params
from research.state import TrainState
from research.steps import Setup, build

PyTree = Any


class DispatchWindow:
    """Keeps the host at most `depth` dispatched steps ahead of the devices.

    JAX dispatches asynchronously, so a loop that never reads a result can enqueue hundreds of
    steps. XLA:CPU admits at most 32 in-flight computations per device and launches each device's
    share of a program from a shared thread pool; once a loop runs that far ahead, the devices'
    launches of one program can be admitted out of step, and a collective (the gradient all-reduce)
    waits for a participant queued behind it: the process aborts ("Termination timeout for all
    reduce ... only 7 of them arrived"; tests/test_sharding.py reproduces it). `add(x)` after each
    step waits for the step `depth` steps back, which leaves the devices the current step and the
    next to run while the host prepares the one after.
    """

    def __init__(self, depth: int = 2):
        if depth < 1:
            raise ValueError(f"DispatchWindow depth {depth}: must be at least 1")
        self.depth, self.pending = depth, []

    def add(self, step_output: PyTree) -> None:
        """Records a dispatched step by (any of) its outputs; blocks on the one `depth` steps back."""
        self.pending.append(jax.tree.leaves(step_output)[0])
        while len(self.pending) > self.depth:
            jax.block_until_ready(self.pending.pop(0))


def accumulate(step_outputs: Iterable[Mapping[str, metrics_lib.Metric]]) -> dict[str, metrics_lib.Metric] | None:
    """Merges the metric accumulators of dispatched eval steps on device, the host staying at most
    two steps ahead; None when there were no steps."""
    accumulated, window = None, DispatchWindow()
    for output in step_outputs:
        accumulated = metrics_lib.merge(accumulated, output)
        window.add(accumulated)
    return accumulated


def evaluate(state: TrainState, dataset: Iterable, *, step_fn: Callable, mesh: Mesh) -> dict[str, float]:
    """One pass over `dataset`; accumulators merge on device, numbers reach the host once."""
    accumulated = accumulate(step_fn(state, sharding.put_batch(batch, mesh)) for batch in dataset)
    if accumulated is None:
        raise ValueError("the evaluation split yielded no batches")
    return metrics_lib.compute(accumulated)


def should_stop(history: Sequence[float], *, mode: str, patience: int) -> bool:
    """True when the last `patience` evaluations did not beat the best one before them."""
    if patience <= 0 or len(history) <= patience:
        return False
    best_before = min(history[:-patience]) if mode == "min" else max(history[:-patience])
    recent = history[-patience:]
    improved = min(recent) < best_before if mode == "min" else max(recent) > best_before
    return not improved


def stop_early(history: list[float], results: dict[str, float], early_stopping: ml_collections.ConfigDict) -> bool:
    """Appends eval/<metric> to `history`; True when it has not improved for `patience` evaluations."""
    if not early_stopping.metric:
        return False
    key = f"eval/{early_stopping.metric}"
    if key not in results or early_stopping.mode not in ("min", "max"):
        raise ConfigError(
            f"early_stopping: metric must be one of {sorted(name[5:] for name in results)} and mode 'min' or 'max'"
        )
    history.append(results[key])
    return should_stop(history, mode=early_stopping.mode, patience=early_stopping.patience)


def _eval_history(workdir: Path, early_stopping, up_to_step: int) -> list[float]:
    """The early-stopping metric's values logged up to a resumed step, so patience survives a restart."""
    path, key = workdir / "metrics.jsonl", f"eval/{early_stopping.metric}"
    if not early_stopping.metric or not up_to_step or not path.exists():
        return []
    return [record[key] for record in read_jsonl(path) if key in record and record["step"] <= up_to_step]


def _start(setup: Setup, train_iterator, manager, allow_config_change: bool) -> tuple[int, TrainState]:
    """(start step, state): restored from the newest good checkpoint (the iterator moved to match), else fresh."""
    config = setup.config
    step, state = checkpoint.restore_latest(
        manager, setup.abstract_state, train_iterator, config, allow_config_change=allow_config_change
    )
    if state is None:
        state = setup.init_state()
        if config.init_from.workdir:
            state = saved.init_from(state, setup.state_shardings, setup.tx, config.init_from)
        return 0, state
    print(f"resuming from the checkpoint at step {step} in {manager.directory}")
    return step, state


def _finished_results(results_file: Path, start: int, num_steps: int) -> dict[str, float] | None:
    """The final metrics, when the checkpoint at `start` is the end of a run that wrote its results; else None."""
    if not results_file.exists():
        return None
    results = json.loads(results_file.read_text())
    if results["step"] != start or (start != num_steps and not results.get("stopped_early", False)):
        return None
    return {key: value for key, value in results.items() if key not in ("step", "stopped_early")}


def _write_results(results_file: Path, last_step: int, final: dict[str, float], num_steps: int) -> None:
    """results.json: the last step, whether the run stopped early, the final metrics (written whole or not at all)."""
    summary = {"step": last_step} | ({"stopped_early": True} if last_step < num_steps else {})
    written = results_file.with_name(results_file.name + ".tmp")
    written.write_text(json.dumps(summary | final, indent=2) + "\n")
    written.replace(results_file)


@dataclasses.dataclass
class _Run:
    """What one call of train_and_evaluate holds between steps: the state and where it goes."""

    setup: Setup
    state: TrainState
    train_iterator: Any
    eval_data: dict[str, Iterable]
    manager: Any
    logger: Logger
    train_metrics: TrainMetrics
    profiler: perf.StepProfiler
    step: int = 0  # the step the loop is at (its batch read)

    def evaluate(self, split: str, prefix: str, step: int) -> dict[str, float]:
        """Metrics of `split` (with the parameters' EMA when the optimizer keeps one), logged as `prefix/...`."""
        state = self.state.replace(params=eval_params(self.state.params, self.state.opt_state))
        results = evaluate(state, self.eval_data[split], step_fn=self.setup.eval_step, mesh=self.setup.mesh)
        results = {f"{prefix}/{name}": value for name, value in results.items()}
        self.logger.write(step, results)
        return results

    def save(self, step: int, metrics: dict | None = None, force: bool = False) -> None:
        """Checkpoints when the policy (or `force`) says so; a non-finite state is never saved."""
        if force or self.manager.should_save(step):
            self.train_metrics.check_pending(step)
            checkpoint.save(
                self.manager, step, self.state, self.train_iterator, self.setup.config, metrics=metrics, force=force
            )

    def close(self, manager: bool = True, quietly: bool = False) -> None:
        """Ends the profile, waits for the last checkpoint, closes the logs (and the checkpoint manager);
        `quietly` (the run is failing already) tries each and lets the first error stand."""
        actions = [self.profiler.close, self.manager.wait_until_finished, self.logger.close]
        for action in actions + ([self.manager.close] if manager else []):
            try:
                action()
            except Exception:
                if not quietly:
                    raise


def _make_run(
    setup: Setup,
    state: TrainState,
    experiment: Any,
    train_iterator,
    manager,
    workdir: Path,
    start: int,
    spikes: LossSpikes | None = None,
) -> _Run:
    """The loop's state from `start`: evaluation data, the logger and its throughput, the profiler."""
    config = setup.config
    logger = Logger(workdir, total_steps=config.num_steps, start_step=start)
    skip = config.nonfinite == "skip"
    train_metrics = TrainMetrics(
        logger, config.batch_size, start, skip, throughput=perf.throughput_of(config, experiment), spikes=spikes
    )
    eval_data = {split: experiment.make_data(config, split) for split in ("validation", "test")}
    profiler = perf.StepProfiler(config.profile_steps, workdir / "profile")
    return _Run(setup, state, train_iterator, eval_data, manager, logger, train_metrics, profiler)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    experiment: Any,
    workdir: str | Path,
    *,
    mesh: Mesh | None = None,
    allow_config_change: bool = False,
    stop_at_step: int | None = None,
) -> dict[str, float]:
    """Trains to `config.num_steps` (resuming from the workdir's checkpoints), evaluating every
    `config.eval_every` steps; returns the final metrics. `stop_at_step` saves and stops early,
    as a preemption would (for job time slices and tests). A bad stretch is rolled back when
    `config.nonfinite` is "rollback" (research/rollback.py)."""
    workdir = Path(workdir)
    check_trainer(config)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {str(workdir)!r} is a file: give a directory (a new one, or a run's)")
    workdir.mkdir(parents=True, exist_ok=True)
    train_iterator = iter(experiment.make_data(config, "train"))
    first_batch = next(train_iterator)
    setup = build(config, experiment, mesh, batch=first_batch)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start, state = _start(setup, train_iterator, manager, allow_config_change)
    results_file = workdir / "results.json"
    finished = _finished_results(results_file, start, config.num_steps)
    if finished is not None:
        manager.close()
        print(f"the run in {workdir} is finished; its results are in {results_file}")
        return finished
    batch = sharding.put_batch(first_batch if start == 0 else next(train_iterator), setup.mesh)
    with watchdog.PeerWatchdog(lambda: checkpoint.newest_complete(manager)):
        last_step, final = _train(
            setup, experiment, train_iterator, manager, workdir, start, state, batch, stop_at_step
        )
    if last_step is None:
        return {}
    if jax.process_index() == 0:
        _write_results(results_file, last_step, final, config.num_steps)
    return final


def _train(setup: Setup, experiment, train_iterator, manager, workdir: Path, start: int, state, batch, stop_at_step):
    """(last step, final metrics) of training from `start`, rolling back past bad stretches when configured;
    (None, None) after a preemption's save. A failed file operation becomes a one-line StorageError."""
    config = setup.config
    history = _eval_history(workdir, config.early_stopping, start)
    spikes = LossSpikes(config.rollback.spike_factor, config.rollback.spike_window, config.rollback.spike_steps)
    rollbacks = rollback.Rollbacks(workdir, config)
    run = _make_run(setup, state, experiment, train_iterator, manager, workdir, start, spikes)
    try:
        while True:
            try:
                last_step, final = _loop(run, batch, start, history, stop_at_step), None
                if last_step is not None:
                    final = run.evaluate("validation", "eval", last_step) | run.evaluate("test", "test", last_step)
                    if start < last_step:
                        run.save(last_step, final, force=True)
                run.close()
                return last_step, final
            except NonFiniteError as error:
                if not rollbacks.allowed():
                    last_good = f"the last good checkpoint is step {manager.latest_step()} in {manager.directory}"
                    raise NonFiniteError(f"{error}; {rollbacks.summary()}{last_good}", error.step) from None
                run.close(manager=False)
                start, state, batch = _roll_back(run, error, rollbacks)
                spikes.restart(start)
                history = _eval_history(workdir, config.early_stopping, start)
                run = _make_run(setup, state, experiment, train_iterator, manager, workdir, start, spikes)
    except BaseException as error:
        run.close(quietly=True)
        if checkpoint.is_storage_failure(error):  # a full disk, a permission, a directory removed under the run
            raise checkpoint.StorageError(checkpoint.storage_failure(error, manager)) from None
        raise


def _roll_back(run: _Run, error: NonFiniteError, rollbacks: rollback.Rollbacks) -> tuple[int, TrainState, Any]:
    """(start, state, first batch) after rolling back past `error`'s bad step (research/rollback.py): the
    state from the newest checkpoint before it, the data iterator left where it is (plus `skip_batches`)."""
    set_aside = rollback.set_aside_from(run.manager, error.step)
    start, state = _start(run.setup, None, run.manager, allow_config_change=True)  # None: the data stays put
    extra = run.setup.config.rollback.skip_batches
    rollback.skip_batches(run.train_iterator, extra)
    rollbacks.record(error, start, run.step - start + extra, set_aside)
    return start, state, sharding.put_batch(next(run.train_iterator), run.setup.mesh)


def _loop(run: _Run, batch, start: int, history: list[float], stop_at_step: int | None) -> int | None:
    """Steps from `start` to the end; returns the last step trained, or None after a preemption's save."""
    config, metrics_window, dispatched = run.setup.config, run.train_metrics, DispatchWindow()
    with checkpoint.PreemptionWatcher() as watcher:
        for step in range(start + 1, config.num_steps + 1):
            run.step = step
            if step > start + 1:
                batch = sharding.put_batch(next(run.train_iterator), run.setup.mesh)
            run.profiler.before(step)
            run.state, metrics = run.setup.train_step(run.state, batch)
            dispatched.add(metrics)
            run.profiler.after(step, run.state)
            metrics_window.flush()  # the previous window, now that this step is dispatched
            metrics_window.add(metrics)
            if step % config.log_every == 0 or step == config.num_steps:
                metrics_window.finish_window(step)
            evaluated = None
            if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                metrics_window.flush()
                evaluated = run.evaluate("validation", "eval", step)
                if stop_early(history, evaluated, config.early_stopping):
                    metrics_window.finish_window(step)
                    metrics_window.flush()
                    return step
            stopping = watcher.requested is not None or step == stop_at_step
            if step < config.num_steps:  # the last step is saved by the caller, with the final metrics
                run.save(step, evaluated, force=stopping or bool(evaluated and config.checkpoint.best_metric))
            if stopping:
                metrics_window.flush()
                metrics_window.finish_window(step)
                metrics_window.flush()
                run.manager.wait_until_finished()
                print(
                    f"stopped at step {step} ({watcher.requested or 'stop_at_step'}); "
                    f"checkpoint saved in {run.manager.directory}"
                )
                requeued = slurm.requeue_after(watcher.requested)
                if requeued:
                    print(requeued)
                return None
    metrics_window.flush()
    return config.num_steps


def launch(
    config: ml_collections.ConfigDict,
    experiment: Any,
    name: str,
    workdir: str | Path,
    *,
    allow_config_change: bool = False,
) -> None:
    """launch.py's training mode: names the run, claims the workdir, trains, prints the final metrics."""
    check_trainer(config)
    if jax.process_index() == 0:
        print(
            f"experiment {name} on {jax.process_count()} process(es), {jax.device_count()} device(s), "
            f"allocator {runtime.allocator_in_use()}\n{config}"
        )
        experiment_lib.claim_workdir(workdir, name, config, overwrite=allow_config_change)
    results = train_and_evaluate(config, experiment, workdir, allow_config_change=allow_config_change)
    if results and jax.process_index() == 0:
        print("final: " + "  ".join(f"{key} {value:.4f}" for key, value in results.items()))
