"""The pure train and eval steps, and `build`: everything a config compiles to, made in one place.

`build(config, experiment, mesh)` binds the experiment's functions to its model, assembles the
optimizer, sizes the train state abstractly (nothing is allocated) with its shardings, and jits
the train and eval steps. Training, the dry run, prediction, the optimizer tools, the benchmarks
and the tests all start from the `Setup` it returns.

A model with state besides its parameters (BatchNorm statistics) keeps it in
`TrainState.model_state`; its loss_fn and eval_fn then take `model_state=` and loss_fn returns
the updated state as `aux["model_state"]`.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from research import metrics as metrics_lib
from research import sharding
from research.errors import ConfigError
from research.experiment import hook
from research.optim import contract, current_learning_rate, make_tx
from research.optim.accumulation import accumulated_value_and_grad
from research.optim.registry import check_against_params, origin_of
from research.optim.regularizers import penalized
from research.state import TrainState

PyTree = Any
Batch = Mapping[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def train_step(
    state: TrainState, batch: Batch, *, loss_fn: LossFn, tx: optax.GradientTransformation, accumulate_steps: int = 1
):
    """One optimizer step: gradient, update and apply, all in one jit region.

    An optimizer that takes extra arguments (optax.GradientTransformationExtraArgs) gets the loss
    `value`, its `grad` and `value_fn(params)` (also as `obj_fn`), the loss on this batch.
    With accumulate_steps k the gradient is the mean over k micro-batches of the batch, scanned."""
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = _with_model_state(loss_fn, state.model_state)
    (loss, aux), grads = accumulated_value_and_grad(loss_fn, accumulate_steps)(state.params, batch, rng)
    aux = dict(aux)
    # The collections the loss returns are updated; those it does not return (loaded constants) keep their values.
    model_state = state.model_state | aux.pop("model_state") if state.model_state else state.model_state
    value_fn = lambda params: loss_fn(params, batch, rng)[0]
    updates, opt_state = contract.update(tx, grads, state.opt_state, state.params, value=loss, value_fn=value_fn)
    params = optax.apply_updates(state.params, updates)
    metrics = aux | {"loss": loss, "grad_norm": optax.global_norm(grads)}
    learning_rate = current_learning_rate(opt_state)
    if learning_rate is not None:
        metrics["learning_rate"] = learning_rate
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state, opt_state=opt_state)
    return new_state, metrics


def eval_step(state: TrainState, batch: Batch, *, eval_fn: Callable) -> dict[str, metrics_lib.Metric]:
    """Metric accumulators for one batch (the model in inference mode: no dropout, running statistics)."""
    return _with_model_state(eval_fn, state.model_state)(state.params, batch)


def _with_model_state(fn: Callable, model_state: PyTree) -> Callable:
    """`fn` with `model_state=` bound when the model has state; `fn` itself otherwise."""
    return functools.partial(fn, model_state=model_state) if model_state else fn


def loss_as_eval_fn(loss_fn: LossFn) -> Callable[..., dict[str, metrics_lib.Metric]]:
    """Evaluation by the training loss itself (rng=None: no dropout), weighted by real examples."""

    def eval_fn(params, batch, **model_state):
        loss, aux = loss_fn(params, batch, None, **model_state)
        aux = {name: value for name, value in aux.items() if name != "model_state"}
        weight = jnp.sum(batch["mask"])
        return {
            name: metrics_lib.Mean(total=value * weight, count=weight) for name, value in (aux | {"loss": loss}).items()
        }

    return eval_fn


def default_init_variables(model: nn.Module, rng: jax.Array, batch: Batch) -> PyTree:
    """All variables ({"params": ..., other collections}) of a model whose `__call__` takes `batch["inputs"]`."""
    return model.init(rng, batch["inputs"])


@dataclasses.dataclass(frozen=True)
class OnMesh:
    """A jitted function traced, lowered and run with its mesh set (`jax.set_mesh`), so that a model can
    pin its activations' layout by mesh axis name (research/models: `shard_batch`)."""

    function: Callable
    mesh: Mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.function(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.function.lower(*args)


@dataclasses.dataclass(frozen=True)
class Setup:
    """A config compiled: the model, its bound functions, the optimizer, the abstract train state with
    its shardings, and the jitted steps. Holds no arrays: `init_state` allocates a fresh state."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: nn.Module
    loss_fn: LossFn  # (params, batch, rng, **model_state): the experiment's, with the config's penalties
    eval_fn: Callable  # (params, batch, **model_state) -> metric accumulators
    init_variables: Callable  # (rng, batch) -> variables
    tx: optax.GradientTransformation
    batch_spec: PyTree  # one global training batch as ShapeDtypeStructs on the batch sharding
    abstract_state: TrainState  # ShapeDtypeStructs with their shardings
    train_step: Callable  # jitted (state, batch) -> (state, metrics); the state is donated
    eval_step: Callable  # jitted (state, batch) -> metric accumulators
    loaded_variables: Callable | None = None  # the experiment's hook: collections loaded after init (Hooks)

    @property
    def state_shardings(self) -> TrainState:
        return jax.tree.map(lambda leaf: leaf.sharding, self.abstract_state)

    @functools.cached_property
    def _jitted_initial_state(self) -> Callable:
        """initial_state for this setup, jitted once (traced on the first init_state) into the state's shardings."""
        create = functools.partial(
            initial_state, init_variables=self.init_variables, tx=self.tx, batch_spec=self.batch_spec
        )
        return jax.jit(create, out_shardings=self.state_shardings)

    def init_state(self, rng: jax.Array | None = None) -> TrainState:
        """A fresh train state made directly in its shardings, from `rng` (default PRNGKey(config.seed)), with the
        collections the experiment loads rather than initialises (its `loaded_variables` hook) in place."""
        state = self._jitted_initial_state(jax.random.PRNGKey(self.config.seed) if rng is None else rng)
        if self.loaded_variables is not None:
            state = state.replace(
                model_state=state.model_state | self.loaded_variables(self.abstract_state.model_state)
            )
        return state


def initial_state(
    rng: jax.Array, *, init_variables: Callable, tx: optax.GradientTransformation, batch_spec: PyTree
) -> TrainState:
    """Step 0: the model's variables and the optimizer's state, from `rng` (split for init and training)."""
    init_rng, train_rng = jax.random.split(rng)
    # Initial values depend only on the batch's shapes, so a constant batch stands in for real data.
    batch = jax.tree.map(lambda spec: jnp.ones(spec.shape, spec.dtype), batch_spec)
    variables = dict(init_variables(init_rng, batch))
    params = variables.pop("params")
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, model_state=variables, opt_state=tx.init(params), rng=train_rng
    )


