"""Optimizers by name: the config names a factory and gives its keyword arguments."""

import difflib
import inspect
from typing import Any, Callable, Mapping

import optax

from research.config import ConfigError



def momentum(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, nesterov: bool = False):
    """SGD with heavy-ball (Polyak, 1964) or Nesterov momentum."""
    return optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": momentum,
    "rmsprop": optax.rmsprop,
    "adam": optax.adam,
    "adamw": optax.adamw,
}


def make_optimizer(optimizer_config: Mapping[str, Any]) -> optax.GradientTransformation:
    """Builds `OPTIMIZERS[config.name](**other keys)`, failing with a one-line message on a bad name or argument."""
    kwargs = dict(optimizer_config)
    name = kwargs.pop("name")
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, OPTIMIZERS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown optimizer {name!r}{hint}; choose one of {sorted(OPTIMIZERS)}")
    factory = OPTIMIZERS[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(inspect.signature(factory).parameters)
        raise ConfigError(f"optimizer {name!r}: {error}; it accepts: {accepted}") from None
    return factory(**kwargs)
