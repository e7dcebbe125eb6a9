"""Learning-rate schedules by name: each maps (schedule config, peak, run length) to an optax schedule.

The config's `optimizer.schedule.name` picks one; its other keys (warmup_steps, decay_steps,
final_fraction, step_every, step_factor, decay_fraction, boundaries, factors) are shared by all,
each schedule reading the ones it needs. `decay_steps` 0 means the whole run.
"""

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import optax

from research.errors import ConfigError

Config = Mapping[str, Any]


def _horizon(config: Config, total_steps: int) -> int:
    return int(config["decay_steps"] or total_steps)


def constant(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """The peak learning rate throughout."""
    return optax.constant_schedule(peak)


def linear_warmup(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """From 0 to the peak over warmup_steps, then constant (Goyal et al., 2017)."""
    return optax.warmup_constant_schedule(0.0, peak, max(int(config["warmup_steps"]), 1))


def cosine(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """Cosine decay from the peak to final_fraction * peak (Loshchilov & Hutter, 2017, no restarts)."""
    return optax.cosine_decay_schedule(peak, max(_horizon(config, total_steps), 1), alpha=config["final_fraction"])


def warmup_cosine(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay; decay_steps counts the warmup too, as in optax."""
    warmup = int(config["warmup_steps"])
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup, max(_horizon(config, total_steps), warmup + 1), end_value=peak * config["final_fraction"]
    )


def step_decay(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """Multiply by step_factor every step_every steps (He et al., 2016)."""
    return optax.exponential_decay(peak, int(config["step_every"]), config["step_factor"], staircase=True)


def piecewise(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """The peak, multiplied by factors[i] from step boundaries[i] on: He et al. (2016)'s 0.1 / 10 at 32k and 48k."""
    boundaries, factors = tuple(config["boundaries"]), tuple(config["factors"])
    if (
        len(boundaries) != len(factors)
        or list(boundaries) != sorted(set(boundaries))
        or any(b <= 0 for b in boundaries)
    ):
        raise ConfigError(
            f"piecewise schedule: boundaries {boundaries} must be increasing positive steps, "
            f"one per factor in {factors}"
        )
    return optax.piecewise_constant_schedule(
        peak, {int(step): float(factor) for step, factor in zip(boundaries, factors)}
    )


def inverse_sqrt(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then peak * sqrt(warmup / step) (Vaswani et al., 2017)."""
    warmup = max(int(config["warmup_steps"]), 1)

    def schedule(count):
        step = jnp.maximum(count, 1).astype(jnp.float32)
        return peak * jnp.minimum(step / warmup, jnp.sqrt(warmup / step))

    return schedule


def warmup_stable_decay(config: Config, peak: float, total_steps: int) -> optax.Schedule:
    """Warmup, a constant plateau, then a linear decay over the last decay_fraction of the run (Hu et al., 2024)."""
    horizon = _horizon(config, total_steps)
    warmup = int(config["warmup_steps"])
    decay = max(int(round(config["decay_fraction"] * horizon)), 1)
    stable = max(horizon - warmup - decay, 0)
    pieces = [
        optax.linear_schedule(0.0, peak, max(warmup, 1)),
        optax.constant_schedule(peak),
        optax.linear_schedule(peak, peak * config["final_fraction"], decay),
    ]
    return optax.join_schedules(pieces, [warmup, warmup + stable])


SCHEDULES: dict[str, Callable[[Config, float, int], optax.Schedule]] = {
    "constant": constant,
    "linear_warmup": linear_warmup,
    "cosine": cosine,
    "warmup_cosine": warmup_cosine,
    "step": step_decay,
    "piecewise": piecewise,
    "inverse_sqrt": inverse_sqrt,
    "warmup_stable_decay": warmup_stable_decay,
}
