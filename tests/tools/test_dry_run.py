"""The dry run compiles without running: its FLOPs agree with 6·N·T for a GPT, its memory is per device."""

import types

import numpy as np
import optax
import pytest

from research import metrics, sharding
from research.config import trainer_config
from research.models import gpt
from research.tools import dry_run

VOCAB, LENGTH = 64, 64


def gpt_experiment(width: int, layers: int):
    def make_data(config, split):
        rng = np.random.default_rng(0)
        while True:
            yield {
                "inputs": rng.integers(0, VOCAB, (config.batch_size, LENGTH)).astype(np.int32),
                "mask": np.ones(config.batch_size, np.float32),
            }

    def loss_fn(params, batch, rng, *, model):
        logits = model.apply({"params": params}, batch["inputs"])
        return metrics.masked_mean(
            optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["inputs"][:, 1:])
        ), {}

    model = gpt.GPT(vocab_size=VOCAB, block_size=LENGTH, num_layers=layers, num_heads=4, width=width)
    return types.SimpleNamespace(make_data=make_data, make_model=lambda config: model, loss_fn=loss_fn)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes", [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_gpt_flops_agree_with_the_analytic_count(mesh_axes):
    config = trainer_config()
    config.batch_size = 16
    config.mesh.update(mesh_axes)
    result = dry_run.dry_run(config, gpt_experiment(width=256, layers=2), sharding.make_mesh(config.mesh))
    assert result.devices == 8 and result.tokens_per_step == 16 * LENGTH
    assert (
        result.parameters
        == 2 * (4 * 256 * 256 + 4 * 256 + 2 * 256 * 1024 + 1024 + 256 + 4 * 256) + (VOCAB + LENGTH) * 256 + 2 * 256
    )
    assert result.xla_flops == pytest.approx(result.analytic_flops, rel=0.10)
    assert result.memory_bytes["arguments (state + batch)"] > 0
    report = dry_run.format_report(result, mesh_axes, 0.4)
    assert "h100" in report and "6·N·T" in report


@pytest.mark.slow
def test_fsdp_divides_the_per_device_state():
    sizes = {}
    for fsdp in (1, 8):
        config = trainer_config()
        config.batch_size = 16
        config.mesh.update({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
        sizes[fsdp] = dry_run.dry_run(
            config, gpt_experiment(width=256, layers=2), sharding.make_mesh(config.mesh)
        ).memory_bytes["arguments (state + batch)"]
    assert sizes[8] < 0.25 * sizes[1]
