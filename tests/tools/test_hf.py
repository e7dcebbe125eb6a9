"""Hugging Face exchange against `transformers` itself (random weights, small configs, no download): a
checkpoint it saves gives its logits here, ours loads there with no missing or unexpected tensor and
gives ours, and greedy generation picks the same tokens both ways."""

import json

import jax
import numpy as np
import pytest
import torch  # the reference implementation (the test extra)
import transformers

from conftest import load_experiment, python
from research.errors import ConfigError
from research.inference.generate import Sampling, generate
from research.models import param_count
from research.models.bert import BertEncoder, BertForMaskedLM
from research.models.gpt import GPT
from research.models.llama import Llama
from research.tools.hf import convert as hf

torch.set_num_threads(1)  # the reference's threads would contend with JAX's for this machine's cores
VOCAB = 96
TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=(2, 24))
NO_SPECIAL = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)  # greedy runs never stop early


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
LLAMA3_SCALING |= {"original_max_position_embeddings": 16, "rope_theta": 500000.0}  # 24 tokens pass the 16


def hf_llama(tie: bool, kv_heads: int, vocab: int = VOCAB, **options):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rope_theta=500000.0,
        tie_word_embeddings=tie,
        **NO_SPECIAL,
        **options,
    )
    return transformers.LlamaForCausalLM(config)


def hf_gpt2(tie: bool = True):
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, tie_word_embeddings=tie, **NO_SPECIAL
    )
    return transformers.GPT2LMHeadModel(config)


def hf_bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    return transformers.BertForMaskedLM(config)


REFERENCES = {
    "llama gqa untied": lambda: hf_llama(False, 2),
    "llama gqa tied": lambda: hf_llama(True, 2),
    "llama mqa tied": lambda: hf_llama(True, 1),
    "llama mha untied": lambda: hf_llama(False, 4),
    "llama3 rope scaling": lambda: hf_llama(False, 2, rope_parameters=dict(LLAMA3_SCALING)),
    "llama 320": lambda: hf_llama(False, 2, vocab=320),  # room for a byte-level BPE's 256 bytes and some merges
    "gpt2": hf_gpt2,
    "gpt2 untied": lambda: hf_gpt2(False),
    "bert": hf_bert,
}


def saved(name: str, directory):
    torch.manual_seed(0)
    reference = REFERENCES[name]().eval()
    reference.save_pretrained(directory)
    return reference


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("name", sorted(set(REFERENCES) - {"llama 320"}))
def test_imported_checkpoint_gives_transformers_logits(tmp_path, name):
    reference = saved(name, tmp_path)
    scan = name == "llama gqa tied"  # one Llama with its layers stacked under nn.scan
    model, params = hf.from_hf(tmp_path, **({"scan_layers": True} if scan else {}))
    assert param_count(params) == sum(parameter.numel() for parameter in reference.parameters())
    logits = jax.jit(model.apply)({"params": params}, TOKENS)
    assert np.abs(np.asarray(logits) - torch_logits(reference)).max() <= 1e-4


OURS = {
    "llama": lambda: Llama(
        vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, width=64, mlp_dim=96, block_size=64
    ),
    "llama tied scanned": lambda: Llama(
        vocab_size=VOCAB,
        num_layers=3,
        num_heads=4,
        num_kv_heads=1,
        width=32,
        mlp_dim=64,
        block_size=64,
        tie_embeddings=True,
        scan_layers=True,
        rope_theta=500000.0,
        rope_scaling=(8.0, 1.0, 4.0, 16.0),
    ),
    "gpt": lambda: GPT(vocab_size=VOCAB, block_size=64, num_layers=2, num_heads=4, width=32),
    "bert": lambda: BertForMaskedLM(
        BertEncoder(vocab_size=VOCAB, max_length=64, num_layers=2, num_heads=4, width=32, approximate_gelu=False)
    ),
}
LOADERS = {
    "llama": transformers.LlamaForCausalLM,
    "gpt": transformers.GPT2LMHeadModel,
    "bert": transformers.BertForMaskedLM,
}
MODEL_TYPES = {"llama": "llama", "gpt": "gpt2", "bert": "bert"}  # the layout each of OURS is written in


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.slow) if name == "bert" else name for name in sorted(OURS)]
)
def test_exported_model_loads_in_transformers_with_our_logits(tmp_path, name):
    """Ours at random init, written as shards of at most 20 KB (an index and many files) for the Llamas."""
    model = OURS[name]()
    params = model.init(jax.random.PRNGKey(1), TOKENS)["params"]
    params = jax.tree.map(lambda leaf: leaf + 0.02 * jax.random.normal(jax.random.PRNGKey(2), leaf.shape), params)
    shard_bytes = 20_000 if "llama" in name else 10**9
    hf.to_hf(model, params, tmp_path, MODEL_TYPES[name.split()[0]], max_shard_bytes=shard_bytes)
    assert (tmp_path / hf.INDEX).exists() == ("llama" in name)
    reference, info = LOADERS[name.split()[0]].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    logits = model.apply({"params": params}, TOKENS)
    assert np.abs(np.asarray(logits) - torch_logits(reference.eval())).max() <= 1e-4


def hf_greedy(model, prompt: np.ndarray, count: int) -> np.ndarray:
    with torch.no_grad():
        out = model.generate(torch.tensor(prompt), max_new_tokens=count, do_sample=False, **NO_SPECIAL)
    return out[:, prompt.shape[1] :].numpy()


@pytest.mark.parametrize("name", ["llama gqa untied", "gpt2"])
def test_greedy_generation_of_an_imported_model_is_transformers(tmp_path, name):
    reference = saved(name, tmp_path)
    model, params = hf.from_hf(tmp_path)
    prompt = TOKENS[:, :8]
    ours = generate(model, params, prompt, 32, Sampling(temperature=0.0))
    np.testing.assert_array_equal(ours, hf_greedy(reference, prompt, 32))


