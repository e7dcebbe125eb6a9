"""Mixtral and Qwen3-MoE (research/tools/hf/moe.py) against `transformers` itself: small random configs built
offline, 8 experts and every parameter perturbed, so that each layer routes its 80 tokens to every expert. A
checkpoint save_pretrained writes (each expert's tensors apart) gives its logits here, unrolled and scanned, and its
routers' top-k choices; ours loads there with no missing or unexpected tensor and gives ours; greedy generation
(our cached decoder, Mixtral's sliding window rolling through it) picks the same tokens; `import` makes a run whose
load-balancing weight is the checkpoint's router_aux_loss_coef; what our decoder does not compute is a one-line
ConfigError."""

import functools
import json

import jax
import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import perturbed, python
from research.errors import ConfigError
from research.inference.generate import Sampling, generate
from research.models import param_count, published
from research.models.llama import ARCHITECTURE, Llama
from research.tools.hf import convert as hf

torch.set_num_threads(1)  # at these widths torch's threads only contend with XLA's and the other test workers'

VOCAB, WINDOW, NOISE, EXPERTS = 97, 8, 0.1, 8
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 40))
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # greedy runs never stop early
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SHAPE |= dict(max_position_embeddings=64, **NO_SPECIAL)
REFERENCES = {  # model_type: (config class, model class, the family's settings)
    "mixtral": (  # top-2, renormalised; every layer slides over 8 positions, as Mistral's
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        dict(intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=WINDOW)
        | dict(router_aux_loss_coef=0.02),
    ),
    "qwen3_moe": (  # top-3, not renormalised; intermediate_size is the dense MLP's, which no layer has
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        dict(intermediate_size=96, moe_intermediate_size=32, num_experts=EXPERTS, num_experts_per_tok=3)
        | dict(head_dim=24, norm_topk_prob=False),
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """model_type -> (transformers model, the directory it saved itself to), each built once per module."""
    made = {}

    def checkpoint(name: str):
        if name not in made:
            config_class, model_class, options = REFERENCES[name]
            torch.manual_seed(0)
            reference = perturbed(model_class(config_class(**SHAPE, **options)), NOISE)
            directory = tmp_path_factory.mktemp(name)
            reference.save_pretrained(directory)
            made[name] = reference, directory
        return made[name]

    return checkpoint


def hf_greedy(model, prompt: np.ndarray, count: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), max_new_tokens=count, do_sample=False, **NO_SPECIAL)
    return out[:, prompt.shape[1] :].numpy()


def our_logits(model, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, tokens))


def is_router(module, method: str) -> bool:
    """The router: the Dense "gate" inside an MoE "mlp" (not a dense MLP's gate_proj)."""
    return method == "__call__" and module.name == "gate" and getattr(module.parent, "name", None) == "mlp"


