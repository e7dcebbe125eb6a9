"""The mixture-of-experts MLP (research/models/moe.py): equal to a token-by-token reference with either dispatch,
the same on every mesh of the expert, data, fsdp and tensor axes (values and gradients), the router's losses
and statistics, and a decoder of experts that trains sharded to the one-device losses and resumes bitwise."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import assert_trees_close, load_experiment, mesh_losses, restored_state, train_losses
from research import experiment, sharding, train
from research.errors import ConfigError
from research.models import moe

lm = load_experiment("lm")
EXPERTS, CHOSEN, WIDTH, HIDDEN = 8, 2, 16, 24
MESHES = [  # expert x data x fsdp, with tensor, all experts on their own device, experts within fsdp
    {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1},
    {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2},
    {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1},
]


def mixture(dispatch: str = "dropless", capacity_factor: float = 1.25) -> moe.MoE:
    routing = moe.Routing(EXPERTS, CHOSEN, dispatch=dispatch, capacity_factor=capacity_factor)
    return moe.MoE(routing, HIDDEN, init_std=0.3, output_init_std=0.3)  # weights large enough to tell experts apart


def token_by_token(params: dict, x_BxLxD: jax.Array) -> jax.Array:
    """Each token through its top-2 experts' SwiGLU, weighted by its renormalised router probabilities."""
    probs = jax.nn.softmax(x_BxLxD @ params["gate"]["kernel"], axis=-1)
    weights, chosen = jax.lax.top_k(probs, CHOSEN)
    weights = weights / weights.sum(-1, keepdims=True)
    y = jnp.zeros_like(x_BxLxD)
    for k in range(CHOSEN):
        gate, up, down = (params[name][chosen[..., k]] for name in ("gate_proj", "up_proj", "down_proj"))
        hidden = nn.silu(jnp.einsum("bld,bldf->blf", x_BxLxD, gate)) * jnp.einsum("bld,bldf->blf", x_BxLxD, up)
        y = y + weights[..., k : k + 1] * jnp.einsum("blf,blfd->bld", hidden, down)
    return y


@pytest.fixture(scope="module")
def layer():
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, WIDTH))
    return x, mixture().init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_either_dispatch_equals_the_token_by_token_reference(layer, dispatch):
    """Dropless, and capacity with room for every copy (factor 8 = E / k x 2): nothing dropped, the same output."""
    x, variables = layer
    y, sown = mixture(dispatch, capacity_factor=8.0).apply(variables, x, mutable=[moe.COLLECTION])
    np.testing.assert_allclose(y, token_by_token(variables["params"], x), atol=2e-6)
    assert float(sown[moe.COLLECTION]["dropped"]) == 0.0


def test_the_tiled_grouped_matmul_is_ragged_dot_with_its_gradients():
    """300 rows in groups of 0, 130, 7, 0 and 150 (tiles of 128: a group over a tile, one under, empty ones) and 13
    rows past the groups, which come out 0: jax.lax.ragged_dot's values and gradients."""
    keys = jax.random.split(jax.random.PRNGKey(3), 2)
    rows, weights = jax.random.normal(keys[0], (300, 16)), jax.random.normal(keys[1], (5, 16, 24))
    sizes = jnp.array([0, 130, 7, 0, 150], jnp.int32)

    def loss(matmul):
        return jax.jit(jax.value_and_grad(lambda r, w: jnp.sum(jnp.sin(matmul(r, w, sizes))), argnums=(0, 1)))

    (value, grads), (expected, expected_grads) = (
        loss(moe.grouped_matmul)(rows, weights),
        loss(jax.lax.ragged_dot)(rows, weights),
    )
    np.testing.assert_allclose(
        moe.grouped_matmul(rows, weights, sizes), jax.lax.ragged_dot(rows, weights, sizes), atol=1e-5
    )
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    assert_trees_close(grads, expected_grads, atol=1e-4)
    assert not np.any(moe.grouped_matmul(rows, weights, sizes)[287:])


