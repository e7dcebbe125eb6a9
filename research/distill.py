"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student trained against a teacher run's predictions.

`config.distill.teacher` names a trained run's workdir (`distill.step` its checkpoint, 0: the latest).
The training loss becomes
    loss_weight x (the experiment's loss) + kl_weight x T^2 x KL(softmax(teacher / T) || softmax(student / T))
with T the temperature (T^2 keeps the soft term's gradients on the scale of the hard one's as T grows, as in
the paper), the KL averaged over the batch's real examples (an LM's scored positions). Evaluation is the
experiment's own, on the student alone.

The teacher runs inside the jitted train step, in inference mode (its `logits_fn` hook or model.apply), on the
student's inputs (reshaped to the teacher's example shape when only the layout differs: an MLP student of a
CNN teacher). Its variables (the EMA or schedule-free average when its optimizer kept one) live in the train
state's `model_state["teacher"]`, sharded by the teacher's param_rules on the student's mesh: loaded once at
step 0, then checkpointed with the student, so a resume is exact whatever happens to the teacher run later
(the price: each checkpoint holds the teacher too). The student's logits in the KL term come from its
inference-mode forward (no dropout), beside the experiment's loss.

  python launch.py --config experiments/mnist_mlp.py:cpu --workdir runs/student \
      --config.distill.teacher=runs/mnist_cnn_cpu --config.distill.temperature=4
Measured (3 seeds, docs/results.md "Distillation"): mnist_mlp :cpu students of the mnist_cnn :cpu teacher.
"""

import dataclasses
import functools
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import checkpoint, experiment, metrics, saved
from research.config import ConfigError

PyTree = Any
TEACHER = "teacher"  # the model_state collection holding the teacher's variables


def without_teacher(model_state: dict) -> dict:
    """A model state's collections other than a distillation teacher's."""
    return {name: value for name, value in model_state.items() if name != TEACHER}


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A trained run as a frozen teacher: its experiment, its Setup on the student's mesh, and the step to load."""

    workdir: Path
    step: int
    module: ModuleType
    setup: Any  # research.steps.Setup of the teacher's config

    @property
    def abstract_variables(self) -> dict:
        """The teacher's variables as ShapeDtypeStructs with their shardings (the teacher's own teacher left out)."""
        state = self.setup.abstract_state
        return {"params": state.params} | without_teacher(state.model_state)

    def logits(self, variables: dict, inputs: jax.Array) -> jax.Array:
        """The teacher's logits for a batch of the student's inputs."""
        example = self.setup.batch_spec["inputs"].shape[1:]
        if inputs.shape[1:] != example:
            if np.prod(inputs.shape[1:]) != np.prod(example):
                raise ConfigError(
                    f"distill.teacher {self.workdir} takes inputs of shape {example}, the student's are "
                    f"{inputs.shape[1:]}: distil from a teacher trained on the same data"
                )
            inputs = inputs.reshape(inputs.shape[0], *example)
        return experiment.logits_of(
            self.module, self.setup.model, variables, inputs.astype(self.setup.batch_spec["inputs"].dtype)
        )

    def load(self) -> dict:
        """The teacher's evaluation variables from its checkpoint, in their shardings."""
        directory = self.workdir / checkpoint.CHECKPOINT_DIR
        state = saved.weights(directory, self.step, self.setup.abstract_state, self.setup.config.optimizer.name)
        return {"params": state.params} | without_teacher(state.model_state)


