"""The training loop: `train_and_evaluate` resumes or starts a run, steps it, evaluates, checkpoints.

The loop knows nothing about any one experiment: it calls `research.steps.build` for the jitted
steps, feeds them batches, keeps the host at most two steps ahead of the devices
(`DispatchWindow`), logs metrics a step late, evaluates every `eval_every` steps (stopping early
when the configured metric stops improving) and checkpoints by the config's policy.
"""

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_collections
from jax.sharding import Mesh

from research import checkpoint, early_stopping, perf, runtime, sharding, trained_run
from research import experiment as experiment_lib
from research import metrics as metrics_lib
from research.config import check_trainer
from research.errors import NonFiniteError, StorageError
from research.logger import Logger, TrainMetrics, check_backends
from research.optim.regularizers import eval_params
from research.resilience import rollback, slurm, storage, watchdog
from research.resilience.preemption import PreemptionWatcher
from research.state import TrainState
from research.steps import Setup, build, with_features

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
class Run:
    """One training run between steps: its Setup and train state, its data, checkpoints and logs."""

    setup: Setup
    experiment: Any
    workdir: Path
    manager: Any  # research.checkpoint.make_manager's
    train_iterator: Any
    batch: Any = None  # the next step's batch on the mesh, when read ahead
    state: TrainState | None = None
    step: int = 0  # the last step restored or dispatched
    started: int = 0  # the step this stretch of training started from (a restore's, or 0)
    resumed: str = ""  # what restoring found (or init_from loaded), said after the run's header
    logger: Logger | None = None  # this and below: the loop's companions (`open_logs`)
    train_metrics: TrainMetrics | None = None
    profiler: perf.StepProfiler | None = None
    eval_data: dict[str, Iterable] = dataclasses.field(default_factory=dict)
    history: list[float] = dataclasses.field(default_factory=list)  # early stopping's metric, by evaluation
    spikes: rollback.LossSpikes | None = None
    rollbacks: rollback.Rollbacks | None = None
    downstream: Any = None  # config.evals's harness tasks (research/tools/evaluate/training.py), when set

    @property
    def config(self) -> ml_collections.ConfigDict:
        return self.setup.config

    def complete(self, stop_at_step: int | None = None) -> dict[str, float]:
        """Trains from the run's step to the end (`stop_at_step`: saves and stops there, as a preemption would),
        writes results.json; the final metrics ({} after a stop). A finished run returns its results."""
        results_file = self.workdir / "results.json"
        finished = _finished_results(results_file, self.step, self.config.num_steps)
        if finished is not None:
            self.manager.close()
            print(f"the run in {self.workdir} is finished; its results are in {results_file}")
            return finished
        if self.resumed:
            print(self.resumed)
        with watchdog.PeerWatchdog(lambda: checkpoint.newest_complete(self.manager)):
            final = self.train(stop_at_step)
        if final is None:
            return {}
        if jax.process_index() == 0:
            _write_results(results_file, self.step, final, self.config.num_steps)
        return final

    def train(self, stop_at_step: int | None) -> dict[str, float] | None:
        """The loop, rolled back past bad stretches when configured (research/resilience/rollback.py), then the
        final evaluation; None after a stop. A failed file operation becomes a one-line StorageError."""
        try:
            self.open_logs()
            while True:
                try:
                    last_step = self.loop(stop_at_step)
                    break
                except NonFiniteError as error:
                    self.roll_back(error)
            final = None
            if last_step is not None:
                final = self.evaluate("validation", "eval", last_step) | self.evaluate("test", "test", last_step)
                final |= self.evaluate_tasks(last_step) if self.downstream is not None else {}
                if self.started < last_step:
                    self.save(last_step, final, force=True)
                self.logger.summarize(final)
            self.close()
            return final
        except BaseException as error:
            self.close(quietly=True, failed=True)
            if storage.is_storage_failure(error):  # a full disk, a permission, a directory removed under the run
                raise StorageError(storage.storage_failure(error, self.manager)) from None
            raise

    def loop(self, stop_at_step: int | None) -> int | None:
        """Steps from the run's step to the end; the last step trained, or None after a stop's save."""
        config, dispatched = self.config, DispatchWindow()
        with PreemptionWatcher() as preemption:
            for step in range(self.step + 1, config.num_steps + 1):
                self.dispatch(step, dispatched)
                evaluated = self.evaluate_every(step)
                if evaluated and early_stopping.stop(self.history, evaluated, config.early_stopping):
                    self.train_metrics.close_window(step)
                    return step
                stopping = preemption.requested is not None or step == stop_at_step
                if step < config.num_steps:  # the last step is saved with the final metrics
                    self.save(step, evaluated, force=stopping or bool(evaluated and config.checkpoint.best_metric))
                if stopping:
                    return self.stop(step, preemption.requested)
        self.train_metrics.flush()
        return config.num_steps

    def dispatch(self, step: int, dispatched: DispatchWindow) -> None:
        """Dispatches train step `step` on its batch, then logs the finished window before it (the host never
        waits for this step's numbers)."""
        batch = self.batch if self.batch is not None else sharding.put_batch(next(self.train_iterator), self.setup.mesh)
        self.batch, self.step = None, step
        self.profiler.before(step)
        self.state, metrics = self.setup.train_step(self.state, batch)
        dispatched.add(metrics)
        self.profiler.after(step, self.state)
        self.train_metrics.flush()  # the previous window, now that this step is dispatched
        self.train_metrics.add(metrics)
        if step % self.config.log_every == 0 or step == self.config.num_steps:
            self.train_metrics.finish_window(step)

    def evaluate_every(self, step: int) -> dict[str, float] | None:
        """The validation metrics (and the downstream tasks' when they run too) when `step` is an evaluation step
        before the last (the last has the final ones); downstream tasks at other steps are logged, not returned."""
        every, last = self.config.eval_every, self.config.num_steps
        validation, tasks = bool(every) and step % every == 0, self.downstream is not None and self.downstream.due(step)
        if step == last or not (validation or tasks):
            return None
        self.train_metrics.flush()
        evaluated = self.evaluate("validation", "eval", step) if validation else None
        tasks = self.evaluate_tasks(step) if tasks else {}
        return None if evaluated is None else evaluated | tasks

    @property
    def evaluated_state(self) -> TrainState:
        """The state as evaluated: the parameters' EMA (or schedule-free average) when the optimizer keeps one."""
        return self.state.replace(params=eval_params(self.state.params, self.state.opt_state))

    def evaluate(self, split: str, prefix: str, step: int) -> dict[str, float]:
        """Metrics of `split` on `evaluated_state`, logged as `prefix/...`."""
        results = evaluate(
            self.evaluated_state, self.eval_data[split], step_fn=self.setup.eval_step, mesh=self.setup.mesh
        )
        results = {f"{prefix}/{name}": value for name, value in results.items()}
        self.logger.write(step, results)
        return results

    def evaluate_tasks(self, step: int) -> dict[str, float]:
        """The downstream tasks' metrics on `evaluated_state`, logged as `eval/TASK/METRIC` with their seconds."""
        start = time.perf_counter()
        results = {f"eval/{name}": value for name, value in self.downstream(self.evaluated_state).items()}
        self.logger.write(step, results | {"perf/evals_seconds": time.perf_counter() - start})
        return results

    def save(self, step: int, metrics: dict | None = None, force: bool = False) -> None:
        """Checkpoints when the policy (or `force`) says so; a non-finite state is never saved."""
        if force or self.manager.should_save(step):
            self.train_metrics.check_pending(step)
            iterator, config = self.train_iterator, self.config
            checkpoint.save(self.manager, step, self.state, iterator, config, metrics=metrics, force=force)

    def stop(self, step: int, signal_name: str | None) -> None:
        """After a stop's save: the logs flushed, the save finished, SLURM asked to requeue when it warned."""
        self.train_metrics.close_window(step)
        self.manager.wait_until_finished()
        print(f"stopped at step {step} ({signal_name or 'stop_at_step'}); checkpoint saved in {self.manager.directory}")
        requeued = slurm.requeue_after(signal_name)
        if requeued:
            print(requeued)

    def restore(self, iterator, allow_config_change: bool) -> None:
        """The newest good checkpoint (`iterator` moved to match; None leaves the data where it is), else a fresh
        state (with another run's parameters when init_from says so)."""
        config = self.config
        step, state = checkpoint.restore_latest(
            self.manager, self.setup.abstract_state, iterator, config, allow_config_change=allow_config_change
        )
        if state is None:
            state = self.setup.init_state()
            if config.init_from.workdir:
                where = self.setup.state_shardings
                state, self.resumed = trained_run.init_from(state, where, self.setup.tx, config.init_from)
        else:
            self.resumed = f"resuming from the checkpoint at step {step} in {self.manager.directory}"
        self.step = self.started = step
        self.state = state

    def roll_back(self, error: NonFiniteError) -> None:
        """Back to the newest checkpoint before `error`'s bad step, the data going on from here plus
        `rollback.skip_batches` (research/resilience/rollback.py); the error, with what was tried, when no
        rollback is left."""
        if not self.rollbacks.allowed():
            last_good = f"the last good checkpoint is step {self.manager.latest_step()} in {self.manager.directory}"
            raise NonFiniteError(f"{error}; {self.rollbacks.summary()}{last_good}", error.step) from None
        self.close(manager=False)
        set_aside, reached = rollback.set_aside_from(self.manager, error.step), self.step
        self.restore(None, allow_config_change=True)
        extra = self.config.rollback.skip_batches
        rollback.skip_batches(self.train_iterator, extra)
        self.rollbacks.record(error, self.step, reached - self.step + extra, set_aside)
        self.spikes.restart(self.step)
        self.open_logs()

    def open_logs(self) -> None:
        """The loop's companions from the run's step: the logger (metrics.jsonl kept up to the step), the train
        metrics with their throughput and loss-spike rule, the profiler, the evaluation data, early stopping's
        history."""
        config, workdir = self.config, self.workdir
        self.logger = Logger(workdir, total_steps=config.num_steps, start_step=self.step, config=config)
        throughput, skip = perf.throughput_of(config, self.experiment), config.nonfinite == "skip"
        self.train_metrics = TrainMetrics(
            self.logger, config.batch_size, self.step, skip, throughput=throughput, check_loss=self.spikes.check
        )
        self.profiler = perf.StepProfiler(config.profile_steps, workdir / "profile")
        self.eval_data = {split: self.experiment.make_data(config, split) for split in ("validation", "test")}
        self.history = early_stopping.history(workdir, config.early_stopping, self.step)

    def close(self, manager: bool = True, quietly: bool = False, failed: bool = False) -> None:
        """Ends the profile, waits for the last checkpoint, closes the logs (`failed`: marked so) and the checkpoint
        manager; `quietly` (the run is failing already) tries each and lets the first error stand."""
        close_logs = lambda: self.logger.close(failed) if self.logger is not None else None
        actions = [lambda: self.profiler.close(), self.manager.wait_until_finished, close_logs]
        for action in actions + ([self.manager.close] if manager else []):
            try:
                action()
            except Exception:
                if not quietly:
                    raise


