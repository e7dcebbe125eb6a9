"""Pipeline parallelism: a scanned stack split over the mesh's `stage` axis (research/models/pipeline.py) gives the
one-device values, gradients and training losses, GPipe and circular, with document masks, remat, data, FSDP and
tensor beside it; a resumed run ends bitwise; layouts the pipeline cannot run are one line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import load_experiment, mesh_losses, resumed_losses
from research import sharding
from research.errors import ConfigError
from research.models import pipeline
from research.models.llama import Llama

lm = load_experiment("lm")
ONE = {"stage": 1, "data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
TINY = dict(vocab_size=64, num_layers=8, num_heads=4, num_kv_heads=2, width=32, mlp_dim=64, block_size=16)
TINY |= dict(scan_layers=True, attention_window=6, global_every=2, remat="full")  # local and global layers
RULES = (
    (r"layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("stage", None, "tensor")),
    (r"layers/(o_proj|down_proj)/kernel$", ("stage", "tensor", None)),
    (r"^layers/", ("stage",)),
    (".*", ()),
)


def smoke(data_dir: str, **overrides):
    """:smoke with 4 scanned layers of 64 (4 heads, 2 key/value heads) on the session's data."""
    config = lm.get_config("smoke")
    settings = {"model.num_layers": 4, "model.scan_layers": True, "model.num_heads": 4, "model.num_kv_heads": 2}
    config.update_from_flattened_dict({"data_dir": data_dir} | settings | overrides)
    return config


def test_the_bubble_is_the_idle_share_of_the_iterations():
    assert pipeline.bubble(4, 4) == pytest.approx(3 / 7)  # GPipe: (S - 1) / (M + S - 1)
    assert pipeline.bubble(4, 16) == pytest.approx(3 / 19)
    assert pipeline.bubble(4, 4, repeats=4) == pytest.approx(3 / 19)  # circular: R M in place of M
    assert pipeline.bubble(1, 8) == 0.0 and pipeline.microbatch_count(0, 4) == 4


def pipelined(mesh_axes: dict, microbatches: int, repeats=1, remat=False, documents=False, layers=8, gather=False):
    """(loss, gradients) of a tiny Llama on `mesh_axes` as a pipeline, and the same on one device."""
    tokens = jax.random.randint(jax.random.PRNGKey(1), (16, 16), 0, 64)
    starts = jax.random.randint(jax.random.PRNGKey(2), (16, 1), 2, 14)
    segments = (jnp.arange(16)[None, :] >= starts).astype(jnp.int32) if documents else None  # two documents a row
    tiny = TINY | dict(num_layers=layers)
    params = Llama(**tiny).init(jax.random.PRNGKey(0), tokens)["params"]
    schedule = dict(pipeline_microbatches=microbatches, pipeline_repeats=repeats, pipeline_remat=remat)
    model = Llama(**tiny, **schedule, pipeline_gather=gather, stack_rules=RULES)

    def loss(params, tokens, segments):
        logits = model.apply({"params": params}, tokens, segment_ids_BxL=segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    expected = jax.jit(jax.value_and_grad(loss))(params, tokens, segments)
    mesh = sharding.make_mesh(mesh_axes)
    rows = NamedSharding(mesh, P("data"))
    placed = jax.device_put(params, sharding.param_shardings(params, mesh, RULES))
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss))(placed, jax.device_put(tokens, rows), jax.device_put(segments, rows))
    assert placed["layers"]["q_proj"]["kernel"].sharding.spec[0] == (
        "stage" if layers % mesh_axes["stage"] == 0 else None
    )
    return got, expected


def assert_equal_values(got, expected):
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-6)  # measured: 4e-6 of 17.3 at most
    for name, gradient in jax.tree_util.tree_leaves_with_path(got[1]):
        reference = expected[1]
        for key in name:
            reference = reference[key.key]
        np.testing.assert_allclose(gradient, reference, atol=3e-6, err_msg=str(name))  # measured: <= 1.2e-6


