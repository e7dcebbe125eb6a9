import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import metrics

# Three classes; rows are examples. Predictions (arg-max): 0, 1, 1, 2, 0, 1.
LOGITS = jnp.array(
    [[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [0.5, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
)
LABELS = jnp.array([0, 1, 2, 2, 1, 1])


def test_accuracy_counts_argmax_hits():
    assert float(metrics.Accuracy.from_logits(LOGITS, LABELS).compute()) == pytest.approx(4 / 6)


def test_precision_recall_f1_macro_by_hand():
    # class 0: predicted {0, 4}, true {0}    -> precision 1/2, recall 1/1, F1 2/3
    # class 1: predicted {1, 2, 5}, true {1, 4, 5} -> precision 2/3, recall 2/3, F1 2/3
    # class 2: predicted {3}, true {2, 3}    -> precision 1/1, recall 1/2, F1 2/3
    result = metrics.ConfusionMatrix.from_logits(LOGITS, LABELS).compute()
    assert float(result["precision"]) == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert float(result["recall"]) == pytest.approx((1 + 2 / 3 + 1 / 2) / 3)
    assert float(result["f1"]) == pytest.approx(2 / 3)


def test_class_never_predicted_scores_zero_precision():
    logits = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    result = metrics.ConfusionMatrix.from_logits(logits, jnp.array([0, 1])).compute()
    assert float(result["precision"]) == pytest.approx((0.5 + 0.0) / 2)
    assert float(result["recall"]) == pytest.approx((1.0 + 0.0) / 2)
    assert float(result["f1"]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_cross_entropy_and_perplexity_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]))
    labels = jnp.array([0, 1])
    nll = -(np.log(0.5) + np.log(0.8)) / 2
    assert float(metrics.CrossEntropy.from_logits(logits, labels).compute()) == pytest.approx(nll, rel=1e-6)
    assert float(metrics.Perplexity.from_logits(logits, labels).compute()) == pytest.approx(np.exp(nll), rel=1e-6)


def test_mse_and_mae_by_hand():
    predictions, targets = jnp.array([1.0, 2.0, 4.0]), jnp.array([1.0, 0.0, 5.0])
    assert float(metrics.MeanSquaredError.from_predictions(predictions, targets).compute()) == pytest.approx(5 / 3)
    assert float(metrics.MeanAbsoluteError.from_predictions(predictions, targets).compute()) == pytest.approx(1.0)


def test_batches_merge_to_the_whole_and_mask_drops_padding():
    def all_metrics(logits, labels, mask):
        return {
            "accuracy": metrics.Accuracy.from_logits(logits, labels, mask),
            "loss": metrics.CrossEntropy.from_logits(logits, labels, mask),
            "confusion": metrics.ConfusionMatrix.from_logits(logits, labels, mask),
        }

    whole = metrics.compute(all_metrics(LOGITS, LABELS, None))
    # The last batch is padded with two junk rows whose mask is 0.
    padded_logits = jnp.concatenate([LOGITS[4:], jnp.array([[9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])])
    padded_labels = jnp.concatenate([LABELS[4:], jnp.array([1, 0])])
    accumulated = metrics.merge(None, all_metrics(LOGITS[:4], LABELS[:4], jnp.ones(4)))
    accumulated = metrics.merge(accumulated, all_metrics(padded_logits, padded_labels, jnp.array([1.0, 1, 0, 0])))
    merged = metrics.compute(accumulated)
    assert merged.keys() == whole.keys() == {"accuracy", "loss", "precision", "recall", "f1"}
    for name in whole:
        assert merged[name] == pytest.approx(whole[name], rel=1e-6)


def test_metrics_are_jittable_pytrees():
    result = jax.jit(lambda logits, labels: metrics.Accuracy.from_logits(logits, labels))(LOGITS, LABELS)
    assert float(result.count) == 6.0 and float(result.total) == 4.0


def test_masked_mean_ignores_masked_entries():
    assert float(metrics.masked_mean(jnp.array([1.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 0.0]))) == 2.0