def open_run(config: ml_collections.ConfigDict, experiment: Any, workdir, mesh: Mesh | None, allow_change) -> Run:
    """A run ready to train: its Setup built on the first training batch, its checkpoint manager, its state restored
    from the workdir's newest good checkpoint (`allow_change`: whatever config it was saved with) or made afresh.
    A bad input raises here, before anything is printed."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_backends(config)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    trained = with_features(config, experiment, mesh)  # what trains: the experiment as its features wrap it
    train_iterator = iter(trained.make_data(config, "train"))
    first_batch = next(train_iterator)
    setup = build(config, trained, mesh, batch=first_batch, wrapped=True)
    downstream = None
    if "evals" in config and config.evals.tasks:  # the harness is imported only when tasks are asked for
        from research.tools.evaluate.training import DuringTraining

        downstream = DuringTraining(config, experiment, setup, workdir)
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    run = Run(setup, trained, workdir, manager, train_iterator, downstream=downstream)
    run.restore(train_iterator, allow_change)
    run.batch = sharding.put_batch(first_batch if run.step == 0 else next(train_iterator), setup.mesh)
    rules = config.rollback
    run.spikes = rollback.LossSpikes(rules.spike_factor, rules.spike_window, rules.spike_steps)
    run.rollbacks = rollback.Rollbacks(workdir, config)
    return run


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
    `config.nonfinite` is "rollback" (research/resilience/rollback.py)."""
    check_trainer(config)
    return open_run(config, experiment, workdir, mesh, allow_config_change).complete(stop_at_step)


