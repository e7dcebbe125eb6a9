"""The training loop: init_state, a pure train_step and eval_step, and train_and_evaluate.

The trainer knows nothing about any one experiment. An experiment is any object (usually a
module under experiments/) with `make_data(config, split)`, `make_model(config)`,
`loss_fn(params, batch, rng, *, model)` and optionally `eval_fn(params, batch, *, model)`
and `init_variables(model, rng, batch)`. See README.md for the contract.

A model with state besides its parameters (BatchNorm statistics) keeps it in
`TrainState.model_state`; its loss_fn and eval_fn then take `model_state=` and loss_fn
returns the updated state as `aux["model_state"]`.
"""

import dataclasses
import functools
import json
import re
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from research import checkpoint
from research import metrics as metrics_lib
from research import perf
from research import sharding
from research.config import ConfigError
from research.logger import Logger, NonFiniteError, TrainMetrics
from research.optim import current_learning_rate, make_optimizer, regularizers
from research.optim.accumulation import accumulated_value_and_grad
from research.optim.registry import check_against_params, origin_of
from research.state import TrainState

PyTree = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def default_init_variables(model, rng: jax.Array, batch: Batch) -> PyTree:
    """All variables ({"params": ..., other collections}) of a model whose `__call__` takes `batch["inputs"]`."""
    return model.init(rng, batch["inputs"])


def init_state(
    rng: jax.Array, batch: Batch, *, init_variables: Callable, tx: optax.GradientTransformation, mesh: Mesh, rules=((".*", ()),)
) -> tuple[TrainState, PyTree]:
    """Creates the train state directly in its shardings; returns (state, state_shardings)."""
    create, abstract_state = state_initializer(rng, batch, init_variables=init_variables, tx=tx, mesh=mesh, rules=rules)
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
    return jax.jit(create, out_shardings=shardings)(rng), shardings


