"""The decoder families that are Llama settings (Qwen2, Qwen3, Mistral, Gemma 1-3) against `transformers` itself:
small random configs built offline with every parameter perturbed (so norms and biases matter), 40 tokens
against sliding windows of 8. A checkpoint it saves gives its logits here (scanned too, where Gemma 2/3 branch
on the layer kind), ours loads there with no missing or unexpected tensor and gives ours, greedy generation
past the window (our rolling cache) picks the same tokens both ways, and what a family cannot hold is a
one-line ConfigError."""

import functools
import json

import jax
import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import perturbed
from research.errors import ConfigError
from research.inference.generate import Sampling, generate
from research.models import param_count, published
from research.models.llama import ARCHITECTURE, Llama
from research.models.rotary import apply_rotary, rotary_angles
from research.tools.hf import convert as hf

torch.set_num_threads(1)  # at these widths torch's threads only contend with XLA's and the other test workers'

VOCAB, WINDOW, NOISE = 97, 8, 0.1
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 40))  # five windows long
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # greedy runs never stop early
SHAPE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
SHAPE |= dict(max_position_embeddings=64, **NO_SPECIAL)
GEMMA2_CAPS = dict(attn_logit_softcapping=1.0, final_logit_softcapping=3.0)  # small enough to be reached
GEMMA3_ROPE = {
    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
}
REFERENCES = {  # name: (config class, model class, the family's settings)
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(num_hidden_layers=2)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(num_hidden_layers=2, head_dim=24)),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_hidden_layers=2, sliding_window=WINDOW, head_dim=16),
    ),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_hidden_layers=2, head_dim=32)),
    "gemma2": (
        transformers.Gemma2Config,
        transformers.Gemma2ForCausalLM,
        dict(num_hidden_layers=4, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=40, **GEMMA2_CAPS),
    ),
    "gemma3": (  # layers 0-4 local, 5 global: rope_local_base_freq 10k, the global base 1M scaled by 4
        transformers.Gemma3TextConfig,
        transformers.Gemma3ForCausalLM,
        dict(
            num_hidden_layers=6,
            head_dim=32,
            sliding_window=WINDOW,
            query_pre_attn_scalar=40,
            rope_parameters=GEMMA3_ROPE,
        ),
    ),
}
MODEL_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}
MODEL_TYPES |= {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text", "gemma3 one rope": "gemma3_text"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (transformers model, the directory it saved itself to), each built once per module."""
    made = {}

    def checkpoint(name: str):
        if name not in made:
            config_class, model_class, options = REFERENCES[name]
            torch.manual_seed(0)
            reference = perturbed(model_class(config_class(**SHAPE, **json.loads(json.dumps(options)))), NOISE)
            directory = tmp_path_factory.mktemp(name)
            reference.save_pretrained(directory)
            made[name] = reference, directory
        return made[name]

    return checkpoint


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, count: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), max_new_tokens=count, do_sample=False, **NO_SPECIAL)
    return out[:, prompt.shape[1] :].numpy()


def our_logits(model, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(model.apply)({"params": params}, tokens))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])  # scanned Gemma 2/3: lax.switch
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_imported_checkpoint_gives_transformers_logits(checkpoints, name, scan):
    reference, directory = checkpoints(name)
    model, params = hf.from_hf(directory, scan_layers=scan)
    assert param_count(params) == sum(parameter.numel() for parameter in reference.parameters())
    assert np.abs(our_logits(model, params) - torch_logits(reference)).max() <= 1e-4


def test_gemma3_settings_are_read_as_its_layer_pattern(checkpoints):
    """Five local layers per global one, each kind with its rotary base; only the global one scaled."""
    model, _ = hf.from_hf(checkpoints("gemma3")[1])
    assert (model.attention_window, model.global_every, model.query_scale_dim) == (WINDOW, 6, 40)
    assert (model.rope_theta, model.rope_scaling, model.rope_local_theta) == (1e6, (4.0,), 10000.0)
    assert [kind.window for kind in model.layer_kinds()] == [WINDOW] * 5 + [0]
    assert model.qk_norm and model.post_norms and model.scale_embeddings and model.norm_offset == 1.0


