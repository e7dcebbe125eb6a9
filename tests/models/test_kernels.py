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


def reference_attention(query, key, value, window: int, scale: float, softcap: float) -> np.ndarray:
    """Causal grouped-query attention written out in numpy (float64): scaled, soft-capped, windowed scores."""
    query, key, value = (np.asarray(x, np.float64) for x in (query, key, value))
    group = query.shape[2] // key.shape[2]
    key, value = np.repeat(key, group, axis=2), np.repeat(value, group, axis=2)  # query head h reads h // group
    scores = np.einsum("blhd,bshd->bhls", query, key) * scale
    scores = softcap * np.tanh(scores / softcap)
    distance = np.arange(query.shape[1])[:, None] - np.arange(query.shape[1])[None, :]
    scores = np.where((distance >= 0) & (distance < window), scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return np.einsum("bhls,bshd->blhd", weights / weights.sum(axis=-1, keepdims=True), value)


SCORES = dict(window=64, scale=0.3, softcap=5.0)  # scores of order 2.4 (std), capped well below their peaks


def test_windowed_scaled_soft_capped_attention_equals_the_written_out_reference():
    """Gemma 2's local attention: xla (plain_attention), splash (interpret mode) and the plain_attention call
    decoding uses agree with the numpy reference; the cap and the scale each change the result."""
    query, key, value, _ = inputs(2)
    expected = reference_attention(query, key, value, **SCORES)
    raw = np.einsum("blhd,bshd->bhls", query, np.repeat(key, HEADS // KV_HEADS, axis=2)) * SCORES["scale"]
    assert np.abs(raw).max() > 2 * SCORES["softcap"]  # the cap is reached
    xla = jax.jit(lambda q, k, v: kernels.attend(q, k, v, implementation="xla", **SCORES))(query, key, value)
    np.testing.assert_allclose(xla, expected, atol=1e-5)
    splash = jax.jit(lambda q, k, v: kernels.attend(q, k, v, implementation="splash", **SCORES))(query, key, value)
    np.testing.assert_allclose(splash, expected, atol=1e-5)
    distance = np.arange(LENGTH)[:, None] - np.arange(LENGTH)[None, :]
    allowed = (distance >= 0) & (distance < SCORES["window"])
    plain = kernels.plain_attention(query, key, value, allowed, scale=SCORES["scale"], softcap=SCORES["softcap"])
    np.testing.assert_allclose(plain, expected, atol=1e-5)
    uncapped = kernels.attend(query, key, value, implementation="xla", window=64, scale=0.3)
    assert float(jnp.max(jnp.abs(uncapped - expected))) > 1e-2
    default_scale = kernels.attend(query, key, value, implementation="xla", window=64, softcap=5.0)
    assert float(jnp.max(jnp.abs(default_scale - expected))) > 1e-2
    weights = kernels.weights(query, key, **SCORES)  # the attention maps: B x H x L x S, rows summing to 1
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, atol=1e-5)
    assert float(jnp.max(jnp.where(jnp.asarray(allowed), 0.0, weights))) == 0.0


def test_auto_never_picks_cudnn_for_soft_capped_scores(monkeypatch):
    """On a GPU (faked) with half-precision inputs cuDNN is chosen, unless the scores are soft-capped: jax's cuDNN
    attention has no cap; asked for by name it is a one-line error."""
    query, key, value, _ = inputs()
    query, key, value = (x.astype(jnp.bfloat16) for x in (query, key, value))
    monkeypatch.setattr(kernels, "platform", lambda: "gpu")
    assert kernels.choose("auto", query, key, None) == "cudnn"
    assert kernels.choose("auto", query, key, None, softcap=50.0) == "xla"
    assert kernels.cudnn_supports(query, None) and not kernels.cudnn_supports(query, None, softcap=50.0)
    with pytest.raises(ConfigError, match="no soft-capping: use auto$"):
        kernels.attend(query, key, value, implementation="cudnn", softcap=50.0)
