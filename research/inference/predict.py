"""Using a trained run: load its config and newest checkpoint, then generate text, classify
inputs or evaluate a split.

A workdir holds `config.json` ({"experiment": name, "config": {...}}) and `checkpoints/`; the
experiment module is found by name in the experiments directory. Prediction reads the experiment's
hooks (research/experiment.py): `encode_text` and `decode_tokens` make it a language model (it
generates, and its evaluation reports perplexity), `class_names` name a classifier's outputs,
`logits_fn` is the prediction when `model.apply(variables, inputs)` is not.

Everything runs on one device: prediction needs no mesh of its own.
"""

import dataclasses
from pathlib import Path
from types import ModuleType
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from research import checkpoint, experiment, sharding, trained_run
from research import metrics as metrics_lib
from research.errors import ConfigError
from research.experiment import hook
from research.inference.generate import Sampling, timed_generate
from research.state import TrainState
from research.steps import Setup, build, folded, with_features
from research.train import accumulate

PyTree = Any


@dataclasses.dataclass
class Run:
    """A trained run ready to use: its experiment, config, model and evaluation parameters."""

    name: str
    module: ModuleType
    config: ml_collections.ConfigDict
    setup: Setup  # on one device
    state: TrainState  # restored; its params are the EMA or schedule-free average when the optimizer keeps one
    example_inputs: jax.ShapeDtypeStruct  # one example's shape and dtype (no batch dimension)

    @property
    def model(self) -> nn.Module:
        return self.setup.model

    @property
    def params(self) -> PyTree:
        return self.state.params

    @property
    def model_state(self) -> PyTree:
        return self.state.model_state

    @property
    def step(self) -> int:
        return int(self.state.step)

    def with_params(self, params: PyTree) -> "Run":
        """The same run with other parameters (int8 ones, say)."""
        return dataclasses.replace(self, state=self.state.replace(params=params))

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.model_state}

    @property
    def is_language_model(self) -> bool:
        """Whether the experiment reads and writes text (its encode_text and decode_tokens hooks)."""
        return hook(self.module, "encode_text") is not None and hook(self.module, "decode_tokens") is not None

    def logits(self, inputs: jax.Array, variables: dict | None = None) -> jax.Array:
        """The model's prediction for a batch of inputs (the experiment's `logits_fn` if it has one)."""
        return experiment.logits_of(self.module, self.model, self.variables if variables is None else variables, inputs)


def load_run(
    workdir: str | Path, experiments_dir: str | Path = "experiments", which: str = "latest", merge: bool = True
) -> Run:
    """The run in `workdir` at the checkpoint `which` names ("latest", "best" or a step number), on one device;
    `merge`: as the experiment's own model (LoRA's adapters folded into its kernels), else as trained."""
    workdir = Path(workdir)
    name, module, config = experiment.saved_run(workdir, experiments_dir)
    directory = workdir.absolute() / checkpoint.CHECKPOINT_DIR
    if not checkpoint.complete_steps(directory):
        raise ConfigError(
            f"no checkpoints in {directory}: train first "
            f"(python launch.py --config experiments/{name}.py --workdir {workdir})"
        )
    step = checkpoint.choose_step(directory, which, config.checkpoint)
    batch = next(iter(module.make_data(config, "train")))  # the shapes of the abstract state
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    setup = build(config, module, mesh, batch=batch, features=False)  # as trained (with adapters), no teacher
    state = trained_run.weights(directory, step, setup.abstract_state, config.optimizer.name)
    if not merge:  # predictions through the features that change the model
        module = with_features(config, module, mesh, training=False)
    elif (folding := folded(config, state.params))[0] is not config:  # LoRA's adapters merged into the kernels
        config, params = folding
        setup = build(config, module, mesh, batch=batch, features=False)
        opt_state = jax.jit(setup.tx.init, out_shardings=setup.state_shardings.opt_state)(params)
        state = state.replace(params=params, opt_state=opt_state)  # a state of the plain setup's shape
    inputs = setup.batch_spec["inputs"]
    return Run(name, module, config, setup, state, jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype))


def class_names(run: Run, count: int) -> list[str]:
    names = hook(run.module, "class_names")
    return list(names(run.config)) if names else [str(index) for index in range(count)]


