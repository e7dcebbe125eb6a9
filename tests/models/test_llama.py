"""The Llama family: scanned and unrolled layers, rematerialisation, the rolling key/value cache (its
comparison with transformers is in tests/tools/test_hf.py, published sizes in tests/experiments/test_lm.py)."""

import jax
import numpy as np
import pytest

from conftest import assert_trees_close
from research.errors import ConfigError
from research.inference.generate import Sampling, generate
from research.models import param_count
from research.models.llama import Llama
from research.tools.hf.layout import rolled, unrolled

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 24))


def test_scanned_and_unrolled_layers_hold_the_same_parameters():
    kwargs = dict(vocab_size=96, num_layers=3, num_heads=4, num_kv_heads=2, width=64, mlp_dim=160)
    shapes = {
        scan: jax.eval_shape(Llama(scan_layers=scan, **kwargs).init, jax.random.PRNGKey(0), TOKENS)["params"]
        for scan in (False, True)
    }
    assert param_count(shapes[False]) == param_count(shapes[True])
    assert shapes[True]["layers"]["q_proj"]["kernel"].shape == (3, 64, 64)
    assert shapes[True]["layers"]["k_proj"]["kernel"].shape == (3, 64, 32)


@pytest.mark.slow
def test_rematerialised_scanned_layers_give_the_same_loss_and_gradients():
    kwargs = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, width=32, mlp_dim=64, scan_layers=True)
    params = Llama(**kwargs).init(jax.random.PRNGKey(0), TOKENS)["params"]
    results = {}
    for policy in ("none", "full"):
        model = Llama(remat=policy, **kwargs)
        loss = lambda params, model=model: -jax.nn.log_softmax(model.apply({"params": params}, TOKENS))[..., 3].mean()
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    assert float(results["full"][0]) == pytest.approx(float(results["none"][0]), abs=1e-6)
    assert_trees_close(results["full"][1], results["none"][1], atol=1e-6)


def test_bad_head_counts_or_policy_are_one_line_errors():
    with pytest.raises(ConfigError, match="model.num_kv_heads 3 does not divide model.num_heads 4"):
        Llama(vocab_size=8, num_layers=1, num_heads=4, num_kv_heads=3, width=16, mlp_dim=16).init(
            jax.random.PRNGKey(0), TOKENS
        )
    with pytest.raises(ConfigError, match="model.remat 'most' is not a policy"):
        Llama(vocab_size=96, num_layers=1, num_heads=4, num_kv_heads=2, width=16, mlp_dim=16, remat="most").init(
            jax.random.PRNGKey(0), TOKENS
        )


@pytest.mark.slow  # 11 s: keeps the quick suite within its 6 minutes
def test_rolling_cache_equals_the_full_pass_far_past_the_block():
    """40 tokens past a block of 16: the cache rolls (16 slots of the 2 key/value heads, not the 4 query
    heads) and gives the full pass's sliding-window logits, so sampled tokens agree too."""
    model = Llama(vocab_size=50, num_layers=2, num_heads=4, num_kv_heads=2, width=32, mlp_dim=64, block_size=16)
    params = model.init(jax.random.PRNGKey(0), TOKENS[:, :8])["params"]
    init_state, step = model.make_decoder(2, 40)
    step = jax.jit(step)
    assert init_state(params)["key"].shape == (2, 2, 16, 2, 8)  # layers x batch x slots x kv heads x head width
    full_step = jax.jit(model.make_decoder(2, 40, cached=False)[1])
    buffer = jax.numpy.asarray(np.random.default_rng(1).integers(0, 50, (2, 40)))
    cache, worst = init_state(params), 0.0
    for t in range(40):
        logits, cache = step(params, cache, buffer, jax.numpy.int32(t))
        expected, _ = full_step(params, None, buffer, jax.numpy.int32(t))
        worst = max(worst, float(np.abs(np.asarray(logits - expected)).max()))
    assert worst <= 1e-5
    prompt = np.random.default_rng(2).integers(0, 50, (2, 5))
    for sampling in (Sampling(temperature=0.0), Sampling(temperature=1.0, seed=3)):
        cached = generate(model, params, prompt, 40, sampling)
        np.testing.assert_array_equal(cached, generate(model, params, prompt, 40, sampling, cached=False))


