"""Why a classifier said what it said: gradient saliency and integrated gradients over its inputs.

F is the logit of one class (the predicted one unless given). Saliency is |dF/dx| (Simonyan et al.
2014). Integrated gradients (Sundararajan et al. 2017) are
    IG_i(x) = (x_i - b_i) * integral over a in [0, 1] of dF/dx_i (b + a (x - b)) da,
with the baseline b all zeros (a black image, zero features), the integral by the trapezoid rule on
`steps` intervals. They satisfy completeness: sum_i IG_i(x) = F(x) - F(b), up to the rule's error,
which `Attributions.completeness_gap` measures per example. One jitted gradient over all examples and
all path points at once: seconds for a grid of examples on a CPU.

    python predict.py --workdir runs/mnist_cnn --explain test --num_examples 16 --explain_dir runs/mnist_cnn/explain
writes attributions.png (each example: its input, then its attributions as a heatmap, labelled with the
true and the predicted class) and attributions.npz, and prints the completeness gaps. Text models (token
ids) go to research/inference/explain_text.py: attention maps, and token attributions for classifiers.
"""

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research.errors import ConfigError

METHODS = ("integrated_gradients", "saliency")
PATH_CHUNK = 8  # path points per model call


@dataclasses.dataclass
class Attributions:
    """Per-example attributions (the inputs' shape) for `targets`, with what completeness needs."""

    inputs: np.ndarray
    values: np.ndarray
    targets: np.ndarray  # the explained class of each example
    predictions: np.ndarray
    logit: np.ndarray  # F(x)
    baseline_logit: np.ndarray  # F(b)

    @property
    def completeness_gap(self) -> np.ndarray:
        """|sum of attributions - (F(x) - F(b))| / |F(x) - F(b)| per example (integrated gradients only)."""
        totals = self.values.reshape(len(self.values), -1).sum(axis=1)
        change = self.logit - self.baseline_logit
        return np.abs(totals - change) / np.maximum(np.abs(change), 1e-12)


def attributions(logits_fn, inputs: np.ndarray, method: str = "integrated_gradients", steps: int = 64, targets=None):
    """Attributions of `logits_fn` (a batch of inputs -> a batch of logits) for `inputs`; `targets` defaults
    to each example's predicted class."""
    if method not in METHODS:
        raise ConfigError(f"unknown attribution method {method!r}: use one of {', '.join(METHODS)}")
    if steps < 1:
        raise ConfigError(f"steps is {steps}: integrated gradients need at least 1")
    inputs = jnp.asarray(inputs, jnp.float32)
    logits = logits_fn(inputs)
    predictions = jnp.argmax(logits, axis=-1)
    targets = predictions if targets is None else jnp.asarray(targets)
    count = inputs.shape[0]

    def target_logit_sum(points, classes):  # each point's logit depends on itself only: the gradient is per point
        return jnp.sum(jnp.take_along_axis(logits_fn(points), classes[:, None], axis=-1))

    gradient = jax.grad(target_logit_sum)
    if method == "saliency":
        values = jnp.abs(jax.jit(gradient)(inputs, targets))
        baseline_logit = jnp.zeros(count)
    else:
        values = _integrated(gradient, inputs, targets, steps)
        baseline_logit = jnp.take_along_axis(logits_fn(jnp.zeros_like(inputs)), targets[:, None], axis=-1)[:, 0]
    logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    host = jax.device_get((inputs, values, targets, predictions, logit, baseline_logit))
    return Attributions(*(np.asarray(array) for array in host))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _integrated(gradient, inputs, targets, steps: int):
    """inputs x the trapezoid-rule mean of the gradient along the straight path from 0 to the inputs; the path's
    points go through the model PATH_CHUNK at a time (all examples each), so memory stays a few batches'."""
    weights = jnp.full(steps + 1, 1.0 / steps).at[0].set(0.5 / steps).at[-1].set(0.5 / steps)
    along = jax.lax.map(
        lambda alpha: gradient(alpha * inputs, targets), jnp.linspace(0.0, 1.0, steps + 1), batch_size=PATH_CHUNK
    )
    return inputs * jnp.tensordot(weights, along, axes=1)