def classify(run: Run, inputs: np.ndarray, top: int = 3) -> list[list[tuple[str, float]]]:
    """For each input, the `top` classes with their probabilities, most likely first."""
    inputs = np.asarray(inputs, run.example_inputs.dtype).reshape(-1, *run.example_inputs.shape)
    probabilities_BxC = np.asarray(jax.nn.softmax(jax.jit(run.logits)(inputs), axis=-1))
    names = class_names(run, probabilities_BxC.shape[-1])
    order_BxK = np.argsort(-probabilities_BxC, axis=-1)[:, :top]
    return [
        [(names[index], float(row[index])) for index in indices] for row, indices in zip(probabilities_BxC, order_BxK)
    ]


def read_inputs(path: str, text: str | None = None) -> np.ndarray:
    """Examples from a .npy file, or from text (a file, or stdin when `path` is "-"): one per line, numbers split
    by spaces or commas."""
    if path.endswith(".npy"):
        return np.load(path)
    text = text if text is not None else Path(path).read_text()
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"no examples in {path}: give one example per line, its numbers split by spaces or commas")
    return np.array(rows, dtype=np.float32)


def evaluate(run: Run, split: str) -> dict[str, Any]:
    """The experiment's metrics on `split` (perplexity added for language models) and, for
    classifiers, the confusion matrix (rows: true class, columns: predicted)."""
    if (
        "splits" in run.config.data and split not in run.config.data.splits
    ):  # other experiments name splits in make_data
        raise ConfigError(f"unknown split {split!r}: use one of {sorted(run.config.data.splits)}")
    batches = (sharding.put_batch(batch, run.setup.mesh) for batch in run.module.make_data(run.config, split))
    accumulated = accumulate(run.setup.eval_step(run.state, batch) for batch in batches)
    if accumulated is None:
        raise ConfigError(f"split {split!r} yielded no batches: check config.data for it")
    results: dict[str, Any] = metrics_lib.compute(accumulated)
    if run.is_language_model and "perplexity" not in results and "loss" in results:
        results["perplexity"] = float(np.exp(results["loss"]))
    confusion = [metric for metric in accumulated.values() if isinstance(metric, metrics_lib.ConfusionMatrix)]
    if confusion:
        results["confusion_matrix"] = np.asarray(confusion[0].counts_CxC).astype(np.int64)
    return results


def format_metrics(results: dict[str, Any], names: list[str] | None = None) -> str:
    """A two-column table of the scalar metrics, then the confusion matrix if there is one."""
    lines = [f"{name:<20s} {value:.4f}" for name, value in sorted(results.items()) if np.isscalar(value)]
    matrix = results.get("confusion_matrix")
    if matrix is not None:
        names = names or [str(index) for index in range(len(matrix))]
        width = max(6, max(len(name) for name in names) + 1)
        lines += [
            "",
            "confusion (rows true, columns predicted)",
            " " * width + "".join(f"{name:>{width}s}" for name in names),
        ]
        lines += [
            f"{name:>{width}s}" + "".join(f"{count:>{width}d}" for count in row) for name, row in zip(names, matrix)
        ]
    return "\n".join(lines)


def generate_text(
    run: Run, prompt: str, num_tokens: int, sampling: Sampling, *, cached: bool = True, keep: int | None = None
) -> dict[str, Any]:
    """{"text": the continuation, "tokens_per_second": the generation rate} for one prompt
    (`keep`: a GPT's context when its window slides, see research/models/gpt.py)."""
    if not run.is_language_model:
        raise ConfigError(
            f"experiment {run.name} trains a {type(run.model).__name__}, which does not generate text "
            "(no encode_text and decode_tokens hooks): use --classify or --evaluate"
        )
    ids = np.asarray(hook(run.module, "encode_text")(run.config, prompt), np.int32)
    if ids.size == 0:
        raise ConfigError("the prompt encodes to no tokens: give at least one character")
    tokens, rate = timed_generate(run.model, run.params, ids[None], num_tokens, sampling, cached=cached, keep=keep)
    return {"text": hook(run.module, "decode_tokens")(run.config, tokens[0].tolist()), "tokens_per_second": rate}
