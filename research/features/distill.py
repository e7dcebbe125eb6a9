"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student trained against a teacher run's predictions.

`config.distill.teacher` names a trained run's workdir (`distill.step` its checkpoint, 0: the latest).
The training loss becomes
    loss_weight x (the experiment's loss) + kl_weight x T^2 x KL(softmax(teacher / T) || softmax(student / T))
with T the temperature (T^2 keeps the soft term's gradients on the scale of the hard one's as T grows, as in
the paper), the KL averaged over the batch's real examples (an LM's scored positions). Evaluation is the
experiment's own, on the student alone.

A feature that wraps the experiment (`wrap`, applied by research/steps.py `build` when `distill.teacher` is set):
the wrapped experiment's loss is the one above, its evaluation the student's alone, its initial variables the
student's plus the teacher's, which it loads from the teacher's run (the `loaded_variables` hook). The teacher
runs inside the jitted train step, in inference mode (its `logits_fn` hook or model.apply), on the student's
inputs (reshaped to the teacher's example shape when only the layout differs: an MLP student of a CNN
teacher). Its variables (the EMA or schedule-free average when its optimizer kept one) live in the train
state's `model_state["teacher"]`, placed by the param_rules like every other variable: loaded once at step 0,
then checkpointed with the student, so a resume is exact whatever happens to the teacher run later (the price:
each checkpoint holds the teacher too). The student's logits in the KL term come from its inference-mode
forward (no dropout), beside the experiment's loss.

  python launch.py --config experiments/mnist_mlp.py:cpu --workdir runs/student \
      --config.distill.teacher=runs/mnist_cnn_cpu --config.distill.temperature=4
Measured (3 seeds, docs/results.md "Distillation"): mnist_mlp :cpu students of the mnist_cnn :cpu teacher.
"""

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import checkpoint, experiment, metrics, trained_run
from research.errors import ConfigError

PyTree = Any
TEACHER = "teacher"  # the model_state collection holding the teacher's variables


def without_teacher(model_state: dict) -> dict:
    """A model state's collections other than a distillation teacher's."""
    return {name: value for name, value in model_state.items() if name != TEACHER}


def _own(model_state: dict) -> dict:
    """The keyword arguments that pass the student's own collections (none when it has no state)."""
    own = without_teacher(model_state)
    return {"model_state": own} if own else {}


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A trained run as a frozen teacher: its experiment, its Setup on the student's mesh, and the step to load."""

    workdir: Path
    step: int
    module: ModuleType
    setup: Any  # research.steps.Setup of the teacher's config

    @property
    def abstract_variables(self) -> dict:
        """The teacher's evaluation variables as ShapeDtypeStructs."""
        state = self.setup.abstract_state
        return {"params": state.params} | state.model_state

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

    def load(self, where: PyTree) -> dict:
        """The teacher's evaluation variables from its checkpoint, placed as `where` (ShapeDtypeStructs) says."""
        abstract = self.setup.abstract_state
        placed = abstract.replace(params=where["params"], model_state={k: v for k, v in where.items() if k != "params"})
        directory = self.workdir / checkpoint.CHECKPOINT_DIR
        state = trained_run.weights(directory, self.step, placed, self.setup.config.optimizer.name)
        return {"params": state.params} | state.model_state


def load_teacher(config: ml_collections.ConfigDict, student: ModuleType, mesh) -> Teacher:
    """The teacher `config.distill` names, its experiment found beside the student's, built on `mesh`."""
    from research.steps import build, with_features  # the core builds the teacher as any run; never imports this

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
    _, step = trained_run.saved_step(workdir, settings.step, "distill.teacher")
    with teacher_config.unlocked():  # shapes only: the teacher's batch is the student's size on the student's mesh
        teacher_config.batch_size, teacher_config.optimizer.accumulate_steps = config.batch_size, 1
    module = with_features(teacher_config, module, mesh, training=False)  # a LoRA teacher predicts with its adapters
    return Teacher(workdir, step, module, build(teacher_config, module, mesh, wrapped=True))


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


class Distilled:
    """The student's experiment with the teacher's loss, evaluation and variables (the module docstring); every
    other function and hook is the student's own."""

    def __init__(self, student: ModuleType, teacher: Teacher, settings: ml_collections.ConfigDict):
        self.student, self.teacher, self.settings = student, teacher, settings

    def __getattr__(self, name: str) -> Any:
        return getattr(self.student, name)

    def loss_fn(self, params, batch, rng, *, model: nn.Module, model_state: dict):
        """The experiment's loss, weighted, plus the weighted KL term to the teacher's predictions."""
        usual, aux = self.student.loss_fn(params, batch, rng, model=model, **_own(model_state))
        aux = dict(aux)
        updated = aux.pop("model_state", {})  # collections not returned keep their values (steps.train_step)
        inputs = batch["inputs"]
        teacher_logits = jax.lax.stop_gradient(self.teacher.logits(model_state[TEACHER], inputs))
        own = without_teacher(model_state)
        student_logits = experiment.logits_of(self.student, model, {"params": params} | own, inputs)
        if teacher_logits.shape != student_logits.shape:
            raise ConfigError(
                f"distill.teacher {self.teacher.workdir} predicts {teacher_logits.shape[1:]} per example, the "
                f"student {student_logits.shape[1:]}: teacher and student need the same classes (vocabulary)"
            )
        kl = kl_at_temperature(teacher_logits, student_logits, self.settings.temperature)
        kl = metrics.masked_mean(kl, _weights(batch, kl.shape))
        total = self.settings.loss_weight * usual + self.settings.kl_weight * kl
        return total, aux | {"distill_kl": kl, "task_loss": usual, "model_state": updated}

    def eval_fn(self, params, batch, *, model: nn.Module, model_state: dict):
        """The student's evaluation alone: its eval_fn hook, else its own loss as means."""
        from research.steps import loss_as_eval_fn

        own = _own(model_state)
        student_eval = experiment.hook(self.student, "eval_fn")
        if student_eval is not None:
            return student_eval(params, batch, model=model, **own)
        bound = lambda params, batch, rng, **state: self.student.loss_fn(params, batch, rng, model=model, **state)
        return loss_as_eval_fn(bound)(params, batch, **own)

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: dict) -> dict:
        """The student's variables plus zeros of the teacher's shapes (`loaded_variables` replaces them)."""
        from research.steps import default_init_variables

        init = experiment.hook(self.student, "init_variables", default_init_variables)
        zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), self.teacher.abstract_variables)
        return dict(init(model, rng, batch)) | {TEACHER: zeros}

    def loaded_variables(self, abstract_model_state: dict) -> dict:
        """The teacher's variables from its run, in the places the train state gives them."""
        return {TEACHER: self.teacher.load(abstract_model_state[TEACHER])}


def wrap(config: ml_collections.ConfigDict, student: ModuleType, mesh) -> Distilled:
    """The student's experiment distilled from the teacher `config.distill` names (its run built on `mesh`)."""
    return Distilled(student, load_teacher(config, student, mesh), config.distill)
