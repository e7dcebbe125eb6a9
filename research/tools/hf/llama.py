"""LlamaForCausalLM as research/models/llama.py's Llama.

Our parameter names are the checkpoint's one to one; torch Linear weights are transposed. config.json's
rope scaling "llama3" (Llama 3.1's context extension) is Llama.rope_scaling's four numbers; other rope
scalings (YaRN, dynamic NTK) and biases are refused.
"""

import jax.numpy as jnp

from research.errors import ConfigError
from research.models.llama import Llama
from research.tools.hf.layout import Layout, Tensor, linear, same, untied_head

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
# config.json's names of Llama.rope_scaling's four numbers (rope_type "llama3")
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def from_config(config: dict, **overrides) -> Llama:
    """The Llama a LlamaForCausalLM config.json describes (`overrides`: scan_layers, dtype, ...)."""
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ConfigError(f"config.json sets {flag}: this Llama has no biases")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act {config['hidden_act']!r}: this Llama's MLP is SwiGLU (silu)")
    rope = (config.get("rope_parameters") or config.get("rope_scaling") or {}) | {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ConfigError(
            f"rope scaling {kind!r} is not implemented: only the default and llama3 rotary embeddings are"
        )
    scaling = tuple(float(rope[name]) for name in LLAMA3_SCALING) if kind == "llama3" else ()
    width, heads = config["hidden_size"], config["num_attention_heads"]
    theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    return Llama(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        width=width,
        mlp_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or width // heads,
        block_size=config.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        **overrides,
    )


def to_config(model: Llama) -> dict:
    """The config.json of the same model as transformers' LlamaForCausalLM (but its architecture and type)."""
    return {
        "vocab_size": model.vocab_size,
        "hidden_size": model.width,
        "intermediate_size": model.mlp_dim,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": model.num_heads,
        "num_key_value_heads": model.num_kv_heads,
        "head_dim": model.head_dim or model.width // model.num_heads,
        "max_position_embeddings": model.block_size,
        "rms_norm_eps": model.norm_epsilon,
        "rope_theta": model.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": model.rope_theta} | _scaling_parameters(model),
        "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "dtype": jnp.dtype(model.param_dtype).name,
    }


def _scaling_parameters(model: Llama) -> dict:
    if not model.rope_scaling:
        return {}
    *factors, context = model.rope_scaling
    return {"rope_type": "llama3"} | dict(zip(LLAMA3_SCALING, (*factors, int(context))))


def tensors(model: Llama) -> list[Tensor]:
    """Every LlamaForCausalLM tensor and the parameter it holds."""
    found = [same("model.embed_tokens.weight", "embed_tokens/embedding"), same("model.norm.weight", "norm/scale")]
    for index in range(model.num_layers):
        hf, ours = f"model.layers.{index}.", f"layers_{index}/"
        found += [linear(f"{hf}self_attn.{name}.weight", f"{ours}{name}/kernel") for name in ATTENTION]
        found += [linear(f"{hf}mlp.{name}.weight", f"{ours}{name}/kernel") for name in MLP]
        found += [same(f"{hf}{name}.weight", f"{ours}{name}/scale") for name in NORMS]
    return found + untied_head(model.tie_embeddings, "lm_head.weight", "lm_head/kernel")


LAYOUT = Layout("llama", "LlamaForCausalLM", from_config, to_config, tensors, run_family="llama")