def test_capacity_drops_the_overflow_and_counts_it(layer):
    """Factor 1: each expert takes 96 x 2 / 8 = 24 copies; the busiest experts' extra copies skip the layer."""
    x, variables = layer
    _, sown = mixture().apply(variables, x, mutable=[moe.COLLECTION])
    load = np.asarray(sown[moe.COLLECTION]["load"])  # each expert's copies over a fair share of 24
    expected = np.sum(np.maximum(load * 24 - 24, 0)) / (96 * 2)
    _, sown = mixture("capacity", capacity_factor=1.0).apply(variables, x, mutable=[moe.COLLECTION])
    assert float(sown[moe.COLLECTION]["dropped"]) == pytest.approx(expected) and expected > 0.02


@pytest.mark.parametrize(  # the first mesh (14 s) with the slow tests, keeping the quick suite within its 6 minutes
    "mesh_axes",
    [pytest.param(MESHES[0], marks=pytest.mark.slow), *MESHES[1:]],
    ids=lambda axes: "x".join(f"{k}{v}" for k, v in axes.items()),
)
def test_every_mesh_gives_the_unsharded_values_and_gradients(layer, mesh_axes):
    """Tokens split over the expert axis go to their experts by all-to-all; a batch of 3 that no axis divides
    is computed by each expert shard for its own experts and summed. Gradients of every weight agree."""
    x, variables = layer
    model = mixture()

    def loss(variables, x):
        return jnp.sum(model.apply(variables, x) ** 2)

    expected, expected_grads = model.apply(variables, x), jax.grad(loss)(variables, x)
    with jax.set_mesh(sharding.make_mesh(mesh_axes)):
        y, odd = jax.jit(model.apply)(variables, x), jax.jit(model.apply)(variables, x[:3])
        grads = jax.jit(jax.grad(loss))(variables, x)
    np.testing.assert_allclose(y, expected, atol=3e-6)
    np.testing.assert_allclose(odd, expected[:3], atol=3e-6)
    assert_trees_close(grads, expected_grads, atol=2e-4, rtol=1e-5)


def test_shared_experts_add_a_dense_gated_mlp_every_token_passes_through(layer):
    """shared_mlp_dim 32 (DeepSeek-MoE's shared expert): the routed output plus SwiGLU(x) of its own weights."""
    x, variables = layer
    routing = moe.Routing(EXPERTS, CHOSEN, shared_mlp_dim=32)
    shared = moe.MoE(routing, HIDDEN, init_std=0.3, output_init_std=0.3)
    params = shared.init(jax.random.PRNGKey(2), x)["params"] | variables["params"]
    gate, up = (x @ params[f"shared_{name}_proj"]["kernel"] for name in ("gate", "up"))
    dense = (nn.silu(gate) * up) @ params["shared_down_proj"]["kernel"]
    expected = mixture().apply(variables, x) + dense
    np.testing.assert_allclose(shared.apply({"params": params}, x), expected, atol=2e-6)


def test_router_terms_weigh_the_balance_and_z_losses_and_report_the_load():
    """Two layers (scanned: one leading axis): balance k = 2 when the router is uniform, load 1 for every expert."""
    sown = {"layers": {"mlp": {"balance": jnp.array([2.0, 4.0]), "z_loss": jnp.array([1.0, 3.0])}}}
    sown["layers"]["mlp"] |= {"load": jnp.array([[1.0] * 4, [2.0, 0.0, 1.0, 1.0]]), "dropped": jnp.array([0.0, 0.1])}
    model = lm.make_model(lm.get_config("smoke-mixtral")).clone(moe_aux_weight=0.5, moe_z_weight=0.01)
    loss, metrics = moe.router_terms({moe.COLLECTION: sown}, model)
    assert float(loss) == pytest.approx(0.5 * 3.0 + 0.01 * 2.0)
    assert {name: round(float(value), 6) for name, value in metrics.items()} == {
        "moe/balance": 3.0,
        "moe/z_loss": 2.0,
        "moe/dropped": 0.05,
        "moe/load_max": 1.5,
        "moe/load_min": 0.5,
    }
    assert moe.router_terms({}, model) == (0.0, {})


