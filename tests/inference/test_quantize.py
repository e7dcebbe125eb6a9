"""int8 weight quantization of a trained CNN: per-output-channel scales for Conv and Dense kernels,
the accuracy it costs and the bytes it saves (mnist_cnn :smoke, trained here)."""

import numpy as np
import pytest

from conftest import train_as_launch
from research.inference import predict, quantize


@pytest.fixture(scope="module")
def cnn_run(data_dir, tmp_path_factory):
    """mnist_cnn :smoke (conv 8, 16; dense 32) trained 100 steps, tested on 2,000 official test images."""
    workdir = tmp_path_factory.mktemp("cnn")
    train_as_launch(
        "mnist_cnn", data_dir, workdir, {"num_steps": 100, "log_every": 50, "data.splits.test": "test[:2000]"}
    )
    return predict.load_run(workdir)


def test_conv_kernels_get_one_scale_per_output_channel(cnn_run):
    quantized = quantize.quantize(cnn_run.params)
    conv = quantized["Conv_1"]["kernel"]  # H x W x Cin x Cout
    assert conv.values.shape == (3, 3, 8, 16) and conv.values.dtype == np.int8
    assert conv.scale.shape == (1, 1, 1, 16)
    kernel = np.asarray(cnn_run.params["Conv_1"]["kernel"])
    np.testing.assert_allclose(np.asarray(conv.scale).ravel(), np.abs(kernel).max(axis=(0, 1, 2)) / 127, rtol=1e-6)
    assert np.all(np.abs(np.asarray(conv.values)).max(axis=(0, 1, 2)) == 127)  # each channel uses the full range


def test_int8_cnn_loses_under_half_a_point_and_is_four_times_smaller(cnn_run):
    result = quantize.report(cnn_run, "test")
    before, after = result["metrics"]["accuracy"]
    assert before > 0.8 and abs(before - after) < 0.005  # 2,000 images: under 10 of them change
    kernels = 3 * 3 * 1 * 8 + 3 * 3 * 8 * 16 + 7 * 7 * 16 * 32 + 32 * 10
    scales = 8 + 16 + 32 + 10
    assert result["kernel_bytes"] == (4 * kernels, kernels + 4 * scales)
    assert result["kernel_bytes"][0] / result["kernel_bytes"][1] == pytest.approx(3.96, abs=0.01)
