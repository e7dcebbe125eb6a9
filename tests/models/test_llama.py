"""The Llama family: published sizes, scanned and unrolled layers, rematerialisation, the rolling
key/value cache (its comparison with transformers is in tests/tools/test_hf.py)."""

import jax
import numpy as np
import pytest

from conftest import assert_trees_close
from research.errors import ConfigError
from research.inference.generate import Sampling, generate
from research.models import param_count
from research.models.llama import PUBLISHED_PARAMETERS, SIZES, Llama

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


@pytest.mark.parametrize("name", sorted(SIZES))
def test_published_sizes_have_the_published_parameter_counts(name):
    """Sized abstractly (jax.eval_shape: nothing allocated), the 80 layers of the 70B model scanned."""
    model = Llama(scan_layers=True, **SIZES[name])
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    assert param_count(shapes) == PUBLISHED_PARAMETERS[name]


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
