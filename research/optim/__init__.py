"""Optimizers: a registry of optax factories chosen by the config, schedules, regularizers."""

from research.optim.registry import OPTIMIZERS, current_learning_rate, load_factory, make_optimizer, make_tx

__all__ = ["OPTIMIZERS", "current_learning_rate", "load_factory", "make_optimizer", "make_tx"]
