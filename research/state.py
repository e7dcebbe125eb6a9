"""The training state: a pytree of arrays only, so orbax saves it as is and eval_shape sizes it."""

from typing import Any

import flax.struct
import jax
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; functions (model, optimizer) live outside it."""

    step: jax.Array
    params: PyTree
    model_state: PyTree  # non-trainable collections such as BatchNorm's batch_stats; {} for most models
    opt_state: optax.OptState
    rng: jax.Array  # a raw uint32[2] key (jax.random.PRNGKey), which checkpoints as plain data