def test_gemma3_image_and_text_checkpoint_is_read_as_its_text_decoder(tmp_path):
    """Gemma3ForConditionalGeneration (the published 4B-27B) imports as its text decoder, giving its logits for
    text (its vision tower and projector left out); a text_config silent on most settings, as the published
    ones are, takes Gemma3TextConfig's defaults, as transformers does."""
    text = SHAPE | dict(num_hidden_layers=6, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=40)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision | dict(patch_size=14))
    torch.manual_seed(0)
    reference = perturbed(transformers.Gemma3ForConditionalGeneration(config), NOISE)
    reference.save_pretrained(tmp_path)
    model, params = hf.from_hf(tmp_path)
    assert float(np.abs(our_logits(model, params) - torch_logits(reference)).max()) <= 1e-4
    assert (model.attention_window, model.global_every, model.rope_local_theta) == (WINDOW, 6, 10000.0)
    # The published 4B's text_config, which names only these (Gemma3TextConfig's defaults give the rest): our
    # gemma3-4b, setting for setting.
    text_config = dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34, sliding_window=1024)
    text_config |= dict(rope_scaling={"factor": 8.0, "rope_type": "linear"}, model_type="gemma3_text")
    published_4b = hf.model_from_config(text_config)
    assert {key: getattr(published_4b, key) for key in ARCHITECTURE} == {
        key: value for key, value in published.settings("gemma3-4b").items() if key in ARCHITECTURE
    }


def scores_before_the_cap(model, params, tokens=TOKENS) -> float:
    """The largest |scaled query . key| any layer's allowed positions reach before soft-capping (unrolled model)."""
    _, state = jax.jit(functools.partial(model.apply, capture_intermediates=True))({"params": params}, tokens)
    head_dim, group = model.head_dim, model.num_heads // model.num_kv_heads
    causal = np.tril(np.ones((tokens.shape[1],) * 2, bool))
    largest = 0.0
    for index, kind in enumerate(model.layer_kinds()):
        layer = state["intermediates"][f"layers_{index}"]
        query, key = (layer[name]["__call__"][0] for name in ("q_proj", "k_proj"))
        query = query.reshape(*tokens.shape, model.num_heads, head_dim)
        key = key.reshape(*tokens.shape, model.num_kv_heads, head_dim)
        cos, sin = rotary_angles(np.arange(tokens.shape[1]), head_dim, kind.rope_theta, kind.rope_scaling)
        query, key = np.asarray(apply_rotary(query, cos, sin)), np.asarray(apply_rotary(key, cos, sin))
        scores = np.einsum("blhd,bshd->bhls", query, np.repeat(key, group, axis=2)) / model.query_scale_dim**0.5
        largest = max(largest, float(np.abs(scores[..., causal]).max()))
    return largest


def test_gemma2_soft_caps_are_reached_and_equal_transformers(checkpoints):
    """Caps of 1 (scores) and 3 (logits) that the uncapped model exceeds; capped, ours is still transformers'."""
    reference, directory = checkpoints("gemma2")
    model, params = hf.from_hf(directory)
    assert (model.attention_softcap, model.logit_softcap) == (1.0, 3.0)
    logits = our_logits(model, params)
    assert np.abs(logits - torch_logits(reference)).max() <= 1e-4
    assert np.abs(logits).max() < 3.0
    assert np.abs(our_logits(model.clone(logit_softcap=0.0), params)).max() > 3.5
    assert scores_before_the_cap(model, params) > 2.0
    uncapped_scores = our_logits(model.clone(attention_softcap=0.0), params)
    assert np.abs(uncapped_scores - logits).max() > 0.1  # the attention cap changes the output materially


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_greedy_generation_of_an_imported_model_is_transformers(checkpoints, name):
    """A prompt of 16 and 32 new tokens: 48 positions, six windows of 8 rolling through the sliding layers' cache."""
    reference, directory = checkpoints(name)
    model, params = hf.from_hf(directory)
    prompt = TOKENS[:, :16]
    ours = generate(model, params, prompt, 32, Sampling(temperature=0.0))
    np.testing.assert_array_equal(ours, hf_greedy(reference, prompt, 32))


def ours(name: str) -> Llama:
    """Our model with each family's settings (Gemma 2 scanned: its two kinds of layer branch)."""
    shape = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, width=64, mlp_dim=96, block_size=64)
    gemma = dict(norm_offset=1.0, scale_embeddings=True, activation="gelu_tanh", tie_embeddings=True, head_dim=32)
    later = gemma | dict(post_norms=True, query_scale_dim=40, attention_window=WINDOW)
    settings = {
        "qwen2": dict(attention_bias=True, tie_embeddings=True),
        "qwen3": dict(qk_norm=True, head_dim=24),
        "mistral": dict(attention_window=WINDOW, head_dim=16),
        "gemma": gemma | dict(num_kv_heads=1),
        "gemma2": later
        | dict(num_layers=4, global_every=2, attention_softcap=2.0, logit_softcap=5.0, scan_layers=True),
        "gemma3": later
        | dict(num_layers=6, global_every=6, qk_norm=True, rope_theta=1e6, rope_scaling=(4.0,), rope_local_theta=1e4),
        # one rotary embedding for both kinds: written out per layer type, as Gemma3TextConfig reads it
        "gemma3 one rope": later | dict(num_layers=2, global_every=2, qk_norm=True, rope_theta=50000.0),
    }[name]
    return Llama(**shape | settings)


