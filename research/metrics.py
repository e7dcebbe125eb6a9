"""Pure metric accumulators.

Every accumulator is a pytree of sums, so two of them merge by adding leaves: across batches
in the eval loop, and across devices for free because a jitted reduction over a sharded batch
is already global. `compute()` turns the sums into the reported number. Every constructor
takes a `mask` of 0/1 weights per example so that padded examples in a final, partial eval
batch count for nothing.

Shapes: B batch (any leading dims), C classes.
"""

from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from research.models import laid_out, shard_batch, softcapped


def _weights(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(values.shape, jnp.float32)
    return jnp.broadcast_to(mask, values.shape).astype(jnp.float32)


def masked_mean(values: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of `values` over entries whose mask is 1 (all entries when mask is None)."""
    weights = _weights(values, mask)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class Metric:
    """Mixin: merging is leaf-wise addition because every field is a sum."""

    def merge(self, other: "Metric") -> "Metric":
        return jax.tree.map(jnp.add, self, other)


@flax.struct.dataclass
class Mean(Metric):
    """Weighted mean of per-example values."""

    total: jax.Array
    count: jax.Array

    @classmethod
    def from_values(cls, values: jax.Array, mask: jax.Array | None = None):
        weights = _weights(values, mask)
        return cls(total=jnp.sum(values * weights, dtype=jnp.float32), count=jnp.sum(weights))

    def compute(self) -> jax.Array:
        return self.total / jnp.maximum(self.count, 1e-12)


@flax.struct.dataclass
class Accuracy(Mean):
    """Fraction of examples whose arg-max logit is the label."""

    @classmethod
    def from_logits(cls, logits_BxC: jax.Array, labels_B: jax.Array, mask: jax.Array | None = None):
        correct_B = (jnp.argmax(logits_BxC, axis=-1) == labels_B).astype(jnp.float32)
        return cls.from_values(correct_B, mask)


@flax.struct.dataclass
class CrossEntropy(Mean):
    """Mean negative log-likelihood of integer labels, in nats."""

    @classmethod
    def from_logits(cls, logits_BxC: jax.Array, labels_B: jax.Array, mask: jax.Array | None = None):
        nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), labels_B)
        return cls.from_values(nll_B, mask)


@flax.struct.dataclass
class Perplexity(CrossEntropy):
    """exp of the mean per-token negative log-likelihood (pool the NLL first, exponentiate last)."""

    def compute(self) -> jax.Array:
        return jnp.exp(super().compute())


@flax.struct.dataclass
class MeanSquaredError(Mean):
    @classmethod
    def from_predictions(cls, predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
        return cls.from_values(jnp.square(predictions - targets), mask)


@flax.struct.dataclass
class MeanAbsoluteError(Mean):
    @classmethod
    def from_predictions(cls, predictions: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
        return cls.from_values(jnp.abs(predictions - targets), mask)


@flax.struct.dataclass
class ConfusionMatrix(Metric):
    """Counts[true, predicted]; computes macro-averaged precision, recall and F1.

    Macro averages follow scikit-learn's convention: a class with no predictions (or no true
    examples) scores 0 for precision (or recall), and F1 is averaged per class, not computed
    from the averaged precision and recall.
    """

    counts_CxC: jax.Array

    @classmethod
    def from_logits(cls, logits_BxC: jax.Array, labels_B: jax.Array, mask: jax.Array | None = None):
        return cls.from_predictions(jnp.argmax(logits_BxC, axis=-1), labels_B, logits_BxC.shape[-1], mask)

    @classmethod
    def from_predictions(cls, predictions_B, labels_B, num_classes: int, mask: jax.Array | None = None):
        weights_B = _weights(labels_B, mask)
        truth_BxC = jax.nn.one_hot(labels_B, num_classes) * weights_B[..., None]
        predicted_BxC = jax.nn.one_hot(predictions_B, num_classes)
        counts = jnp.einsum("...t,...p->tp", truth_BxC, predicted_BxC)
        return cls(counts_CxC=counts)

    def compute(self) -> dict[str, jax.Array]:
        true_positive_C = jnp.diag(self.counts_CxC)
        predicted_C = self.counts_CxC.sum(axis=0)
        actual_C = self.counts_CxC.sum(axis=1)
        precision_C = jnp.where(predicted_C > 0, true_positive_C / jnp.maximum(predicted_C, 1), 0.0)
        recall_C = jnp.where(actual_C > 0, true_positive_C / jnp.maximum(actual_C, 1), 0.0)
        denominator_C = precision_C + recall_C
        f1_C = jnp.where(denominator_C > 0, 2 * precision_C * recall_C / jnp.maximum(denominator_C, 1e-12), 0.0)
        return {"precision": precision_C.mean(), "recall": recall_C.mean(), "f1": f1_C.mean()}


def merge(accumulated: Mapping[str, Metric] | None, update: Mapping[str, Metric]) -> dict[str, Metric]:
    """Merges two dicts of accumulators key by key; `None` is the empty accumulation."""
    if accumulated is None:
        return dict(update)
    return {name: accumulated[name].merge(metric) for name, metric in update.items()}


def compute(accumulated: Mapping[str, Metric]) -> dict[str, float]:
    """Host-side final numbers. A metric computing several values (ConfusionMatrix) adds each by its own name."""
    results = {}
    for name, metric in jax.device_get(dict(accumulated)).items():
        value = metric.compute()
        if isinstance(value, dict):
            results.update({key: float(np.asarray(v)) for key, v in value.items()})
        else:
            results[name] = float(np.asarray(value))
    return results


def classification_loss(
    logits_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A classifier's loss_fn result: mean cross-entropy over real examples, and their accuracy."""
    nll_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)
    accuracy_B = (jnp.argmax(logits_BxC, -1) == labels_B).astype(jnp.float32)
    return masked_mean(nll_B, mask_B), {"accuracy": masked_mean(accuracy_B, mask_B)}