# Gemma 3's pattern at toy size: windows of 4, every other layer global with a scaled rotary base of its own.
LOCAL_GLOBAL = dict(vocab_size=96, num_layers=4, num_heads=4, num_kv_heads=2, width=32, mlp_dim=64, head_dim=16)
LOCAL_GLOBAL |= dict(attention_window=4, global_every=2, rope_theta=1e6, rope_scaling=(4.0,), rope_local_theta=1e4)
GEMMA3_LIKE = LOCAL_GLOBAL | dict(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", qk_norm=True)
GEMMA3_LIKE |= dict(post_norms=True, query_scale_dim=24, tie_embeddings=True)


def perturbed_params(model: Llama, seed: int = 0, noise: float = 0.3) -> dict:
    """Unrolled parameters far enough from the init that the window and each kind's rotary base matter."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.clone(scan_layers=False).init, jax.random.PRNGKey(0), TOKENS[:, :8])["params"]
    return jax.tree_util.tree_map_with_path(  # the init's norm scales (drawn in numpy: compiling init is slow)
        lambda path, leaf: (
            (1.0 - model.norm_offset) * (path[-1].key == "scale") + noise * rng.standard_normal(leaf.shape, np.float32)
        ),
        shapes,
    )


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_rolling_cache_equals_the_full_pass_with_local_and_global_layers(scan):
    """24 positions past a block of 16, windows of 4: the local layers' slots count only inside their window, the
    global layers' all 16 (the uncached pass limits them to as many), and each kind rotates by its own base
    (scanned: chosen by lax.switch)."""
    model = Llama(**LOCAL_GLOBAL, block_size=16, scan_layers=scan)
    params = perturbed_params(model)
    params = rolled(params) if scan else params
    init_state, step = model.make_decoder(2, 24)
    step, full_step = jax.jit(step), jax.jit(model.make_decoder(2, 24, cached=False)[1])
    buffer = jax.numpy.asarray(TOKENS)
    cache, worst = init_state(params), 0.0
    for t in range(24):
        logits, cache = step(params, cache, buffer, jax.numpy.int32(t))
        expected, _ = full_step(params, None, buffer, jax.numpy.int32(t))
        worst = max(worst, float(np.abs(np.asarray(logits - expected)).max()))
    assert worst <= 5e-5  # logits of order 10
    every_layer_global = jax.jit(model.clone(attention_window=0).apply)({"params": params}, TOKENS)
    logits = jax.jit(model.apply)({"params": params}, TOKENS)
    assert float(np.abs(logits - every_layer_global).max()) > 0.1  # the windows matter


def test_scanned_layers_of_two_kinds_equal_unrolled_ones():
    """Six layers, global ones at 3 and 6: the scan's lax.switch gives each layer its window and rotary base."""
    model = Llama(**GEMMA3_LIKE | dict(num_layers=6, global_every=3))
    params = perturbed_params(model)
    unrolled_logits = jax.jit(model.apply)({"params": params}, TOKENS)
    scanned_logits = jax.jit(model.clone(scan_layers=True).apply)({"params": rolled(params)}, TOKENS)
    assert float(np.abs(scanned_logits - unrolled_logits).max()) <= 1e-5
    assert_trees_close(unrolled(rolled(params)), params, atol=0.0)
    one_kind = jax.jit(model.clone(scan_layers=True, global_every=0).apply)({"params": rolled(params)}, TOKENS)
    assert float(np.abs(one_kind - unrolled_logits).max()) > 0.1  # the kinds differ, so the switch has work to do


@pytest.mark.slow
def test_rematerialised_layers_of_two_kinds_give_the_same_loss_and_gradients():
    model = Llama(**GEMMA3_LIKE, scan_layers=True)
    params = rolled(perturbed_params(model))
    results = {}
    for policy in ("none", "full"):
        remat = model.clone(remat=policy)
        loss = lambda params, remat=remat: -jax.nn.log_softmax(remat.apply({"params": params}, TOKENS))[..., 3].mean()
        results[policy] = jax.jit(jax.value_and_grad(loss))(params)
    assert float(results["full"][0]) == pytest.approx(float(results["none"][0]), abs=1e-6)
    assert_trees_close(results["full"][1], results["none"][1], atol=1e-6)
