"""Attributions (research/inference/explain.py): integrated gradients satisfy completeness on the MNIST CNN,
saliency is |gradient|, and predict.py --explain writes its picture and arrays."""

import numpy as np
import pytest
from PIL import Image

from conftest import python
from research.errors import ConfigError
from research.inference import explain, predict


@pytest.fixture(scope="module")
def cnn(smoke_runs):
    run = predict.load_run(smoke_runs["mnist_cnn"][0])
    batch = next(iter(run.module.make_data(run.config, "test")))
    return run, batch["inputs"][:8], batch["labels"][:8]


def test_integrated_gradients_sum_to_the_change_in_logit_within_1_percent(cnn):
    run, inputs, _ = cnn
    result = explain.attributions(run.logits, inputs, "integrated_gradients", steps=64)
    assert result.values.shape == inputs.shape
    assert result.completeness_gap.max() < 0.01  # measured: median 0.24 %, max 0.76 % over 16 examples
    assert np.abs(result.logit - result.baseline_logit).min() > 0.1  # a real change to account for
    coarse = explain.attributions(run.logits, inputs, "integrated_gradients", steps=4)
    assert coarse.completeness_gap.mean() > result.completeness_gap.mean()  # the rule's error shrinks with steps


def test_saliency_is_the_absolute_gradient_of_the_target_logit(cnn):
    run, inputs, _ = cnn
    import jax
    import jax.numpy as jnp

    result = explain.attributions(run.logits, inputs[:2], "saliency", targets=np.array([3, 5]))
    gradient = jax.grad(lambda x: run.logits(x)[0, 3] + run.logits(x)[1, 5])(jnp.asarray(inputs[:2]))
    np.testing.assert_allclose(result.values, np.abs(gradient), rtol=1e-5, atol=1e-7)
    with pytest.raises(ConfigError, match="unknown attribution method 'lime'"):
        explain.attributions(run.logits, inputs, "lime")


def test_predict_explain_writes_a_labelled_grid_and_the_arrays(smoke_runs, tmp_path):
    result = python(
        "predict.py",
        f"--workdir={smoke_runs['mnist_cnn'][0]}",
        "--explain=test",
        "--num_examples=4",
        f"--explain_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "4 test examples explained by integrated gradients (64 steps)" in result.stdout
    saved = np.load(tmp_path / "attributions.npz")
    assert saved["attributions"].shape == (4, 28, 28, 1) and saved["completeness_gap"].max() < 0.01
    width, height = Image.open(tmp_path / "attributions.png").size
    assert width > 300 and height > 300