def classification_metrics(
    logits_BxC: jax.Array, labels_B: jax.Array, mask_B: jax.Array, *, confusion: bool = False
) -> dict[str, Metric]:
    """A classifier's eval_fn result: cross-entropy and accuracy, and macro precision/recall/F1 with `confusion`."""
    results = {
        "loss": CrossEntropy.from_logits(logits_BxC, labels_B, mask_B),
        "accuracy": Accuracy.from_logits(logits_BxC, labels_B, mask_B),
    }
    if confusion:
        results["confusion"] = ConfusionMatrix.from_logits(logits_BxC, labels_B, mask_B)
    return results


def position_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
    """B x L: 1 where a target is scored. Padding sequences (`mask`) weigh 0, and so do the positions a batch's
    `weights` drops (a packed window's target across a document boundary: research/data/stream.py)."""
    weights_BxL = jnp.broadcast_to(batch["mask"][:, None], batch["targets"].shape).astype(jnp.float32)
    return weights_BxL * batch["weights"] if "weights" in batch else weights_BxL


def next_token_loss(logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """A language model's loss_fn result: mean next-token cross-entropy (nats) over the scored positions."""
    nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    return masked_mean(nll_BxL, position_weights(batch)), {}


def chunked_next_token_loss(
    features_BxLxD: jax.Array, head_DxV: jax.Array, batch: Mapping[str, jax.Array], chunk: int, softcap: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """next_token_loss without the batch's B x L x V logits: the head (features @ head_DxV, float32
    logits) runs on `chunk` positions of every sequence at a time in a scan whose body is
    rematerialised, so neither pass holds more than B x chunk x V logits (a large-vocabulary model's
    largest activation otherwise). The batch axis stays whole in each chunk, so a batch split over
    devices stays split: each device computes its own sequences' logits. `softcap` > 0 soft-caps the logits
    (cap * tanh(logits / cap), Gemma 2's final logits)."""
    batch_size, length, width = features_BxLxD.shape
    weights_BxL = position_weights(batch)
    targets_BxL = batch["targets"]
    padding = -length % chunk
    if padding:  # padded positions weigh 0
        features_BxLxD = jnp.pad(features_BxLxD, ((0, 0), (0, padding), (0, 0)))
        targets_BxL, weights_BxL = (jnp.pad(x, ((0, 0), (0, padding))) for x in (targets_BxL, weights_BxL))
    head_DxV = laid_out(head_DxV.astype(features_BxLxD.dtype), None, "tensor")  # gathered once, not per chunk

    @jax.checkpoint
    def add_chunk(total, chunk_inputs):
        features_BxCxD, targets_BxC, weights_BxC = chunk_inputs
        logits_BxCxV = jnp.einsum(
            "bcd,dv->bcv", shard_batch(features_BxCxD), head_DxV, preferred_element_type=jnp.float32
        )
        logits_BxCxV = softcapped(logits_BxCxV, softcap)
        nll_BxC = optax.softmax_cross_entropy_with_integer_labels(logits_BxCxV, targets_BxC)
        return total + jnp.sum(nll_BxC * weights_BxC), None

    def chunks(x):  # B x L' x ... -> L'/C x B x C x ...
        return jnp.moveaxis(x.reshape(batch_size, -1, chunk, *x.shape[2:]), 1, 0)

    inputs = (chunks(features_BxLxD), chunks(targets_BxL), chunks(weights_BxL))
    total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), inputs)
    return total / jnp.maximum(jnp.sum(weights_BxL), 1.0), {}


def next_token_metrics(logits_BxLxV: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, Metric]:
    """Per-token loss, perplexity and next-token accuracy, pooled over every scored position."""
    targets_BxL, mask_BxL = batch["targets"], position_weights(batch)
    return {
        "loss": CrossEntropy.from_logits(logits_BxLxV, targets_BxL, mask_BxL),
        "perplexity": Perplexity.from_logits(logits_BxLxV, targets_BxL, mask_BxL),
        "accuracy": Accuracy.from_logits(logits_BxLxV, targets_BxL, mask_BxL),
    }
