"""Optimizers by name, or a user's own factory from a file or module, wrapped with the schedule,
clipping, decoupled weight decay and parameter EMA the config asks for, then with frozen
parameters and non-finite updates handled (`make_tx`; gradient accumulation is the train step's:
research/optim/accumulation.py).

A factory is `make(learning_rate, **kwargs) -> optax.GradientTransformation`. The config names it:
`optimizer.name` is a key of OPTIMIZERS, `path/to/file.py:make` or `package.module:make`
(`optax:adabelief`, `optax.contrib:sophia`). Any optax transformation meets the trainer's contract as
it is (research/optim/contract.py).
"""

import difflib
import importlib
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib

from research.config import optimizer_config
from research.errors import ConfigError
from research.optim import ademamix, cautious, contract, matrices, precision, pruning, regularizers, soap
from research.optim.contract import first_line, line_in
from research.optim.schedules import SCHEDULES
from research.tree import path_name

Factory = Callable[..., optax.GradientTransformation]


def momentum(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9) -> optax.GradientTransformation:
    """SGD with heavy-ball momentum (Polyak, 1964)."""
    return optax.sgd(learning_rate, momentum=momentum)


def nesterov(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9) -> optax.GradientTransformation:
    """SGD with Nesterov momentum (Nesterov, 1983; Sutskever et al., 2013)."""
    return optax.sgd(learning_rate, momentum=momentum, nesterov=True)


