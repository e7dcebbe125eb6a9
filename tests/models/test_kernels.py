"""The attention kernels against XLA's attention: Pallas splash in interpret mode (what runs on a TPU), on one
device and under a data x fsdp x tensor mesh, with grouped-query heads, document masks and a sliding window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import sharding
from research.errors import ConfigError
from research.models import kernels

BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 4, 256, 4, 2, 64


def inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    query = jnp.asarray(rng.normal(size=(BATCH, LENGTH, HEADS, HEAD_DIM)), jnp.float32)
    key, value = (jnp.asarray(rng.normal(size=(BATCH, LENGTH, KV_HEADS, HEAD_DIM)), jnp.float32) for _ in range(2))
    # Two documents per window, split at a different place in every row.
    segments = jnp.asarray(np.arange(LENGTH)[None, :] >= np.array([[40], [100], [128], [255]]), jnp.int32)
    return query, key, value, segments


@pytest.mark.parametrize("options", [{}, {"documents": True}, {"window": 64}], ids=["causal", "documents", "window"])
def test_splash_equals_xla_attention(options):
    query, key, value, segments = inputs()
    extra = dict(segment_ids_BxL=segments if options.get("documents") else None, window=options.get("window", 0))
    expected = kernels.attend(query, key, value, implementation="xla", **extra)
    splash = jax.jit(lambda q, k, v: kernels.attend(q, k, v, implementation="splash", **extra))
    np.testing.assert_allclose(splash(query, key, value), expected, atol=1e-5)
    if options.get("documents"):  # the mask matters: without it the first document's positions differ
        assert float(jnp.max(jnp.abs(kernels.attend(query, key, value, implementation="xla") - expected))) > 1e-2


def test_splash_under_a_mesh_equals_xla_attention_with_gradients():
    query, key, value, segments = inputs(1)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    def loss(implementation):
        return lambda *qkv: jnp.sum(
            jnp.tanh(kernels.attend(*qkv, implementation=implementation, segment_ids_BxL=segments))
        )

    with jax.set_mesh(mesh):
        splash = jax.jit(jax.value_and_grad(loss("splash"), argnums=(0, 1, 2)))(query, key, value)
    xla = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(query, key, value)
    np.testing.assert_allclose(splash[0], xla[0], rtol=1e-5)
    for ours, reference in zip(splash[1], xla[1]):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)  # gradients of order 10


def test_auto_picks_xla_on_a_cpu_and_refuses_what_a_kernel_cannot_take():
    query, key, value, _ = inputs()
    assert kernels.choose("auto", query, key, None) == "xla"
    with pytest.raises(ConfigError, match="needs an NVIDIA GPU"):
        kernels.attend(query, key, value, implementation="cudnn")
    with pytest.raises(ConfigError, match="multiple of 128"):
        kernels.attend(query[:, :100], key[:, :100], value[:, :100], implementation="splash")
    with pytest.raises(ConfigError, match="model.attention 'flash'"):
        kernels.attend(query, key, value, implementation="flash")
