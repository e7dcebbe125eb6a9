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
from research.optim import make_optimizer
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


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation):
    """One optimizer step: gradient, update and apply, all in one jit region."""
    rng = jax.random.fold_in(state.rng, state.step)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = aux | {"loss": loss, "grad_norm": optax.global_norm(grads)}
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


def _mean_of_window(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    """Host-side mean of the train metrics since the last log (one transfer for the whole window)."""
    host = jax.device_get(window)
    return {name: float(np.mean([metrics[name] for metrics in host])) for name in host[0]}


def bind(experiment: ModuleType, model) -> dict[str, Callable]:
    """The experiment's loss_fn, eval_fn (or the loss as eval) and init_params with the model bound."""
    loss_fn = functools.partial(experiment.loss_fn, model=model)
    eval_fn = getattr(experiment, "eval_fn", None)
    eval_fn = functools.partial(eval_fn, model=model) if eval_fn else loss_as_eval_fn(loss_fn)
    init_params = functools.partial(getattr(experiment, "init_params", default_init_params), model)
    return {"loss_fn": loss_fn, "eval_fn": eval_fn, "init_params": init_params}


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
    model = experiment.make_model(config)
    functions = bind(experiment, model)
    tx = make_optimizer(config.optimizer)
    train_iterator = iter(experiment.make_data(config, "train"))
    batch = sharding.put_batch(next(train_iterator), mesh)
    state, state_shardings = init_state(
        jax.random.PRNGKey(config.seed), batch, init_params=functions["init_params"], tx=tx, mesh=mesh
    )
    replicated = sharding.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, loss_fn=functions["loss_fn"], tx=tx),
        in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    eval_step_fn = jax.jit(
        functools.partial(eval_step, eval_fn=functions["eval_fn"]),
        in_shardings=(state_shardings.params, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
    )
    eval_data = {split: experiment.make_data(config, split) for split in ("validation", "test")}

    def run_eval(split: str, prefix: str, step: int) -> dict[str, float]:
        results = evaluate(state.params, eval_data[split], step_fn=eval_step_fn, mesh=mesh)
        results = {f"{prefix}/{name}": value for name, value in results.items()}
        logger.write(step, results)
        return results

    logger = Logger(workdir, total_steps=config.num_steps)
    window, pending = [], None
    last_time, last_step = time.perf_counter(), 0
    final = {}
    try:
        for step in range(1, config.num_steps + 1):
            if step > 1:
                batch = sharding.put_batch(next(train_iterator), mesh)
            state, metrics = step_fn(state, batch)
            window.append(metrics)
            # The previous window is fetched only now, after this step is dispatched, so the
            # device never waits for the host.
            if pending is not None:
                last_time, last_step = _log_window(logger, pending, config.batch_size, last_time, last_step)
                pending = None
            if step % config.log_every == 0 or step == config.num_steps:
                pending, window = (step, window), []
            if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
                if pending is not None:
                    last_time, last_step = _log_window(logger, pending, config.batch_size, last_time, last_step)
                    pending = None
                run_eval("validation", "eval", step)
        if pending is not None:
            _log_window(logger, pending, config.batch_size, last_time, last_step)
        final |= run_eval("validation", "eval", config.num_steps)
        final |= run_eval("test", "test", config.num_steps)
    finally:
        logger.close()
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps({"step": config.num_steps} | final, indent=2) + "\n")
    return final


def _log_window(logger: Logger, pending, batch_size: int, last_time: float, last_step: int) -> tuple[float, int]:
    step, window = pending
    values = {f"train/{name}": value for name, value in _mean_of_window(window).items()}
    now = time.perf_counter()
    examples_per_second = (step - last_step) * batch_size / max(now - last_time, 1e-9)
    values["perf/examples_per_second"] = examples_per_second
    logger.write(step, values)
    logger.advance(step, examples_per_second)
    return now, step