@pytest.mark.parametrize("name", ["llama", "gpt"])
def test_greedy_generation_of_an_exported_model_is_ours(tmp_path, name):
    model = OURS[name]()
    params = model.init(jax.random.PRNGKey(3), TOKENS)["params"]
    params = jax.tree.map(lambda leaf: leaf * 4, params)  # sharper distributions than the init's
    hf.to_hf(model, params, tmp_path, MODEL_TYPES[name])
    reference = LOADERS[name].from_pretrained(tmp_path).eval()
    prompt = TOKENS[:, :8]
    ours = generate(model, params, prompt, 32, Sampling(temperature=0.0))
    np.testing.assert_array_equal(hf_greedy(reference, prompt, 32), ours)


def test_a_checkpoint_that_does_not_fit_is_a_one_line_error(tmp_path):
    saved("llama gqa untied", tmp_path)
    config, tensors = hf.read_checkpoint(tmp_path)
    model = hf.model_from_config(config)
    missing = {name: value for name, value in tensors.items() if name != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConfigError, match=r"^the checkpoint has no tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.params_from_tensors(model, missing, hf.LAYOUTS["llama"])
    wrong = tensors | {"model.norm.weight": np.ones(63, np.float32)}
    with pytest.raises(
        ConfigError, match=r"^tensor model\.norm\.weight has shape \(63,\), config.json implies \(64,\)"
    ):
        hf.params_from_tensors(model, wrong, hf.LAYOUTS["llama"])
    scaled = config | {"rope_parameters": {"rope_type": "yarn", "factor": 8.0, "rope_theta": 500000.0}}
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not implemented"):
        hf.model_from_config(scaled)
    supported = "bert, gemma, gemma2, gemma3_text, gpt2, llama, mistral, mixtral, qwen2, qwen3, qwen3_moe"
    with pytest.raises(ConfigError, match=f"^config.json describes Phi3ForCausalLM: only {supported} models are"):
        hf.model_from_config({"model_type": "phi3", "architectures": ["Phi3ForCausalLM"]})
    with pytest.raises(ConfigError, match="^config.json has no 'hidden_size' \\(a MistralForCausalLM's needs it\\)$"):
        hf.model_from_config({"model_type": "mistral", "architectures": ["MistralForCausalLM"]})
    gpt_config = json.loads(json.dumps(hf_gpt2().config.to_dict())) | {"activation_function": "relu"}
    with pytest.raises(ConfigError, match="activation_function 'relu'"):
        hf.model_from_config(gpt_config)
    with pytest.raises(ConfigError, match=f"no Hugging Face layout 'phi3': the layouts are {supported}$"):
        hf.to_hf(OURS["llama"](), {}, tmp_path / "out", "phi3")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no model.safetensors or model.safetensors.index.json"):
        hf.read_checkpoint(tmp_path)


def test_a_run_exports_in_the_layout_it_was_imported_from():
    """Each layout is registered under its model_type, and an lm run of the family `import` makes of a layout
    names that layout back through its hf_layout hook (the two mappings cannot drift apart)."""
    lm = load_experiment("lm")
    config = lm.get_config("smoke")
    for model_type, layout in hf.LAYOUTS.items():
        assert layout.model_type == model_type
        if layout.run_family:
            config.model.family = layout.run_family
            assert lm.hf_layout(config) == model_type
    families = sorted(layout.run_family for layout in hf.LAYOUTS.values() if layout.run_family)
    assert families == [
        "gemma",
        "gemma2",
        "gemma3",
        "gpt",
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "qwen3_moe",
    ]


@pytest.mark.slow
def test_imported_checkpoint_generates_and_fine_tunes(tmp_path, data_dir):
    """The CLI's import gives a run that predict.py generates from (the checkpoint's own tokenizer.json,
    a byte-level BPE trained here) and that `lm.py:from=RUN` fine-tunes; export hands it back."""
    from research.data import text

    reference = saved("llama 320", tmp_path / "hf")
    tokenizer = text.ByteLevelTokenizer.train(text.split_text("tiny_shakespeare", "train", data_dir), 320)
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    imported = tmp_path / "imported"
    result = python("-m", "research.tools.hf", "import", str(tmp_path / "hf"), str(imported), "--scan_layers")
    assert result.returncode == 0, result.stderr
    prompt = "ROMEO:"
    result = python(
        "predict.py", "--workdir", str(imported), "--generate", prompt, "--num_tokens", "32", "--temperature", "0"
    )
    assert result.returncode == 0, result.stderr
    ids = tokenizer.encode(prompt)
    expected = tokenizer.decode(hf_greedy(reference, ids[None], 32)[0]).replace("\r", "\n")  # as text mode reads it
    assert expected in result.stdout, (expected, result.stdout)

    tuned = tmp_path / "tuned"
    arguments = ["--config", f"experiments/lm.py:from={imported}", "--workdir", str(tuned)]
    arguments += [f"--config.data_dir={data_dir}", "--config.num_steps=5", "--config.model.block_size=32"]
    result = python("launch.py", *arguments)
    assert result.returncode == 0, result.stderr
    assert "init_from" in result.stdout and "left at random init: none" in result.stdout, result.stdout

    exported = tmp_path / "exported"
    result = python("-m", "research.tools.hf", "export", str(imported), str(exported))
    assert result.returncode == 0, result.stderr
    back = transformers.LlamaForCausalLM.from_pretrained(exported).eval()
    assert np.abs(torch_logits(back) - torch_logits(reference)).max() <= 1e-5
    assert (exported / "tokenizer.json").exists()