def discriminative_adam(
    learning_rate: optax.ScalarOrSchedule,
    scale: float = 1.0,
    scaled: str = r"^encoder/",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Adam whose steps on the parameters matching `scaled` (a regex over their paths) are multiplied by
    `scale`: a lower rate for pre-trained layers than for a new head (Howard & Ruder 2018, discriminative
    fine-tuning)."""
    pattern = re.compile(scaled)
    in_scaled = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: bool(pattern.search(path_name(path))), params
    )
    return optax.chain(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), optax.masked(optax.scale(scale), in_scaled))


def muon(learning_rate: optax.ScalarOrSchedule, **kwargs) -> optax.GradientTransformation:
    """Muon (Jordan et al. 2024): momentum orthogonalised by Newton-Schulz on the hidden layers' matrices, each
    scanned layer's and expert's apart (research/optim/matrices.py), AdamW on embeddings, output heads and vectors
    (the recipe of Jordan et al. and of Liu et al. 2025); optax.contrib.muon's other arguments as they are
    (`optax.contrib:muon` is optax's own choice: rank-2 leaves only, embeddings included)."""
    return optax.contrib.muon(learning_rate, muon_weight_dimension_numbers=matrices.hidden_matrices, **kwargs)


muon.__signature__ = inspect.signature(optax.contrib.muon).replace(
    parameters=[
        parameter
        for name, parameter in inspect.signature(optax.contrib.muon).parameters.items()
        if name != "muon_weight_dimension_numbers"
    ]
)


OPTIMIZERS: dict[str, Factory] = {
    "sgd": optax.sgd,
    "momentum": momentum,
    "nesterov": nesterov,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "adam": optax.adam,
    "adamw": optax.adamw,
    "nadamw": optax.nadamw,
    "lamb": optax.lamb,
    "lion": optax.lion,
    "adafactor": optax.adafactor,
    "muon": muon,
    "soap": soap.scale_by_soap,  # a direction: the contract adds the learning rate
    "schedule_free_adamw": optax.contrib.schedule_free_adamw,
    "adopt": optax.contrib.adopt,
    "ademamix": ademamix.ademamix,
    "cautious_adamw": cautious.cautious_adamw,
    "discriminative_adam": discriminative_adam,
}


def _import(source: str) -> Any:
    """The module named by the part of a spec before ':': a .py file path or a dotted module name."""
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"optimizer file {source!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"user_optimizer_{path.stem}", path.resolve())
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as error:
            raise ConfigError(
                f"optimizer file {source}{line_in(error, str(path))}: importing it raised {first_line(error)}"
            ) from None
        return module
    try:
        return importlib.import_module(source)
    except Exception as error:
        raise ConfigError(f"optimizer module {source!r}: importing it raised {first_line(error)}") from None


def load_factory(name: str) -> tuple[Factory, str]:
    """(factory, how to name it in errors) for a registry key or a `file.py:function` / `module:function` spec."""
    if name in OPTIMIZERS:
        return OPTIMIZERS[name], f"optimizer {name!r}"
    if ":" not in name:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown optimizer {name!r}{hint}; choose one of {sorted(OPTIMIZERS)} or pass path/to/file.py:function"
        )
    source, _, attribute = name.rpartition(":")
    module = _import(source)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        defined = sorted(
            key for key, value in vars(module).items() if inspect.isfunction(value) and not key.startswith("_")
        )
        raise ConfigError(f"optimizer {source}: no function {attribute!r} in it; it defines {defined}")
    return factory, name


def _settings(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The full optimizer config: research.config.optimizer_config() updated by `config` (a dict or ConfigDict)."""
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    settings = optimizer_config()
    unknown = sorted(set(given) - set(settings))
    if unknown:
        raise ConfigError(f"unknown optimizer config keys {unknown}; valid: {sorted(settings)}")
    schedule = given.pop("schedule", {})
    settings.update(given)
    settings.schedule.update(schedule)
    settings.kwargs = ml_collections.ConfigDict(given.get("kwargs", {}))
    return settings


def _build(factory: Factory, origin: str, learning_rate: float, kwargs: dict) -> None:
    """Calls the factory once with plain values, so a bad argument or return value fails here, named."""
    try:
        inspect.signature(factory).bind(learning_rate=learning_rate, **kwargs)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(factory).parameters)
        raise ConfigError(f"{origin}: {error}; it accepts: {accepted}") from None
    factory(learning_rate=learning_rate, **kwargs)  # its errors are one line (research/optim/contract.py)


def static_names(settings: ml_collections.ConfigDict, factory: Factory, origin: str) -> set[str]:
    """The factory's arguments that stay Python values: all but `learning_rate` and the floats the config
    passes in `kwargs`, less those `static_kwargs` (comma-separated names) keeps static."""
    parameters = inspect.signature(factory).parameters
    kept = {name.strip() for name in settings.static_kwargs.split(",") if name.strip()}
    unknown = sorted(kept - set(parameters))
    if unknown and not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        raise ConfigError(
            f"optimizer.static_kwargs names {unknown}, not arguments of {origin}: {', '.join(parameters)}"
        )
    given = settings.kwargs.to_dict()
    injected = {name for name, value in given.items() if isinstance(value, float) and name not in kept}
    return {name for name in parameters if name != "learning_rate" and name not in injected}


def make_optimizer(config: Mapping[str, Any], num_steps: int = 0) -> optax.GradientTransformation:
    """The optimizer the config describes (see research.config.optimizer_config); num_steps sizes decaying schedules.

    `learning_rate` and the float arguments the config passes become arrays in the optimizer state
    (optax.inject_hyperparams: a new value needs no recompiling); the factory's defaults, non-floats and
    the names in `static_kwargs` stay Python values, so the optimizer's code may branch on them."""
    settings = _settings(config)
    factory, origin = load_factory(settings.name)
    factory = contract.conforming(factory, origin)
    kwargs = settings.kwargs.to_dict()
    _build(factory, origin, settings.learning_rate, kwargs)
    if settings.schedule.name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {settings.schedule.name!r}; choose one of {sorted(SCHEDULES)}")
    learning_rate = SCHEDULES[settings.schedule.name](settings.schedule, settings.learning_rate, num_steps)
    static = sorted(static_names(settings, factory, origin))
    parts = []
    if settings.clip_global_norm > 0:
        parts.append(optax.clip_by_global_norm(settings.clip_global_norm))
    parts.append(optax.inject_hyperparams(factory, static_args=static)(learning_rate=learning_rate, **kwargs))
    if settings.weight_decay > 0:
        mask = lambda params: regularizers.decay_mask(params, settings.decay_exclude)
        parts.append(optax.masked(regularizers.decoupled_weight_decay(settings.weight_decay, learning_rate), mask))
    if settings.ema_decay > 0:
        parts.append(regularizers.ema_of_params(settings.ema_decay))
    tx = optax.chain(*parts)
    if settings.moment_dtype not in ("", "float32", "bfloat16"):
        raise ConfigError(f"optimizer.moment_dtype {settings.moment_dtype!r}: use '', 'float32' or 'bfloat16'")
    if settings.moment_dtype:
        tx = precision.in_dtype(tx, settings.moment_dtype)
    return precision.with_master_weights(tx) if settings.master_weights else tx


def make_tx(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The trainer's optimizer: `config.optimizer`, with `config.freeze` (a regex over parameter paths)
    kept fixed; `config.nonfinite` "skip" drops NaN/inf updates ("stop" and "rollback" are the loop's)."""
    tx = make_optimizer(config.optimizer, config.num_steps)
    if config.freeze:
        try:
            pattern = re.compile(config.freeze)
        except re.error as error:
            raise ConfigError(f"freeze {config.freeze!r} is not a regular expression: {error}") from None
        labels = lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if pattern.search(path_name(path)) else "trained", params
        )
        tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)
    if config.pruning.sparsity > 0:
        if config.optimizer.ema_decay > 0:
            raise ConfigError("pruning with optimizer.ema_decay: the evaluated average would not be sparse; use one")
        settings = config.pruning
        end = settings.end_step or int(0.75 * config.num_steps)
        tx = optax.chain(
            tx,
            pruning.magnitude_pruning(
                settings.sparsity, settings.start_step, end, settings.every, settings.scope, settings.include
            ),
        )
    if config.nonfinite == "skip":
        tx = optax.apply_if_finite(tx, max_consecutive_errors=config.nonfinite_max_skips)
    elif config.nonfinite not in ("stop", "rollback"):
        raise ConfigError(f"nonfinite must be 'stop', 'skip' or 'rollback', not {config.nonfinite!r}")
    return tx


def current_learning_rate(opt_state: optax.OptState) -> jax.Array | None:
    """The learning rate the schedule gave the last update (from the inject_hyperparams state)."""
    found = optax.tree_utils.tree_get_all_with_path(opt_state, "learning_rate")
    return found[0][1] if found else None


def _shapes(tree) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(leaf.shape), str(leaf.dtype)) for leaf in jax.tree.leaves(tree)]


