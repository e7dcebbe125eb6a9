"""Context parallelism: each sequence split over the mesh's `context` axis (research/sharding.py, shard_batch,
kernels._gathered) trains to the one-device losses, with data, FSDP and tensor beside it, scanned layers and
sliding windows; the batch and the residual stream are split along their positions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import load_experiment, mesh_losses
from research import sharding
from research.errors import ConfigError
from research.models import kernels, ring

lm = load_experiment("lm")
ONE = {"data": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}


def smoke(data_dir: str, **overrides):
    """:smoke (one layer of 64, 2 heads, 1 key/value head, windows of 32) on the session's data."""
    config = lm.get_config("smoke")
    config.update_from_flattened_dict({"data_dir": data_dir, "model.num_heads": 4, "model.num_kv_heads": 2} | overrides)
    return config


def test_the_batch_and_the_residual_stream_split_along_their_positions(data_dir):
    mesh = sharding.make_mesh(ONE | {"data": 2, "context": 4})
    batch = sharding.put_batch(next(iter(lm.make_data(smoke(data_dir), "train"))), mesh)
    assert batch["inputs"].sharding.spec == P(("data", "fsdp", "expert"), "context")
    assert batch["inputs"].addressable_shards[0].data.shape == (8, 8)  # 16 x 32 over data 2 x context 4
    with jax.set_mesh(mesh):
        assert ring.shards() == 4 and kernels.choose("auto", *[jnp.zeros((2, 32, 4, 8))] * 2, None) == "ring"
        assert kernels.choose("auto", *[jnp.zeros((2, 36, 4, 8))] * 2, None) == "xla"  # 36: not in 2 x 4 chunks
        assert list(kernels.ring_order("auto", 16)) == [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10, 11, 6, 7, 8, 9]


@pytest.mark.slow  # 6-12 s each: the quick suite is at its 6 minutes
@pytest.mark.parametrize(
    "window, documents, softcap", [(0, False, 0.0), (10, False, 0.0), (0, True, 0.0), (6, True, 5.0)]
)
def test_ring_attention_equals_attention_over_the_whole_sequence(window, documents, softcap):
    """Values and gradients of ring attention over context 4 (x data 2) equal the one-device attention's."""
    batch, length, heads, kv_heads, head_dim = 2, 32, 4, 2, 8
    rng = np.random.default_rng(0)
    query, key, value, probe = (
        jnp.asarray(rng.normal(size=(batch, length, count, head_dim)), jnp.float32)
        for count in (heads, kv_heads, kv_heads, heads)
    )
    segments = jnp.asarray(np.sort(rng.integers(0, 3, (batch, length)), axis=1)) if documents else None
    masks = dict(scale=head_dim**-0.5, softcap=softcap)
    allowed = kernels._allowed(length, window, segments)
    whole = lambda *qkv: kernels.plain_attention(*qkv, allowed, **masks)
    order = ring.balanced_order(length, 4)

    def ringed(*qkv):
        ordered = [x[:, order] for x in qkv] + [None if segments is None else segments[:, order]]
        return ring.attend(*ordered, window=window, **masks)[:, np.argsort(order)]

    expected = whole(query, key, value)
    gradients = jax.grad(lambda *qkv: jnp.sum(whole(*qkv) * probe), argnums=(0, 1, 2))(query, key, value)
    with jax.set_mesh(sharding.make_mesh({"data": 2, "context": 4})):
        got = jax.jit(ringed)(query, key, value)
        got_gradients = jax.jit(jax.grad(lambda *qkv: jnp.sum(ringed(*qkv) * probe), argnums=(0, 1, 2)))(
            query, key, value
        )
    np.testing.assert_allclose(got, expected, atol=2e-6)  # measured: <= 5e-7
    for got_gradient, gradient in zip(got_gradients, gradients):
        np.testing.assert_allclose(got_gradient, gradient, atol=5e-6)  # measured: <= 1.2e-6


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_axes, overrides",
    [
        ({"data": 2, "context": 4}, {}),  # ring attention
        ({"data": 2, "context": 4}, {"model.attention": "xla"}),  # the keys and values gathered
        ({"fsdp": 2, "context": 2, "tensor": 2}, {"model.num_layers": 2, "model.scan_layers": True}),
    ],
)
def test_context_parallel_training_gives_the_one_device_losses(data_dir, mesh_axes, overrides):
    reference = mesh_losses(lm, smoke(data_dir, **overrides), ONE)
    assert reference[-1] < reference[0]
    np.testing.assert_allclose(mesh_losses(lm, smoke(data_dir, **overrides), ONE | mesh_axes), reference, atol=1e-5)


def test_a_length_the_context_axis_does_not_divide_is_one_line(data_dir):
    with pytest.raises(ConfigError, match="model.block_size 30 must be a multiple of mesh.context 4"):
        mesh_losses(lm, smoke(data_dir, **{"model.block_size": 30}), ONE | {"data": 2, "context": 4}, 1)


def temporaries(data_dir: str, mesh_axes: dict) -> int:
    """Bytes of temporaries per device of the compiled train step of a 1,024-token :smoke on that mesh."""
    from research import steps

    config = smoke(data_dir, **{"model.block_size": 1024, "batch_size": 4})
    config.mesh.update(mesh_axes)
    mesh = sharding.make_mesh(mesh_axes, jax.devices()[: int(np.prod(list(mesh_axes.values())))])
    setup = steps.build(config, lm, mesh)
    return setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_each_device_holds_its_share_of_the_positions(data_dir):
    """Split over context 4, a device's temporaries (activations, the L / 4 x L scores) are near a quarter of one
    device's: the sequence is not gathered back anywhere but in attention's keys and values."""
    one, split = temporaries(data_dir, ONE), temporaries(data_dir, ONE | {"context": 4})
    assert split < 0.3 * one, (split, one)  # measured: 55 MiB against 264 MiB (data 4 instead: 50 MiB)


@pytest.mark.slow  # 6-10 s each
@pytest.mark.parametrize("attention", ["auto", "xla"])  # the ring; the keys and values gathered
def test_a_decoder_over_the_context_axis_gives_the_one_device_gradients_with_documents(attention):
    """A 4-layer Llama (local and global layers) over context 4 x data 2 with two documents a row: its loss and every
    parameter's gradient equal the one-device ones."""
    from jax.sharding import NamedSharding

    from research.models.llama import Llama

    settings = dict(vocab_size=64, num_layers=4, num_heads=4, num_kv_heads=2, width=32, mlp_dim=64, block_size=32)
    model = Llama(**settings, attention_window=12, global_every=2, scan_layers=True, attention=attention)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, 64)
    starts = jax.random.randint(jax.random.PRNGKey(2), (4, 1), 3, 29)
    segments = (jnp.arange(32)[None, :] >= starts).astype(jnp.int32)
    params = model.init(jax.random.PRNGKey(0), tokens)["params"]

    def loss(params, tokens, segments):
        logits = model.apply({"params": params}, tokens, segment_ids_BxL=segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] ** 2)

    expected_loss, expected = jax.jit(jax.value_and_grad(loss))(params, tokens, segments)
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    split = NamedSharding(mesh, P("data", "context"))
    with jax.set_mesh(mesh):
        got_loss, got = jax.jit(jax.value_and_grad(loss))(
            params, jax.device_put(tokens, split), jax.device_put(segments, split)
        )
    np.testing.assert_allclose(got_loss, expected_loss, rtol=1e-6)
    difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
    assert difference < 1e-5, difference
