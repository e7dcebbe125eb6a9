"""The Llama family against Hugging Face's LlamaForCausalLM (transformers, random weights, no download):
the same checkpoint gives the same logits, and a file that does not fit is a one-line error."""

import json

import jax
import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import assert_trees_close
from research.config import ConfigError
from research.models import param_count
from research.models.llama import PUBLISHED_PARAMETERS, SIZES, Llama
from research.tools import hf

TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 24))


def save_hf_llama(directory, *, tie: bool, kv_heads: int = 2, **config):
    """A randomly initialised LlamaForCausalLM saved with save_pretrained; returns the torch model."""
    torch.manual_seed(0)
    options = dict(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
    )
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**(options | config))).eval()
    reference.save_pretrained(directory)
    return reference


def reference_logits(reference) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize(
    "tie, kv_heads, scan", [(False, 2, False), (True, 2, True), (False, 4, True), (True, 1, False)]
)
def test_imported_llama_gives_transformers_logits(tmp_path, tie, kv_heads, scan):
    """Grouped-query (2 of 4 heads), multi-query (1) and plain multi-head (4), tied and untied, scanned or not."""
    reference = save_hf_llama(tmp_path, tie=tie, kv_heads=kv_heads)
    model, params = hf.llama_from_hf(tmp_path, scan_layers=scan)
    assert param_count(params) == sum(p.numel() for p in reference.parameters())
    logits = jax.jit(model.apply)({"params": params}, TOKENS)
    np.testing.assert_allclose(np.asarray(logits), reference_logits(reference), atol=1e-4, rtol=0)


def test_scanned_and_unrolled_layers_hold_the_same_parameters():
    kwargs = dict(vocab_size=96, num_layers=3, num_heads=4, num_kv_heads=2, width=64, mlp_dim=160)
    shapes = {
        scan: jax.eval_shape(Llama(scan_layers=scan, **kwargs).init, jax.random.PRNGKey(0), TOKENS)["params"]
        for scan in (False, True)
    }
    assert param_count(shapes[False]) == param_count(shapes[True])
    assert shapes[True]["layers"]["q_proj"]["kernel"].shape == (3, 64, 64)
    assert shapes[True]["layers"]["k_proj"]["kernel"].shape == (3, 64, 32)


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error(tmp_path):
    save_hf_llama(tmp_path, tie=False)
    model = hf.llama_model(json.loads((tmp_path / "config.json").read_text()))
    _, tensors = hf.read_checkpoint(tmp_path)
    missing = {name: value for name, value in tensors.items() if name != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConfigError, match=r"^the checkpoint has no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.llama_params(model, missing)
    wrong = tensors | {"model.norm.weight": np.ones(63, np.float32)}
    with pytest.raises(
        ConfigError, match=r"^tensor model\.norm\.weight has shape \(63,\), config.json implies \(64,\)"
    ):
        hf.llama_params(model, wrong)
    config = json.loads((tmp_path / "config.json").read_text())
    scaled = config | {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0}}
    with pytest.raises(ConfigError, match="rope scaling 'llama3' is not implemented"):
        hf.llama_model(scaled)
    with pytest.raises(ConfigError, match="config.json describes GPT2LMHeadModel, not a LlamaForCausalLM"):
        hf.llama_model({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


@pytest.mark.parametrize("name", sorted(SIZES))
def test_published_sizes_have_the_published_parameter_counts(name):
    """Sized abstractly (jax.eval_shape: nothing allocated), the 80 layers of the 70B model scanned."""
    model = Llama(scan_layers=True, **SIZES[name])
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))["params"]
    assert param_count(shapes) == PUBLISHED_PARAMETERS[name]


def test_rematerialised_scanned_layers_give_the_same_loss_and_gradients():
    kwargs = dict(vocab_size=96, num_layers=2, num_heads=4, num_kv_heads=2, width=32, mlp_dim=64, scan_layers=True)
    params = Llama(**kwargs).init(jax.random.PRNGKey(0), TOKENS)["params"]
    results = {}
    for policy in ("none", "full"):
        model = Llama(remat=policy, **kwargs)
        loss = lambda params, model=model: -jax.nn.log_softmax(model.apply({"params": params}, TOKENS))[..., 3].mean()
        results[policy] = jax.value_and_grad(loss)(params)
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