def state_initializer(
    rng: jax.Array, batch: Batch, *, init_variables: Callable, tx: optax.GradientTransformation, mesh: Mesh, rules=((".*", ()),)
):
    """(create(rng) -> TrainState, the abstract state with shardings), without allocating anything."""

    def create(rng, batch):
        init_rng, train_rng = jax.random.split(rng)
        variables = dict(init_variables(init_rng, batch))
        params = variables.pop("params")
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, model_state=variables, opt_state=tx.init(params), rng=train_rng
        )

    shapes = jax.eval_shape(create, rng, batch)  # the batch may itself be abstract (a dry run)
    shardings = sharding.state_shardings(shapes, mesh, rules)
    abstract_state = jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), shapes, shardings)
    return functools.partial(create, batch=batch), abstract_state


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation, accumulate_steps: int = 1):
    """One optimizer step: gradient, update and apply, all in one jit region.

    An optimizer that takes extra arguments (optax.GradientTransformationExtraArgs) gets the loss
    `value`, its `grad` and `value_fn(params)`, the loss on this batch; others ignore them.
    With accumulate_steps k the gradient is the mean over k micro-batches of the batch, scanned."""
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = _with_model_state(loss_fn, state.model_state)
    (loss, aux), grads = accumulated_value_and_grad(loss_fn, accumulate_steps)(state.params, batch, rng)
    aux = dict(aux)
    model_state = aux.pop("model_state") if state.model_state else state.model_state
    value_fn = lambda params: loss_fn(params, batch, rng)[0]
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.params, value=loss, grad=grads, value_fn=value_fn
    )
    params = optax.apply_updates(state.params, updates)
    metrics = aux | {"loss": loss, "grad_norm": optax.global_norm(grads)}
    learning_rate = current_learning_rate(opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics


def _with_model_state(fn: Callable, model_state: PyTree) -> Callable:
    """`fn` with `model_state=` bound when the model has state; `fn` itself otherwise."""
    return functools.partial(fn, model_state=model_state) if model_state else fn


def loss_as_eval_fn(loss_fn: LossFn) -> Callable[..., dict[str, metrics_lib.Metric]]:
    """Evaluation by the training loss itself (rng=None: no dropout), weighted by real examples."""

    def eval_fn(params, batch, **model_state):
        loss, aux = loss_fn(params, batch, None, **model_state)
        aux = {name: value for name, value in aux.items() if name != "model_state"}
        weight = jnp.sum(batch["mask"])
        return {name: metrics_lib.Mean(total=value * weight, count=weight) for name, value in (aux | {"loss": loss}).items()}

    return eval_fn


def eval_step(state: TrainState, batch: Batch, *, eval_fn: Callable) -> dict[str, metrics_lib.Metric]:
    """Metric accumulators for one batch (the model in inference mode: no dropout, running statistics)."""
    return _with_model_state(eval_fn, state.model_state)(state.params, batch)


def accumulate(step_outputs: Iterable[Mapping[str, metrics_lib.Metric]]) -> dict[str, metrics_lib.Metric] | None:
    """Merges the metric accumulators of dispatched eval steps on device, the host staying at most
    two steps ahead (sharding.DispatchWindow); None when there were no steps."""
    accumulated, window = None, sharding.DispatchWindow()
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


def bind(experiment: ModuleType, model) -> dict[str, Callable]:
    """The experiment's loss_fn, eval_fn (or the loss as eval) and init_variables with the model bound."""
    loss_fn = functools.partial(experiment.loss_fn, model=model)
    eval_fn = getattr(experiment, "eval_fn", None)
    eval_fn = functools.partial(eval_fn, model=model) if eval_fn else loss_as_eval_fn(loss_fn)
    init_variables = functools.partial(getattr(experiment, "init_variables", default_init_variables), model)
    return {"loss_fn": loss_fn, "eval_fn": eval_fn, "init_variables": init_variables}


def regularize(functions: dict[str, Callable], optimizer_config: ml_collections.ConfigDict) -> dict[str, Callable]:
    """The training loss plus the config's L1/L2 penalty; evaluation keeps the plain loss."""
    if not (optimizer_config.l1_penalty or optimizer_config.l2_penalty):
        return functions
    penalized = regularizers.with_penalty(
        functions["loss_fn"], l1=optimizer_config.l1_penalty, l2=optimizer_config.l2_penalty, exclude=optimizer_config.decay_exclude
    )
    return functions | {"loss_fn": penalized}


def stop_early(history: list[float], results: dict[str, float], early_stopping: ml_collections.ConfigDict) -> bool:
    """Appends eval/<metric> to `history`; True when it has not improved for `patience` evaluations."""
    if not early_stopping.metric:
        return False
    key = f"eval/{early_stopping.metric}"
    if key not in results or early_stopping.mode not in ("min", "max"):
        raise ConfigError(f"early_stopping: metric must be one of {sorted(name[5:] for name in results)} and mode 'min' or 'max'")
    history.append(results[key])
    return regularizers.should_stop(history, mode=early_stopping.mode, patience=early_stopping.patience)


def compile_steps(
    functions: dict[str, Callable], tx: optax.GradientTransformation, state_shardings, mesh: Mesh, accumulate_steps: int = 1
):
    """The jitted train step (state donated) and eval step, with their shardings."""
    batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    train_fn = jax.jit(
        functools.partial(train_step, loss_fn=functions["loss_fn"], tx=tx, accumulate_steps=accumulate_steps),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, eval_fn=functions["eval_fn"]),
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=replicated,
    )
    return train_fn, eval_fn