@pytest.mark.slow  # 15 s: the quick suite is at its 6 minutes
def test_gpipe_over_two_stages_gives_the_one_device_gradients_with_documents_and_tensor():
    assert_equal_values(*pipelined({"stage": 2, "data": 2, "tensor": 2}, microbatches=4, documents=True))


@pytest.mark.slow  # 8-15 s each
@pytest.mark.parametrize(
    "mesh_axes, microbatches, repeats, remat, layers, gather",
    [
        ({"stage": 4, "data": 2, "tensor": 1}, 4, 1, False, 8, False),  # GPipe, 4 stages
        ({"stage": 2, "data": 4, "tensor": 1}, 2, 1, True, 8, True),  # M = S, stages rematerialised, gathered once
        ({"stage": 2, "data": 2, "tensor": 2}, 4, 2, True, 8, False),  # circular: each stage 2 blocks of 2 layers
        ({"stage": 4, "data": 1, "tensor": 2}, 4, 2, False, 8, True),  # circular over 4 stages
        ({"stage": 4, "data": 2, "tensor": 1}, 4, 1, False, 6, True),  # 6 layers padded to 4 stages of 2
    ],
)
def test_schedules_give_the_one_device_gradients(mesh_axes, microbatches, repeats, remat, layers, gather):
    assert_equal_values(*pipelined(mesh_axes, microbatches, repeats, remat, True, layers, gather))


@pytest.mark.slow  # 20-40 s each
@pytest.mark.parametrize(
    "mesh_axes, overrides",
    [
        ({"stage": 2, "data": 4}, {"model.pipeline_microbatches": 4}),
        ({"stage": 4, "fsdp": 2}, {"model.pipeline_microbatches": 4, "model.pipeline_remat": True}),
        ({"stage": 2, "fsdp": 2, "tensor": 2}, {"model.pipeline_microbatches": 4, "model.pipeline_repeats": 2}),
    ],
)
def test_pipelined_training_gives_the_one_device_losses(data_dir, mesh_axes, overrides):
    reference = mesh_losses(lm, smoke(data_dir, **overrides), ONE)
    assert reference[-1] < reference[0]
    np.testing.assert_allclose(mesh_losses(lm, smoke(data_dir, **overrides), ONE | mesh_axes), reference, atol=1e-5)


@pytest.mark.slow
def test_a_pipelined_run_resumes_bitwise(data_dir, tmp_path):
    """Stage 2 x fsdp 2 x tensor 2, circular (4 micro-batches, 2 repeats): stopped at step 3 of 6 and resumed, the
    final state equals the uninterrupted run's bitwise."""
    config = smoke(data_dir, **{"model.pipeline_microbatches": 4, "model.pipeline_repeats": 2, "num_steps": 6})
    config.update_from_flattened_dict({"checkpoint.every_steps": 3, "log_every": 1})
    config.mesh.update(ONE | {"stage": 2, "fsdp": 2, "tensor": 2})
    losses = resumed_losses(lm, config, tmp_path, stop_at=3)
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.pipeline_microbatches": 3}, "a batch of 16 does not cut into model.pipeline_microbatches 3"),
        pytest.param(
            {"model.pipeline_repeats": 2},
            "model.pipeline_repeats 2 needs model.pipeline_microbatches >= mesh.stage 2",
            marks=pytest.mark.slow,  # 3-4 s each: the quick suite keeps one
        ),
        pytest.param(
            {"model.family": "gpt", "model.num_kv_heads": 4},
            "mesh.stage splits a scanned stack of layers, which the GPT has not: use mesh.stage=1",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            {"model.scan_layers": False},
            "mesh.stage splits a scanned stack of layers: set model.scan_layers=True",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_layout_the_pipeline_cannot_run_is_one_line(data_dir, overrides, message):
    config = smoke(data_dir, **{"model.pipeline_microbatches": 1} | overrides)
    with pytest.raises(ConfigError, match=message):
        mesh_losses(lm, config, ONE | {"stage": 2, "data": 4}, 1)