def check_against_params(tx: optax.GradientTransformation, params: Any, origin: str) -> None:
    """Traces init and one update on `params` (abstract is fine), called as the train step calls it: updates
    must mirror the params and the state keep its structure. Decides which extra arguments the update takes."""
    value_fn = lambda params: jnp.zeros((), jnp.float32)
    update = lambda grads, state, params: contract.update(
        tx, grads, state, params, value=value_fn(params), value_fn=value_fn
    )
    try:
        state = jax.eval_shape(tx.init, params)
        updates, new_state = jax.eval_shape(update, params, state, params)
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{origin}: init/update on the model's parameters raised {first_line(error)}") from None
    if jax.tree.structure(updates) != jax.tree.structure(params) or _shapes(updates) != _shapes(params):
        raise ConfigError(
            f"{origin}: update returned updates that do not match the params (structure or shapes); "
            "return one update per parameter, shaped like it"
        )
    if jax.tree.structure(new_state) != jax.tree.structure(state) or _shapes(new_state) != _shapes(state):
        raise ConfigError(
            f"{origin}: update returned a state whose structure, shapes or dtypes differ from init's; "
            "keep the state's layout fixed (a NamedTuple of arrays, cast back to their dtypes)"
        )


def origin_of(name: str) -> str:
    """How errors name the optimizer `name`."""
    return f"optimizer {name!r}" if name in OPTIMIZERS else name