def load_teacher(config: ml_collections.ConfigDict, student: ModuleType, mesh, build: Callable) -> Teacher:
    """The teacher `config.distill` names, its experiment found beside the student's, built on `mesh`."""
    settings = config.distill
    if settings.temperature <= 0 or settings.kl_weight < 0 or settings.loss_weight < 0:
        raise ConfigError(
            f"distill: temperature {settings.temperature} must be > 0 and the weights "
            f"({settings.kl_weight}, {settings.loss_weight}) >= 0"
        )
    workdir = Path(settings.teacher).absolute()
    try:
        _, module, teacher_config = experiment.saved_run(workdir, Path(student.__file__).parent)
    except ConfigError as error:
        raise ConfigError(f"distill.teacher: {error}") from None
    _, step = saved.saved_step(workdir, settings.step, "distill.teacher")
    with teacher_config.unlocked():  # shapes only: the teacher's batch is the student's size on the student's mesh
        teacher_config.batch_size, teacher_config.optimizer.accumulate_steps = config.batch_size, 1
    return Teacher(workdir, step, module, build(teacher_config, module, mesh))


def _weights(batch: dict, shape: tuple) -> jax.Array:
    """Which per-example (or per-position) KL values count: an LM's scored positions, else the batch's mask."""
    if "targets" in batch and tuple(batch["targets"].shape) == tuple(shape):
        return metrics.position_weights(batch)
    mask = batch["mask"]  # per example: masked_mean broadcasts it over the trailing axes
    return mask.reshape(mask.shape + (1,) * (len(shape) - mask.ndim))


def kl_at_temperature(teacher_logits: jax.Array, student_logits: jax.Array, temperature: float) -> jax.Array:
    """T^2 KL(softmax(teacher / T) || softmax(student / T)) over the last axis, one value per leading index."""
    teacher_log = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature)
    student_log = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature)
    return temperature**2 * jnp.sum(jnp.exp(teacher_log) * (teacher_log - student_log), axis=-1)


def distilled(loss_fn: Callable, student: ModuleType, model: nn.Module, teacher: Teacher, settings) -> Callable:
    """The train loss of the module docstring; `loss_fn` is the experiment's (bound, penalised) loss."""

    def loss(params, batch, rng, *, model_state):
        own = without_teacher(model_state)
        usual, aux = loss_fn(params, batch, rng, **({"model_state": own} if own else {}))
        aux = dict(aux)
        updated = aux.pop("model_state", {})  # collections not returned keep their values (steps.train_step)
        teacher_logits = jax.lax.stop_gradient(teacher.logits(model_state[TEACHER], batch["inputs"]))
        student_logits = experiment.logits_of(student, model, {"params": params} | own, batch["inputs"])
        if teacher_logits.shape != student_logits.shape:
            raise ConfigError(
                f"distill.teacher {teacher.workdir} predicts {teacher_logits.shape[1:]} per example, the student "
                f"{student_logits.shape[1:]}: teacher and student need the same classes (vocabulary)"
            )
        kl = kl_at_temperature(teacher_logits, student_logits, settings.temperature)
        kl = metrics.masked_mean(kl, _weights(batch, kl.shape))
        total = settings.loss_weight * usual + settings.kl_weight * kl
        return total, aux | {"distill_kl": kl, "task_loss": usual, "model_state": updated}

    return loss


def evaluated_alone(eval_fn: Callable) -> Callable:
    """The student's evaluation: `eval_fn` with the teacher's collection left out of its model state."""

    @functools.wraps(eval_fn)
    def evaluate(params, batch, *, model_state):
        own = without_teacher(model_state)
        return eval_fn(params, batch, **({"model_state": own} if own else {}))

    return evaluate


def with_teacher_placeholder(init_variables: Callable, teacher: Teacher) -> Callable:
    """The student's variables plus zeros of the teacher's shapes: Setup.init_state loads the real ones."""

    def init(rng, batch):
        zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), teacher.abstract_variables)
        return dict(init_variables(rng, batch)) | {TEACHER: zeros}

    return init


def teacher_shardings(shardings: PyTree, teacher: Teacher) -> PyTree:
    """The student's state shardings with the teacher's collection placed as the teacher's run places it."""
    where = jax.tree.map(lambda leaf: leaf.sharding, teacher.abstract_variables)
    return shardings.replace(model_state=shardings.model_state | {TEACHER: where})
