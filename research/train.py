"""The training loop: init_state, a pure train_step and eval_step, and train_and_evaluate.

The trainer knows nothing about any one experiment. An experiment is any object (usually a
module under experiments/) with `make_data(config, split)`, `make_model(config)`,
`loss_fn(params, batch, rng, *, model)` and optionally `eval_fn(params, batch, *, model)`
and `init_params(model, rng, batch)`. See README.md for the contract.
"""

import functools
import json
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

from research import metrics as metrics_lib
from research import sharding
from research.config import ConfigError
from research.logger import Logger
from research.optim import current_learning_rate, make_optimizer, regularizers
from research.optim.accumulation import accumulated_value_and_grad
from research.optim.registry import check_against_params, origin_of
from research.state import TrainState

PyTree = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def default_init_params(model, rng: jax.Array, batch: Batch) -> PyTree:
    """Parameters of a model whose `__call__` takes `batch["inputs"]`."""
    return model.init(rng, batch["inputs"])["params"]


def init_state(
    rng: jax.Array, batch: Batch, *, init_params: Callable, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[TrainState, PyTree]:
    """Creates the train state directly in its shardings; returns (state, state_shardings)."""

    def create(rng):
        init_rng, train_rng = jax.random.split(rng)
        params = init_params(init_rng, batch)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_rng)

    state_shardings = sharding.state_shardings(jax.eval_shape(create, rng), mesh)
    return jax.jit(create, out_shardings=state_shardings)(rng), state_shardings


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation, accumulate_steps: int = 1):
    """One optimizer step: gradient, update and apply, all in one jit region.

    An optimizer that takes extra arguments (optax.GradientTransformationExtraArgs) gets the loss
    `value`, its `grad` and `value_fn(params)`, the loss on this batch; others ignore them.
    With accumulate_steps k the gradient is the mean over k micro-batches of the batch, scanned."""
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = accumulated_value_and_grad(loss_fn, accumulate_steps)(state.params, batch, rng)
    value_fn = lambda params: loss_fn(params, batch, rng)[0]
    updates, opt_state = optax.with_extra_args_support(tx).update(
        grads, state.opt_state, state.params, value=loss, grad=grads, value_fn=value_fn
    )
    params = optax.apply_updates(state.params, updates)
    metrics = aux | {"loss": loss, "grad_norm": optax.global_norm(grads)}
    learning_rate = current_learning_rate(opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def loss_as_eval_fn(loss_fn: LossFn) -> Callable[..., dict[str, metrics_lib.Metric]]:
    """Evaluation by the training loss itself (rng=None: no dropout), weighted by real examples."""

    def eval_fn(params, batch):
        loss, aux = loss_fn(params, batch, None)
        weight = jnp.sum(batch["mask"])
        return {name: metrics_lib.Mean(total=value * weight, count=weight) for name, value in (aux | {"loss": loss}).items()}

    return eval_fn


def eval_step(params: PyTree, batch: Batch, *, eval_fn: Callable) -> dict[str, metrics_lib.Metric]:
    """Metric accumulators for one batch."""
    return eval_fn(params, batch)


def evaluate(params: PyTree, dataset: Iterable, *, step_fn: Callable, mesh: Mesh) -> dict[str, float]:
    """One pass over `dataset`; accumulators merge on device, numbers reach the host once."""
    accumulated = None
    for batch in dataset:
        accumulated = metrics_lib.merge(accumulated, step_fn(params, sharding.put_batch(batch, mesh)))
    if accumulated is None:
        raise ValueError("the evaluation split yielded no batches")
    return metrics_lib.compute(accumulated)


class _TrainMetrics:
    """Train metrics since the last log. A finished window reaches the host one step late,
    after the next step is dispatched, so the device never waits for the host."""

    def __init__(self, logger: Logger, batch_size: int):
        self.logger, self.batch_size = logger, batch_size
        self.window, self.finished = [], None
        self.last_time, self.last_step = time.perf_counter(), 0

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.window.append(metrics)

    def finish_window(self, step: int) -> None:
        self.finished, self.window = (step, self.window), []

    def flush(self) -> None:
        """Logs the mean of the finished window, if any (one device-to-host transfer)."""
        if self.finished is None:
            return
        step, window = self.finished
        host = jax.device_get(window)
        values = {f"train/{name}": float(np.mean([metrics[name] for metrics in host])) for name in host[0]}
        now = time.perf_counter()
        values["perf/examples_per_second"] = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        self.logger.write(step, values)
        self.logger.advance(step, values["perf/examples_per_second"])
        self.finished, self.last_time, self.last_step = None, now, step


def bind(experiment: ModuleType, model) -> dict[str, Callable]:
    """The experiment's loss_fn, eval_fn (or the loss as eval) and init_params with the model bound."""
    loss_fn = functools.partial(experiment.loss_fn, model=model)
    eval_fn = getattr(experiment, "eval_fn", None)
    eval_fn = functools.partial(eval_fn, model=model) if eval_fn else loss_as_eval_fn(loss_fn)
    init_params = functools.partial(getattr(experiment, "init_params", default_init_params), model)
    return {"loss_fn": loss_fn, "eval_fn": eval_fn, "init_params": init_params}


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
        in_shardings=(state_shardings.params, batch_sharding),
        out_shardings=replicated,
    )
    return train_fn, eval_fn


