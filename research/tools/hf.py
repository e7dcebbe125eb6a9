"""Hugging Face checkpoints in and out: `config.json` + safetensors in the layout `transformers` loads.

Llama (LlamaForCausalLM) to research.models.llama.Llama so far: `llama_from_hf(directory)` reads the
config and the weights (one `model.safetensors` or shards with `model.safetensors.index.json`) and
returns the model and its parameters. Hugging Face keeps a linear layer's weight as out x in; a
flax Dense kernel is in x out, so kernels are transposed; everything else is renamed one to one.
A file that does not fit (another architecture, a missing tensor, a wrong shape, a rope scaling
this model does not implement) is a one-line ConfigError that names what is wrong.
"""

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file

from research.config import ConfigError
from research.models.llama import Llama

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: array}) of a Hugging Face model directory."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ConfigError(f"{directory}: no config.json (a Hugging Face model directory has config.json + safetensors)")
    config = json.loads((directory / "config.json").read_text())
    if (directory / INDEX).exists():
        files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    elif (directory / SINGLE).exists():
        files = [SINGLE]
    else:
        raise ConfigError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return config, tensors


def _rope_theta(config: Mapping[str, Any]) -> float:
    """The rotary base of a Llama config (transformers 5's `rope_parameters` or 4's `rope_theta`/`rope_scaling`)."""
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    kind = parameters.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind != "default":
        raise ConfigError(f"rope scaling {kind!r} is not implemented: only the default rotary embedding is")
    return float(parameters.get("rope_theta", config.get("rope_theta", 10000.0)))


def llama_model(config: Mapping[str, Any], **overrides) -> Llama:
    """The Llama module a LlamaForCausalLM config.json describes (`overrides`: scan_layers, dtype, ...)."""
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    if config.get("model_type") != "llama":
        raise ConfigError(f"config.json describes {architectures[0]}, not a LlamaForCausalLM")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"config.json sets {flag}: this Llama has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r}: this Llama's MLP is SwiGLU (silu)")
    width, heads = config["hidden_size"], config["num_attention_heads"]
    return Llama(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        width=width,
        mlp_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or width // heads,
        rope_theta=_rope_theta(config),
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **overrides,
    )


def _expected_shapes(model: Llama) -> dict[str, tuple[int, ...]]:
    """Every tensor a LlamaForCausalLM of this shape has, with its shape (out x in for linear layers)."""
    head_dim = model.head_dim or model.width // model.num_heads
    q, kv = model.num_heads * head_dim, model.num_kv_heads * head_dim
    per_layer = {
        "self_attn.q_proj.weight": (q, model.width),
        "self_attn.k_proj.weight": (kv, model.width),
        "self_attn.v_proj.weight": (kv, model.width),
        "self_attn.o_proj.weight": (model.width, q),
        "mlp.gate_proj.weight": (model.mlp_dim, model.width),
        "mlp.up_proj.weight": (model.mlp_dim, model.width),
        "mlp.down_proj.weight": (model.width, model.mlp_dim),
        "input_layernorm.weight": (model.width,),
        "post_attention_layernorm.weight": (model.width,),
    }
    shapes = {"model.embed_tokens.weight": (model.vocab_size, model.width), "model.norm.weight": (model.width,)}
    for index in range(model.num_layers):
        shapes.update({f"model.layers.{index}.{name}": shape for name, shape in per_layer.items()})
    if not model.tie_embeddings:
        shapes["lm_head.weight"] = (model.vocab_size, model.width)
    return shapes


def llama_params(model: Llama, tensors: Mapping[str, np.ndarray]) -> dict:
    """The Llama's parameter tree from a LlamaForCausalLM state dict (float32 unless the model's param_dtype says)."""
    for name, shape in _expected_shapes(model).items():
        if name not in tensors:
            raise ConfigError(f"the checkpoint has no tensor {name} (a LlamaForCausalLM of this config.json needs it)")
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(f"tensor {name} has shape {tuple(tensors[name].shape)}, config.json implies {shape}")
    dtype = np.dtype(model.param_dtype)
    get = lambda name: np.asarray(tensors[name], dtype=dtype)

    def layer(index: int) -> dict:
        prefix = f"model.layers.{index}."
        params = {name: {"kernel": get(f"{prefix}self_attn.{name}.weight").T} for name in ATTENTION}
        params |= {name: {"kernel": get(f"{prefix}mlp.{name}.weight").T} for name in MLP}
        params |= {name: {"scale": get(f"{prefix}{name}.weight")} for name in NORMS}
        return params

    layers = [layer(index) for index in range(model.num_layers)]
    params = {
        "embed_tokens": {"embedding": get("model.embed_tokens.weight")},
        "norm": {"scale": get("model.norm.weight")},
    }
    if model.scan_layers:  # one subtree, every leaf stacked over the layers
        params["layers"] = {
            module: {leaf: np.stack([layer[module][leaf] for layer in layers]) for leaf in layers[0][module]}
            for module in layers[0]
        }
    else:
        params |= {f"layers_{index}": layer for index, layer in enumerate(layers)}
    if not model.tie_embeddings:
        params["lm_head"] = {"kernel": get("lm_head.weight").T}
    return params


def llama_from_hf(directory: str | Path, **overrides) -> tuple[Llama, dict]:
    """(model, params) of a LlamaForCausalLM saved by `save_pretrained` (or downloaded) into `directory`."""
    config, tensors = read_checkpoint(directory)
    model = llama_model(config, **overrides)
    return model, llama_params(model, tensors)