def random_params(model: Llama, seed: int = 2) -> dict:
    """The init's values (norm scales 1, or 0 where norms multiply by 1 + scale) plus seeded noise on every
    parameter, drawn in numpy: compiling the init costs more than the rest of a test."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), TOKENS[:, :8])["params"]
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            (1.0 - model.norm_offset) * (path[-1].key == "scale") + NOISE * rng.standard_normal(leaf.shape, np.float32)
        ),
        shapes,
    )


def exported(name: str, directory):
    """(our model, its perturbed random parameters, transformers' model loaded from what we wrote)."""
    model = ours(name)
    params = random_params(model)
    hf.to_hf(model, params, directory, MODEL_TYPES[name])
    loader = REFERENCES[name.split()[0]][1]
    reference, info = loader.from_pretrained(directory, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model, params, reference.eval()


@pytest.mark.parametrize("name", [*sorted(REFERENCES), "gemma3 one rope"])
def test_exported_model_loads_in_transformers_with_our_logits(tmp_path, name):
    model, params, reference = exported(name, tmp_path)
    assert np.abs(our_logits(model, params) - torch_logits(reference)).max() <= 1e-4


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_greedy_generation_of_an_exported_model_is_ours(tmp_path, name):
    model, params, reference = exported(name, tmp_path)
    prompt = TOKENS[:, :16]
    np.testing.assert_array_equal(hf_greedy(reference, prompt, 32), generate(model, params, prompt, 32, Sampling(0.0)))


def test_what_a_family_cannot_hold_is_a_one_line_error(checkpoints, tmp_path):
    def refused(match: str, make, *args):
        with pytest.raises(ConfigError, match=match) as error:
            make(*args)
        assert "\n" not in str(error.value)

    qk_norm = Llama(vocab_size=VOCAB, num_layers=1, num_heads=4, num_kv_heads=2, width=64, mlp_dim=96, qk_norm=True)
    refused("^a MistralForCausalLM has no qk_norm=True: export", hf.to_hf, qk_norm, {}, tmp_path, "mistral")
    biased = qk_norm.clone(attention_bias=True)
    refused("^a Qwen2ForCausalLM has no qk_norm=True: export", hf.config_json, biased, "qwen2")
    refused("^a Qwen2ForCausalLM has no attention_bias=False", hf.config_json, qk_norm, "qwen2")
    refused("^a Gemma2ForCausalLM has no qk_norm=True", hf.config_json, ours("gemma3"), "gemma2")
    refused("^a GemmaForCausalLM has no post_norms=True", hf.config_json, ours("gemma2"), "gemma")
    refused("^a Qwen3ForCausalLM has no post_norms=True", hf.config_json, ours("gemma3"), "qwen3")
    assert not (tmp_path / "config.json").exists()

    gemma2 = json.loads((checkpoints("gemma2")[1] / "config.json").read_text())
    types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    refused("^layer_types is not every N-th layer global", hf.model_from_config, gemma2 | {"layer_types": types})
    gemma3 = json.loads((checkpoints("gemma3")[1] / "config.json").read_text())
    dynamic = {"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}
    refused("^rope scaling 'dynamic' is not implemented", hf.model_from_config, gemma3 | {"rope_parameters": dynamic})
    local = GEMMA3_ROPE | {"sliding_attention": GEMMA3_ROPE["full_attention"]}
    refused("^rope scaling on the sliding layers", hf.model_from_config, gemma3 | {"rope_parameters": local})
    refused(
        "^hidden_activation 'silu': a Gemma's MLP is GeGLU",
        hf.model_from_config,
        gemma2 | {"hidden_activation": "silu"},
    )
    # The first Gemma releases' config.json says "gelu" and means the tanh approximation, as transformers reads it.
    legacy = gemma2 | {"model_type": "gemma", "hidden_act": "gelu", "hidden_activation": None}
    assert hf.model_from_config(legacy).activation == "gelu_tanh"