def top_k(logits_TxE: np.ndarray, k: int) -> np.ndarray:
    """Each token's k most probable experts, most probable first (the routers' softmax keeps the order)."""
    return np.argsort(-logits_TxE, axis=-1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def imported(checkpoints):
    """model_type -> the unrolled import and both sides' logits and router logits (T x E per layer), compiled once."""
    made = {}

    def outputs(name: str) -> dict:
        if name not in made:
            reference, directory = checkpoints(name)
            model, params = hf.from_hf(directory)
            apply = jax.jit(lambda params: model.apply({"params": params}, TOKENS, capture_intermediates=is_router))
            logits, state = apply(params)
            layers = [state["intermediates"][f"layers_{index}"] for index in range(model.num_layers)]
            routers = [layer["mlp"]["gate"]["__call__"][0] for layer in layers]
            with torch.no_grad():
                theirs = reference(torch.tensor(TOKENS), output_router_logits=True)
            made[name] = dict(model=model, params=params, logits=np.asarray(logits), their_logits=theirs.logits.numpy())
            made[name] |= dict(routers=[np.asarray(each).reshape(-1, EXPERTS) for each in routers])
            made[name] |= dict(their_routers=[each.numpy() for each in theirs.router_logits])
        return made[name]

    return outputs


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_imported_checkpoint_gives_transformers_logits(checkpoints, imported, name):
    reference, directory = checkpoints(name)
    assert (directory / "model.safetensors").exists()  # save_pretrained's layout: each expert's tensors apart
    model, params = imported(name)["model"], imported(name)["params"]
    assert (model.num_experts, model.experts_per_token) == (EXPERTS, reference.config.num_experts_per_tok)
    assert model.normalize_top_k == (name == "mixtral")
    assert model.moe_aux_weight == reference.config.router_aux_loss_coef
    assert param_count(params) == sum(parameter.numel() for parameter in reference.parameters())
    assert np.abs(imported(name)["logits"] - imported(name)["their_logits"]).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_scanned_import_gives_transformers_logits(checkpoints, imported, name):
    model, params = hf.from_hf(checkpoints(name)[1], scan_layers=True)
    stacked = (model.num_layers, EXPERTS, model.width, model.mlp_dim)  # layers x E x D x F
    assert params["layers"]["mlp"]["gate_proj"].shape == stacked
    assert np.abs(our_logits(model, params) - imported(name)["their_logits"]).max() <= 1e-4


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_imported_routers_choose_transformers_experts(imported, name):
    """Every layer's router logits, and each token's top-k experts in order, are transformers'; every expert gets
    some of the 80 tokens (the routing is not trivial)."""
    outputs = imported(name)
    chosen = outputs["model"].experts_per_token
    assert len(outputs["routers"]) == len(outputs["their_routers"]) == SHAPE["num_hidden_layers"]
    for ours, theirs in zip(outputs["routers"], outputs["their_routers"]):
        assert np.abs(ours - theirs).max() <= 1e-5
        np.testing.assert_array_equal(top_k(ours, chosen), top_k(theirs, chosen))
        assert set(top_k(ours, chosen).reshape(-1)) == set(range(EXPERTS))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_greedy_generation_of_an_imported_model_is_transformers(checkpoints, imported, name):
    """A prompt of 16 and 32 new tokens: Mixtral's window of 8 rolls six times through our cache."""
    reference = checkpoints(name)[0]
    model, params = imported(name)["model"], imported(name)["params"]
    prompt = TOKENS[:, :16]
    ours = generate(model, params, prompt, 32, Sampling(temperature=0.0))
    np.testing.assert_array_equal(ours, hf_greedy(reference, prompt, 32))


def ours(name: str) -> Llama:
    """Our model of each family's settings (Mixtral's scanned): 8 experts of 48 and of 32 units."""
    shape = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, width=64, block_size=64)
    settings = {
        "mixtral": dict(mlp_dim=48, head_dim=16, attention_window=WINDOW, rope_theta=1e6, scan_layers=True),
        "qwen3_moe": dict(mlp_dim=32, head_dim=24, qk_norm=True, experts_per_token=4, tie_embeddings=True),
    }[name]
    return Llama(**shape | dict(num_experts=EXPERTS, moe_aux_weight=0.005) | settings)