def make_tx(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The configured optimizer, with frozen parameters and non-finite updates handled."""
    tx = make_optimizer(config.optimizer, config.num_steps)
    if config.freeze:
        pattern = re.compile(config.freeze)
        labels = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if pattern.search(sharding.path_name(path)) else "trained", params
        )
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    if config.nonfinite == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=config.nonfinite_max_skips)
    elif config.nonfinite != "stop":
        raise ConfigError(f"nonfinite must be 'stop' or 'skip', not {config.nonfinite!r}")
    return tx


def _start(config, functions, tx, train_iterator, manager, mesh, allow_config_change: bool):
    """(start step, state, shardings, first batch): restored from the newest good checkpoint, else fresh."""
    batch = sharding.put_batch(next(train_iterator), mesh)
    rng = jax.random.PRNGKey(config.seed)
    create, abstract_state = state_initializer(
        rng, batch, init_variables=functions["init_variables"], tx=tx, mesh=mesh, rules=config.param_rules
    )
    shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract_state)
    check_against_params(tx, abstract_state.params, origin_of(config.optimizer.name))
    step, state = checkpoint.restore_latest(
        manager, abstract_state, train_iterator, config, allow_config_change=allow_config_change
    )
    if state is None:
        state = jax.jit(create, out_shardings=shardings)(rng)
        if config.init_from.workdir:
            state = _init_from(state, shardings, tx, config.init_from)
        return 0, state, shardings, batch
    print(f"resuming from the checkpoint at step {step} in {manager.directory}")
    return step, state, shardings, sharding.put_batch(next(train_iterator), mesh)


def _init_from(state: TrainState, shardings: TrainState, tx, init_from) -> TrainState:
    """Copies the parameters selected by regexes from another run's checkpoint into a fresh state."""
    source, step = checkpoint.load_params(init_from.workdir, init_from.step)
    source = {sharding.path_name(path): value for path, value in jax.tree_util.tree_leaves_with_path(source)}
    include, exclude = re.compile(init_from.include), re.compile(init_from.exclude) if init_from.exclude else None
    loaded, kept, mismatched = [], [], []

    def take(path, target, where):
        name = sharding.path_name(path)
        if name not in source or not include.search(name) or (exclude and exclude.search(name)):
            kept.append(name)
            return target
        if source[name].shape != target.shape:
            mismatched.append(f"{name} {tuple(source[name].shape)} vs {tuple(target.shape)}")
            return target
        loaded.append(name)
        return jax.device_put(np.asarray(source[name], target.dtype), where)

    params = jax.tree_util.tree_map_with_path(take, state.params, shardings.params)
    if mismatched:
        raise ConfigError(f"init_from: shapes differ for {', '.join(mismatched)}")
    print(f"init_from {init_from.workdir} step {step}: loaded {len(loaded)} arrays; "
          f"left at random init: {', '.join(kept) or 'none'}")
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)


def _finished(results_file: Path, start: int, num_steps: int) -> bool:
    """Whether the checkpoint at `start` is the end of a run that wrote its results."""
    if not results_file.exists():
        return False
    results = json.loads(results_file.read_text())
    return results["step"] == start and (start == num_steps or results.get("stopped_early", False))


@dataclasses.dataclass
class _Run:
    """What one call of train_and_evaluate holds between steps: the state and where it goes."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    state: TrainState
    train_iterator: Any
    eval_data: dict[str, Iterable]
    eval_fn: Callable
    manager: Any
    logger: Logger
    train_metrics: TrainMetrics
    profiler: perf.StepProfiler

    def evaluate(self, split: str, prefix: str, step: int) -> dict[str, float]:
        """Metrics of `split` (with the parameters' EMA when the optimizer keeps one), logged as `prefix/...`."""
        state = self.state.replace(params=regularizers.eval_params(self.state.params, self.state.opt_state))
        results = evaluate(state, self.eval_data[split], step_fn=self.eval_fn, mesh=self.mesh)
        results = {f"{prefix}/{name}": value for name, value in results.items()}
        self.logger.write(step, results)
        return results

    def save(self, step: int, metrics: dict | None = None, force: bool = False) -> None:
        """Checkpoints when the policy (or `force`) says so; a non-finite state is never saved."""
        if force or self.manager.should_save(step):
            self.train_metrics.check_pending(step)
            checkpoint.save(self.manager, step, self.state, self.train_iterator, self.config, metrics=metrics, force=True)


def _check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    shards = sharding.batch_divisor(mesh)
    if config.batch_size % shards:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}")
    accumulate = config.optimizer.accumulate_steps
    if accumulate < 1 or config.batch_size % (accumulate * shards):
        raise ConfigError(f"optimizer.accumulate_steps {accumulate} must be >= 1 and divide batch_size / batch shards")


