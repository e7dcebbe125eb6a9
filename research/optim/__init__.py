"""Optimizers: a registry of optax factories chosen by the config."""

from research.optim.registry import OPTIMIZERS, make_optimizer

__all__ = ["OPTIMIZERS", "make_optimizer"]