def check_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
    """The global batch must split evenly over the mesh's batch shards and the accumulation's micro-batches."""
    shards = sharding.batch_divisor(mesh)
    if config.batch_size % shards:
        raise ConfigError(
            f"batch_size {config.batch_size} must be a multiple of the {shards} batch shards of mesh {dict(mesh.shape)}"
        )
    accumulate = config.optimizer.accumulate_steps
    if accumulate < 1 or config.batch_size % (accumulate * shards):
        raise ConfigError(f"optimizer.accumulate_steps {accumulate} must be >= 1 and divide batch_size / batch shards")


def batch_spec_of(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch that a process-local batch (numpy arrays or ShapeDtypeStructs) is a slice of; under context
    parallelism each array's positions must split evenly over the axis."""
    processes, spec, pieces = jax.process_count(), {}, sharding.context_shards(mesh)
    for key, value in batch.items():
        value = value if hasattr(value, "shape") else np.asarray(value)
        if pieces > 1 and value.ndim >= 2 and value.shape[1] % pieces:
            raise ConfigError(
                f"the batch's {key!r} has {value.shape[1]} positions: model.block_size {value.shape[1]} must be a "
                f"multiple of mesh.context {pieces}"
            )
        where = sharding.batch_sharding(mesh, value.shape)
        spec[key] = jax.ShapeDtypeStruct((value.shape[0] * processes, *value.shape[1:]), value.dtype, sharding=where)
    return spec


def with_features(config: ml_collections.ConfigDict, experiment: Any, mesh: Mesh, training: bool = True) -> Any:
    """The experiment wrapped by the optional features its config turns on (each imported only then, so a
    feature's module and config keys can go without the core noticing): low-rank adapters (research/features/
    lora.py: they change the model, so prediction has them too), and in `training` only distillation
    (research/features/distill.py) and preference optimisation (research/features/preference.py)."""
    if "lora" in config and config.lora.rank:
        from research.features import lora

        experiment = lora.wrap(config, experiment)
    if not training:
        return experiment
    if "preference" in config and config.preference.pairs:
        from research.features import preference

        experiment = preference.wrap(config, experiment)
    if "distill" in config and config.distill.teacher:
        from research.features import distill

        experiment = distill.wrap(config, experiment, mesh)
    return experiment


def folded(config: ml_collections.ConfigDict, params: PyTree) -> tuple[ml_collections.ConfigDict, PyTree]:
    """(config, params) of the experiment's own model: a feature that added parameters folds them into it (LoRA's
    adapters merged into their kernels); otherwise `config` and `params` themselves."""
    if "lora" in config and config.lora.rank:
        from research.features import lora

        return lora.merged(config, params)
    return config, params


def build(
    config: ml_collections.ConfigDict,
    experiment: Any,
    mesh: Mesh | None = None,
    batch: Mapping | None = None,
    features: bool = True,
    wrapped: bool = False,
) -> Setup:
    """The `Setup` of `experiment` under `config` on `mesh` (default: the config's). `batch` (numpy or
    ShapeDtypeStructs, this process's slice) gives the training batch's shapes; default: the first
    batch of `make_data(config, "train")`. `features` False: without the features that wrap its training
    (`with_features`; those that change the model stay), as prediction and a teacher use a trained model.
    `wrapped`: `experiment` is already as `with_features` wraps it (the loop reads its data first)."""
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    check_batch(config, mesh)
    experiment = experiment if wrapped else with_features(config, experiment, mesh, training=features)
    model = experiment.make_model(config)
    bound_loss = functools.partial(experiment.loss_fn, model=model)
    eval_fn = hook(experiment, "eval_fn")
    eval_fn = functools.partial(eval_fn, model=model) if eval_fn else loss_as_eval_fn(bound_loss)
    loss_fn = penalized(bound_loss, config.optimizer)
    init_variables = functools.partial(hook(experiment, "init_variables", default_init_variables), model)
    tx = hook(experiment, "make_tx", make_tx)(config)
    batch = next(iter(experiment.make_data(config, "train"))) if batch is None else batch
    batch_spec = batch_spec_of(batch, mesh)
    create = functools.partial(initial_state, init_variables=init_variables, tx=tx, batch_spec=batch_spec)
    shapes = jax.eval_shape(create, jax.random.PRNGKey(0))
    rules = hook(experiment, "param_rules", lambda config: config.param_rules)(config)
    shardings = sharding.state_shardings(shapes, mesh, rules)
    abstract_state = jax.tree.map(
        lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where), shapes, shardings
    )
    check_against_params(tx, abstract_state.params, origin_of(config.optimizer.name))
    replicated = sharding.replicated(mesh)
    batch_sharding = sharding.batch_sharding(mesh)  # context parallelism splits the sequences too: per array
    if sharding.context_shards(mesh) > 1:
        batch_sharding = {key: spec.sharding for key, spec in batch_spec.items()}
    jitted_train = jax.jit(
        functools.partial(train_step, loss_fn=loss_fn, tx=tx, accumulate_steps=config.optimizer.accumulate_steps),
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    jitted_eval = jax.jit(
        functools.partial(eval_step, eval_fn=eval_fn),
        in_shardings=(shardings, batch_sharding),
        out_shardings=replicated,
    )
    train, evaluate = OnMesh(jitted_train, mesh), OnMesh(jitted_eval, mesh)
    loaded = hook(experiment, "loaded_variables")
    return Setup(
        config, mesh, model, loss_fn, eval_fn, init_variables, tx, batch_spec, abstract_state, train, evaluate, loaded
    )
