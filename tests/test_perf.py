"""Performance features: the hand-written attention backward, FLOP counts, logged throughput and MFU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_close
from experiments import cifar10_resnet, mnist_cnn, shakespeare_gpt
from research import perf, train
from research.config import ConfigError
from research.models import attention

ROOT = Path(__file__).resolve().parents[1]


def _attention_loss(attention_fn, mask):
    """A scalar of every output element, so every gradient entry matters."""
    return lambda q, k, v: jnp.sum(jnp.sin(attention_fn(q, k, v, mask=mask, deterministic=True)) * jnp.arange(q.shape[-1]))


@pytest.mark.parametrize("masked", ["causal", "padding", "none"])
def test_attention_equals_flax_in_value_and_gradient(masked):
    batch, length, heads, width = 3, 24, 4, 16
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v = (jax.random.normal(key, (batch, length, heads, width)) for key in keys[:3])
    masks = {
        "causal": nn.make_causal_mask(jnp.zeros((batch, length))),
        "padding": nn.make_attention_mask(jnp.ones((batch, length)), jax.random.bernoulli(keys[3], 0.7, (batch, length))),
        "none": None,
    }
    expected = jax.value_and_grad(_attention_loss(nn.dot_product_attention, masks[masked]), argnums=(0, 1, 2))(q, k, v)
    actual = jax.jit(jax.value_and_grad(_attention_loss(attention.dot_product_attention, masks[masked]), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(actual[0], expected[0], rtol=1e-6)  # a sum of ~1e3: float32 rounding is ~1e-4 absolute
    assert_trees_close(actual[1], expected[1], atol=1e-5)
    assert float(jnp.abs(expected[0])) > 1.0  # the loss is not trivially zero


def test_gpt_with_our_attention_equals_flax_attention(monkeypatch):
    config = shakespeare_gpt.get_config("smoke")
    config.model.num_layers = 2
    model = shakespeare_gpt.make_model(config)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, config.data.block_size), 0, 60)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]
    loss = lambda params: jnp.mean(jax.nn.log_softmax(model.apply({"params": params}, tokens))[..., 0])
    ours = jax.value_and_grad(loss)(params)
    monkeypatch.setattr("research.models.gpt.dot_product_attention", nn.dot_product_attention)
    flax = jax.value_and_grad(loss)(params)
    assert_trees_close(ours, flax, atol=1e-5)


def test_flops_per_example_match_hand_counts():
    # GPT: 6 N per token + 12 x layers x L x D; 4L/128d/L128 with the 66-character vocabulary.
    config = shakespeare_gpt.get_config("cpu")
    config.data.block_size = 128
    parameters = shakespeare_gpt.parameter_count(config)
    assert parameters == 812_416
    assert shakespeare_gpt.flops_per_example(config) == pytest.approx(128 * (6 * 812_416 + 12 * 4 * 128 * 128))
    # CNN: 2 x (28^2 x 9 x 1 x 64 + 14^2 x 9 x 64 x 128 + 7^2 x 128 x 1000 + 1000 x 10) forward, x3.
    forward = 2 * (28**2 * 9 * 64 + 14**2 * 9 * 64 * 128 + 49 * 128 * 1000 + 1000 * 10)
    assert mnist_cnn.flops_per_example(mnist_cnn.get_config()) == pytest.approx(3 * forward)
    # ResNet-20: ~40.6M multiply-adds forward (the "41M FLOPs" usually quoted), 2 FLOPs each.
    assert cifar10_resnet.flops_per_example(cifar10_resnet.get_config()) / 3 == pytest.approx(81.1e6, rel=0.01)


def test_measured_peak_is_positive_and_plausible():
    peak = perf.measure_peak_flops(size=256, repeats=3)
    assert 1e8 < peak < 1e16


def test_training_logs_tokens_per_second_and_mfu_and_writes_a_profile(tmp_path, data_dir):
    config = shakespeare_gpt.get_config("smoke")
    config.update_from_flattened_dict({"data_dir": data_dir, "num_steps": 6, "log_every": 2, "peak_tflops": 0.001, "profile_steps": "3,4"})
    train.train_and_evaluate(config, shakespeare_gpt, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [record for record in records if "perf/mfu" in record]
    assert [record["step"] for record in logged] == [2, 4, 6]
    for record in logged:
        examples = record["perf/examples_per_second"]
        assert record["perf/tokens_per_second"] == pytest.approx(examples * 32)  # block_size 32
        # CPU devices share one peak: 0.001 TFLOP/s in all, however many fake devices.
        assert record["perf/mfu"] == pytest.approx(examples * shakespeare_gpt.flops_per_example(config) / 1e9)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000


@pytest.mark.parametrize("steps", ["10", "5,x", "0,3", "9,4"])
def test_bad_profile_steps_is_a_config_error(steps):
    with pytest.raises(ConfigError, match="profile_steps"):
        perf.StepProfiler(steps, "unused")


@pytest.mark.slow
def test_second_launch_hits_the_compilation_cache(tmp_path):
    environment = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"} | {"JAX_LOG_COMPILES": "1"}
    logs = []
    for run in range(2):  # two fresh processes, two workdirs, one cache
        command = [sys.executable, "launch.py", "--config", "experiments/shakespeare_gpt.py:smoke", "--workdir", str(tmp_path / f"run{run}"),
                   "--config.num_steps=4", f"--compilation_cache_dir={tmp_path / 'cache'}"]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=environment, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        logs.append(result.stderr)
    compiles = [log.count("Finished XLA compilation of") for log in logs]
    hits = [log.count("Persistent compilation cache hit for") for log in logs]
    assert hits[0] == 0 and compiles[0] >= 3  # init, train step, eval step at least
    assert hits[1] == compiles[1] == compiles[0]  # every program of the second launch came from the cache
    assert "Persistent compilation cache hit for 'jit_train_step'" in logs[1]