def test_experts_that_do_not_split_over_the_expert_axis_are_one_line(layer):
    x, variables = layer
    with jax.set_mesh(sharding.make_mesh({"data": 1, "fsdp": 1, "expert": 3, "tensor": 1}, jax.devices()[:3])):
        with pytest.raises(ConfigError, match="model.num_experts 8 does not split over mesh.expert 3"):
            jax.jit(mixture().apply)(variables, x)
    with pytest.raises(ConfigError, match="model.moe_dispatch 'sparse': use one of dropless, capacity"):
        mixture("sparse").apply(variables, x)


def test_a_decoder_of_experts_counts_its_active_parameters(data_dir):
    """:cpu-mixtral: 8 experts of 195 units, top-2, so its MLP's active width is :cpu's 390; FLOPs count those."""
    config, dense = lm.get_config("cpu-mixtral"), lm.get_config("cpu")
    for each in (config, dense):
        each.data_dir = data_dir
    shape = lm.decoder_shape(config)
    inactive = moe.inactive_parameters(shape.layers, shape.experts, shape.experts_per_token, shape.width, 195)
    assert inactive == 4 * 6 * 3 * 128 * 195
    router = 4 * 128 * 8
    assert lm.parameter_count(config) - inactive == lm.parameter_count(dense) + router
    assert lm.flops_per_example(config) == pytest.approx(lm.flops_per_example(dense) + 6 * 64 * router)


def smoke_mixtral(data_dir: str, **overrides):
    """:smoke-mixtral (one layer of 64, 8 experts of 195, top-2) on the session's data, with `overrides`."""
    config = lm.get_config("smoke-mixtral")
    config.update_from_flattened_dict({"data_dir": data_dir} | overrides)
    return config


def losses_on(mesh_axes: dict, data_dir: str, steps_count: int = 4, **overrides) -> np.ndarray:
    """Per-step losses of :smoke-mixtral (2 scanned layers, the balancing and z-losses on) on a mesh of those axes."""
    config = smoke_mixtral(data_dir, **{"model.num_layers": 2, "model.scan_layers": True, "model.moe_z_weight": 1e-3})
    config.update_from_flattened_dict(overrides)
    return mesh_losses(lm, config, mesh_axes, steps_count)


@pytest.mark.slow
def test_expert_data_fsdp_and_tensor_parallel_give_the_one_device_losses(data_dir):
    """Dropless routing trains to the one-device losses on 8 devices, whichever axes split it; the capacity
    dispatch with room for every copy gives the dropless losses."""
    reference = losses_on({"data": 1, "fsdp": 1, "expert": 1, "tensor": 1}, data_dir)
    assert reference[-1] < reference[0]
    for mesh_axes in (
        {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1},
        {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2},
    ):
        np.testing.assert_allclose(losses_on(mesh_axes, data_dir), reference, atol=1e-5, err_msg=str(mesh_axes))
    roomy = {"model.moe_dispatch": "capacity", "model.moe_capacity_factor": 4.0}
    np.testing.assert_allclose(losses_on(MESHES[0], data_dir, **roomy), reference, atol=1e-5)


@pytest.mark.slow
def test_a_run_of_experts_on_an_expert_mesh_resumes_bitwise(data_dir, tmp_path):
    """:smoke-mixtral on 4 data x 2 expert devices, stopped at step 20 and resumed: the losses and the final
    parameters of the straight run, bit for bit."""
    config = smoke_mixtral(data_dir, num_steps=40, log_every=10, **{"checkpoint.every_steps": 20})
    config.mesh.update({"data": 4, "expert": 2})
    for workdir in (tmp_path / "straight", tmp_path / "resumed"):
        experiment.claim_workdir(workdir, "lm", config)
    straight = train.train_and_evaluate(config, lm, tmp_path / "straight")
    train.train_and_evaluate(config, lm, tmp_path / "resumed", stop_at_step=20)
    assert train.train_and_evaluate(config, lm, tmp_path / "resumed") == straight
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "straight")
    assert_trees_close(restored_state(tmp_path / "resumed", 40), restored_state(tmp_path / "straight", 40), atol=0.0)