def plot(result: Attributions, labels: np.ndarray, path: str | Path, names=None) -> None:
    """A PNG: per example its input and its attributions (red positive, blue negative), titled with the true
    and predicted class; 1-D inputs as one heatmap row per example over the feature index."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    name = (lambda index: str(names[index])) if names is not None else str
    count, shape = len(result.values), result.values.shape[1:]
    if len(shape) == 1:
        figure, axis = plt.subplots(figsize=(10, 0.4 * count + 1.5))
        limit = np.abs(result.values).max() or 1.0
        image = axis.imshow(result.values, cmap="bwr", vmin=-limit, vmax=limit, aspect="auto")
        axis.set_yticks(range(count), [f"true {name(t)} / pred {name(p)}" for t, p in zip(labels, result.predictions)])
        axis.set_xlabel("input feature")
        figure.colorbar(image, ax=axis, label="attribution")
    else:
        columns = min(count, 8)
        rows = -(-count // columns)
        figure, axes = plt.subplots(2 * rows, columns, figsize=(1.6 * columns, 3.3 * rows), squeeze=False)
        for axis in axes.ravel():
            axis.axis("off")
        for index in range(count):
            row, column = 2 * (index // columns), index % columns
            picture = result.inputs[index]
            heat = result.values[index].sum(axis=-1) if picture.ndim == 3 else result.values[index]
            axes[row, column].imshow(picture.squeeze(), cmap="gray")
            axes[row, column].set_title(
                f"true {name(labels[index])}\npred {name(result.predictions[index])}", fontsize=8
            )
            limit = np.abs(heat).max() or 1.0
            axes[row + 1, column].imshow(heat, cmap="bwr", vmin=-limit, vmax=limit)
    figure.suptitle("attributions of the predicted class (red: for it, blue: against)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def first_examples(run, split: str, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The inputs of the first `count` real (unpadded) examples of `split`, and their labels when the batches
    carry one per example (a classifier's; None otherwise)."""
    inputs, labels = [], []
    for batch in run.module.make_data(run.config, split):
        kept = np.asarray(batch["mask"]) > 0
        inputs.append(np.asarray(batch["inputs"])[kept])
        labels.append(np.asarray(batch["labels"])[kept] if "labels" in batch else None)
        if sum(map(len, inputs)) >= count:
            break
    if not inputs:
        raise ConfigError(f"split {split!r} yielded no examples")
    classifier = labels[0] is not None and labels[0].ndim == 1  # not a masked LM's per-token labels
    return np.concatenate(inputs)[:count], np.concatenate(labels)[:count] if classifier else None


def explain_run(run, split: str, method: str, count: int, steps: int, directory: str | Path) -> str:
    """Explains the first `count` examples of a classifier run's `split`: writes attributions.png and
    attributions.npz into `directory`; returns the summary line."""
    from research.inference import explain_text, predict

    if jnp.issubdtype(run.setup.batch_spec["inputs"].dtype, jnp.integer):  # token ids: a text model
        return explain_text.explain_run(run, split, None, count, steps, directory)
    if "labels" not in run.setup.batch_spec:
        raise ConfigError("--explain covers classifiers (images, tabular features, text) and text models")
    if count < 1:
        raise ConfigError(f"--num_examples is {count}: explain at least 1")
    inputs, labels = first_examples(run, split, count)
    start = time.perf_counter()
    result = attributions(run.logits, inputs, method, steps)
    seconds = time.perf_counter() - start
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = predict.class_names(run, int(max(labels.max(), result.predictions.max())) + 1)
    plot(result, labels, directory / "attributions.png", names)
    np.savez(
        directory / "attributions.npz",
        inputs=inputs,
        labels=labels,
        attributions=result.values,
        predictions=result.predictions,
        completeness_gap=result.completeness_gap,
    )
    detail = f"{method.replace('_', ' ')}" + (f" ({steps} steps)" if method == "integrated_gradients" else "")
    line = f"{run.name} step {run.step}: {len(labels)} {split} examples explained by {detail} in {seconds:.1f} s"
    if method == "integrated_gradients":
        gap = result.completeness_gap
        line += f"; completeness gap median {np.median(gap):.2%}, max {gap.max():.2%}"
    return line + f"; wrote {directory / 'attributions.png'} and attributions.npz"