def random_params(model: Llama, seed: int = 2) -> dict:
    """Norm scales 1 and everything else 0, plus seeded noise on every parameter (drawn in numpy)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS[:, :8])["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (path[-1].key == "scale") + NOISE * rng.standard_normal(leaf.shape, np.float32), shapes
    )


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_exported_model_loads_in_transformers_with_our_logits(tmp_path, name):
    model = ours(name)
    params = random_params(model)
    shard = 200_000 if name == "mixtral" else 10**9  # Mixtral's experts written over four files and their index
    hf.to_hf(model, params, tmp_path, name, max_shard_bytes=shard)
    assert (tmp_path / ("model.safetensors.index.json" if name == "mixtral" else "model.safetensors")).exists()
    reference, info = REFERENCES[name][1].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = reference.config
    assert (config.num_experts, config.num_experts_per_tok) == (EXPERTS, model.experts_per_token)
    assert config.router_aux_loss_coef == model.moe_aux_weight
    with torch.no_grad():
        theirs = reference.eval()(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(our_logits(model, params) - theirs).max() <= 1e-4
    again, _ = hf.from_hf(tmp_path, scan_layers=model.scan_layers)
    assert again == model  # every field back, the experts' included


# The released config.json files (mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B), but their token ids and dtype
RELEASED = {
    "mixtral-8x7b": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32)
    | dict(num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5)
    | dict(rope_theta=1e6, sliding_window=None, tie_word_embeddings=False, vocab_size=32000, hidden_act="silu")
    | dict(num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.02, router_jitter_noise=0.0),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48)
    | dict(num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960)
    | dict(rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling=None, sliding_window=None, use_sliding_window=False)
    | dict(max_window_layers=48, attention_bias=False, tie_word_embeddings=False, vocab_size=151936)
    | dict(hidden_act="silu", decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=768)
    | dict(norm_topk_prob=True, num_experts=128, num_experts_per_tok=8, router_aux_loss_coef=0.001),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_configs_are_our_published_sizes(name):
    """Each released config.json read as our named size, setting for setting, its load-balancing weight included
    (a head width of 0 is width / heads, which the import writes out)."""
    model = hf.model_from_config(RELEASED[name])
    fields = (*ARCHITECTURE, "moe_aux_weight")
    expected = published.settings(name)
    expected["head_dim"] = expected["head_dim"] or expected["width"] // expected["num_heads"]
    assert {key: getattr(model, key) for key in fields} == {key: expected[key] for key in fields}


def refused(match: str, make, *args) -> None:
    with pytest.raises(ConfigError, match=match) as error:
        make(*args)
    assert "\n" not in str(error.value)


def test_what_the_mixtures_cannot_hold_is_a_one_line_error(checkpoints, tmp_path):
    qwen3_moe = json.loads((checkpoints("qwen3_moe")[1] / "config.json").read_text())
    refused("^config.json sets decoder_sparse_step 2: ", hf.model_from_config, qwen3_moe | {"decoder_sparse_step": 2})
    refused(r"^config.json sets mlp_only_layers \[0\]: ", hf.model_from_config, qwen3_moe | {"mlp_only_layers": [0]})
    refused("^config.json has no experts", hf.model_from_config, qwen3_moe | {"num_local_experts": 0})

    mixtral = ours("mixtral")
    as_mixtral = functools.partial(hf.config_json, model_type="mixtral")
    refused("^a MistralForCausalLM has no num_experts=8: export", hf.config_json, mixtral, "mistral")
    refused("^a MixtralForCausalLM has no num_experts=0: export", as_mixtral, mixtral.clone(num_experts=0))
    refused("^a MixtralForCausalLM has no normalize_top_k=False", as_mixtral, mixtral.clone(normalize_top_k=False))
    refused("^a MixtralForCausalLM has no qk_norm=True", as_mixtral, ours("qwen3_moe"))
    shared = ours("qwen3_moe").clone(shared_mlp_dim=16)
    refused("^a Qwen3MoeForCausalLM has no shared_mlp_dim=16", hf.to_hf, shared, {}, tmp_path, "qwen3_moe")
    assert not (tmp_path / "config.json").exists()

    config, tensors = hf.read_checkpoint(checkpoints("mixtral")[1])
    gone = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    missing = {name: array for name, array in tensors.items() if name != gone}
    refused(
        r"^the checkpoint has no tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w3\.weight",
        hf.params_from_tensors,
        hf.model_from_config(config),
        missing,
        hf.LAYOUTS["mixtral"],
    )


@pytest.mark.slow
def test_import_makes_a_run_with_the_checkpoints_balancing_weight_and_export_hands_it_back(checkpoints, tmp_path):
    """The CLI: `import` writes a scanned mixtral run whose model.moe_aux_weight is router_aux_loss_coef (0.02);
    `export` writes it back as a checkpoint transformers loads with the same logits and coefficient."""
    reference, directory = checkpoints("mixtral")
    run, back = tmp_path / "run", tmp_path / "back"
    result = python("-m", "research.tools.hf", "import", str(directory), str(run), "--scan_layers")
    assert result.returncode == 0, result.stderr
    settings = json.loads((run / "config.json").read_text())["config"]["model"]
    expected = dict(family="mixtral", num_experts=EXPERTS, moe_aux_weight=0.02, scan_layers=True)
    assert {key: settings[key] for key in expected} == expected
    result = python("-m", "research.tools.hf", "export", str(run), str(back))
    assert result.returncode == 0, result.stderr
    exported = transformers.MixtralForCausalLM.from_pretrained(back).eval()
    assert exported.config.router_aux_loss_coef == 0.02
    with torch.no_grad():
        logits = [model(torch.tensor(TOKENS)).logits.numpy() for model in (exported, reference)]
    assert np.abs(logits[0] - logits[1]).max() <= 1e-6