def _eval_history(workdir: Path, early_stopping, up_to_step: int) -> list[float]:
    """The early-stopping metric's values logged up to a resumed step, so patience survives a restart."""
    path, key = workdir / "metrics.jsonl", f"eval/{early_stopping.metric}"
    if not early_stopping.metric or not up_to_step or not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [record[key] for record in records if key in record and record["step"] <= up_to_step]


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    experiment: ModuleType,
    workdir: str | Path,
    *,
    mesh: Mesh | None = None,
    allow_config_change: bool = False,
    stop_at_step: int | None = None,
) -> dict[str, float]:
    """Trains to `config.num_steps` (resuming from the workdir's checkpoints), evaluating every
    `config.eval_every` steps; returns the final metrics. `stop_at_step` saves and stops early,
    as a preemption would (for job time slices and tests)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    _check_batch(config, mesh)
    functions = regularize(bind(experiment, experiment.make_model(config)), config.optimizer)
    tx = make_tx(config)
    train_iterator = iter(experiment.make_data(config, "train"))
    manager = checkpoint.make_manager(workdir, config.checkpoint)
    start, state, shardings, batch = _start(config, functions, tx, train_iterator, manager, mesh, allow_config_change)
    results_file = workdir / "results.json"
    if _finished(results_file, start, config.num_steps):
        manager.close()
        print(f"the run in {workdir} is finished; its results are in {results_file}")
        return {key: value for key, value in json.loads(results_file.read_text()).items() if key not in ("step", "stopped_early")}
    train_fn, eval_fn = compile_steps(functions, tx, shardings, mesh, config.optimizer.accumulate_steps)
    history = _eval_history(workdir, config.early_stopping, start)
    logger = Logger(workdir, total_steps=config.num_steps, start_step=start)
    run = _Run(
        config, mesh, state, train_iterator, {split: experiment.make_data(config, split) for split in ("validation", "test")},
        eval_fn, manager, logger,
        TrainMetrics(logger, config.batch_size, start, skip_nonfinite=config.nonfinite == "skip", throughput=perf.throughput_of(config, experiment)),
        perf.StepProfiler(config.profile_steps, workdir / "profile"),
    )
    try:
        last_step = _loop(run, train_fn, batch, start, history, stop_at_step)
        if last_step is None:
            return {}
        final = run.evaluate("validation", "eval", last_step) | run.evaluate("test", "test", last_step)
        if start < last_step:
            run.save(last_step, final, force=True)
    except NonFiniteError as error:
        raise NonFiniteError(f"{error}; the last good checkpoint is step {manager.latest_step()} in {manager.directory}") from None
    finally:
        run.profiler.close()
        manager.wait_until_finished()
        manager.close()
        logger.close()
    if jax.process_index() == 0:
        summary = {"step": last_step} | ({"stopped_early": True} if last_step < config.num_steps else {})
        results_file.write_text(json.dumps(summary | final, indent=2) + "\n")
    return final


def _loop(run: _Run, train_fn: Callable, batch, start: int, history: list[float], stop_at_step: int | None) -> int | None:
    """Steps from `start` to the end; returns the last step trained, or None after a preemption's save."""
    config, metrics_window, dispatched = run.config, run.train_metrics, sharding.DispatchWindow()
    with checkpoint.PreemptionWatcher() as watcher:
        for step in range(start + 1, config.num_steps + 1):
            if step > start + 1:
                batch = sharding.put_batch(next(run.train_iterator), run.mesh)
            run.profiler.before(step)
            run.state, metrics = train_fn(run.state, batch)
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
                print(f"stopped at step {step} ({watcher.requested or 'stop_at_step'}); checkpoint saved in {run.manager.directory}")
                return None
    metrics_window.flush()
    return config.num_steps