def train_and_evaluate(
    config: ml_collections.ConfigDict, experiment: ModuleType, workdir: str | Path, *, mesh: Mesh | None = None
) -> dict[str, float]:
    """Trains for `config.num_steps`, evaluating every `config.eval_every` steps; returns the final metrics."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    if config.batch_size % sharding.batch_divisor(mesh):
        raise ConfigError(
            f"batch_size {config.batch_size} must be a multiple of the {sharding.batch_divisor(mesh)} batch shards of mesh {dict(mesh.shape)}"
        )
    accumulate = config.optimizer.accumulate_steps
    if accumulate < 1 or config.batch_size % (accumulate * sharding.batch_divisor(mesh)):
        raise ConfigError(f"optimizer.accumulate_steps {accumulate} must be >= 1 and divide batch_size / batch shards")
    functions = regularize(bind(experiment, experiment.make_model(config)), config.optimizer)
    tx = make_optimizer(config.optimizer, config.num_steps)
    train_iterator = iter(experiment.make_data(config, "train"))
    batch = sharding.put_batch(next(train_iterator), mesh)
    abstract_params = jax.eval_shape(functions["init_params"], jax.random.PRNGKey(config.seed), batch)
    check_against_params(tx, abstract_params, origin_of(config.optimizer.name))
    state, state_shardings = init_state(
        jax.random.PRNGKey(config.seed), batch, init_params=functions["init_params"], tx=tx, mesh=mesh
    )
    train_fn, eval_fn = compile_steps(functions, tx, state_shardings, mesh, accumulate)
    eval_data = {split: experiment.make_data(config, split) for split in ("validation", "test")}
    logger = Logger(workdir, total_steps=config.num_steps)

    def run_eval(params, split: str, prefix: str, step: int) -> dict[str, float]:
        results = evaluate(params, eval_data[split], step_fn=eval_fn, mesh=mesh)
        results = {f"{prefix}/{name}": value for name, value in results.items()}
        logger.write(step, results)
        return results

    train_metrics = _TrainMetrics(logger, config.batch_size)
    last_step, history = config.num_steps, []
    try:
        for step in range(1, config.num_steps + 1):
            if step > 1:
                batch = sharding.put_batch(next(train_iterator), mesh)
            state, metrics = train_fn(state, batch)
            train_metrics.flush()
            train_metrics.add(metrics)
            if step % config.log_every == 0 or step == config.num_steps:
                train_metrics.finish_window(step)
            if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                train_metrics.flush()
                results = run_eval(regularizers.eval_params(state.params, state.opt_state), "validation", "eval", step)
                if stop_early(history, results, config.early_stopping):
                    last_step = step
                    break
        train_metrics.flush()
        params = regularizers.eval_params(state.params, state.opt_state)  # the EMA when enabled
        final = run_eval(params, "validation", "eval", last_step)
        final |= run_eval(params, "test", "test", last_step)
    finally:
        logger.close()
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps({"step": last_step} | final, indent=2) + "\n")
    return final