def header(name: str, config: ml_collections.ConfigDict, workdir: str | Path, overrides: Mapping | None) -> str:
    """A run's first line (what, on what, with which allocator), then the overrides of the experiment's config
    (`overrides` None: the whole config)."""
    where = f"{jax.process_count()} process(es), {jax.device_count()} device(s)"
    line = f"experiment {name} on {where}, allocator {runtime.allocator_in_use()}; config in {workdir}/config.json"
    if overrides is None:
        return f"{line}\n{config}"
    changed = "  ".join(f"{key}={value!r}" for key, value in overrides.items())
    return f"{line}\noverrides: {changed}" if changed else line


def launch(
    config: ml_collections.ConfigDict,
    experiment: Any,
    name: str,
    workdir: str | Path,
    *,
    overrides: Mapping | None = None,
    allow_config_change: bool = False,
) -> None:
    """launch.py's training mode: claims the workdir, opens the run (so that a bad input is one line with nothing
    before it), prints the header, trains, prints the final metrics."""
    check_trainer(config)
    lead = jax.process_index() == 0
    if lead:
        experiment_lib.claim_workdir(workdir, name, config, overwrite=allow_config_change)
    run = open_run(config, experiment, workdir, None, allow_config_change)
    if lead:
        print(header(name, config, workdir, overrides))
    results = run.complete()
    if results and lead:
        print("final: " + "  ".join(f"{key} {value:.4f}" for key, value in results.items()))
