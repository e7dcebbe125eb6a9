"""GPT2LMHeadModel as research/models/gpt.py's GPT (with biases; GELU with the tanh approximation).

GPT-2's Conv1D keeps its kernels in x out, as flax does; its c_attn holds the query, key and value
kernels side by side (D x 3D), ours are split into heads (D x H x Dh each).
"""

import jax.numpy as jnp

from research.errors import ConfigError
from research.models.gpt import GPT
from research.tools.hf.layout import Layout, Tensor, layer_norm, reshaped, same, untied_head


def from_config(config: dict, **overrides) -> GPT:
    """The GPT a GPT2LMHeadModel config.json describes (`overrides`: dtype, remat, ...)."""
    width = config["n_embd"]
    if config.get("n_inner") not in (None, 4 * width):
        raise ConfigError(f"n_inner {config['n_inner']}: this GPT's MLP is 4 x n_embd = {4 * width} wide")
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ConfigError(
            f"activation_function {config['activation_function']!r}: this GPT's GELU is tanh-approximated"
        )
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("scale_attn_weights") is False:
        raise ConfigError("config.json changes GPT-2's attention scaling, which this GPT does not implement")
    return GPT(
        vocab_size=config["vocab_size"],
        block_size=config["n_positions"],
        num_layers=config["n_layer"],
        num_heads=config["n_head"],
        width=width,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        **overrides,
    )


def to_config(model: GPT) -> dict:
    """The config.json of the same model as transformers' GPT2LMHeadModel (but its architecture and type)."""
    if not model.use_bias:
        raise ConfigError("a GPT2LMHeadModel has biases: export a GPT trained with model.use_bias=True")
    return {
        "vocab_size": model.vocab_size,
        "n_positions": model.block_size,
        "n_embd": model.width,
        "n_layer": model.num_layers,
        "n_head": model.num_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "tie_word_embeddings": model.tie_embeddings,
        "dtype": jnp.dtype(model.param_dtype).name,
    }


def tensors(model: GPT) -> list[Tensor]:
    """Every GPT2LMHeadModel tensor and the parameters it holds."""
    found = [
        same("transformer.wte.weight", "token_embedding/embedding"),
        same("transformer.wpe.weight", "position_embedding/embedding"),
        *layer_norm("transformer.ln_f", "final_norm"),
    ]
    for index in range(model.num_layers):
        found += _block(model, f"transformer.h.{index}.", f"block_{index}/")
    return found + untied_head(model.tie_embeddings, "lm_head.weight", "head/kernel")


def _block(model: GPT, hf: str, ours: str) -> list[Tensor]:
    width = model.width
    head_shape = (model.num_heads, width // model.num_heads)
    qkv = tuple(f"{ours}attention/{name}" for name in ("query", "key", "value"))
    found = [
        Tensor(  # D x 3D (Conv1D: in x out) <-> three D x H x Dh
            f"{hf}attn.c_attn.weight",
            tuple(f"{path}/kernel" for path in qkv),
            lambda array: tuple(part.reshape(width, *head_shape) for part in jnp.split(array, 3, axis=1)),
            lambda *kernels: jnp.concatenate([kernel.reshape(width, width) for kernel in kernels], axis=1),
        ),
        Tensor(
            f"{hf}attn.c_attn.bias",
            tuple(f"{path}/bias" for path in qkv),
            lambda array: tuple(part.reshape(head_shape) for part in jnp.split(array, 3)),
            lambda *biases: jnp.concatenate([bias.reshape(width) for bias in biases]),
        ),
        reshaped(f"{hf}attn.c_proj.weight", f"{ours}attention/out/kernel", (*head_shape, width), (width, width)),
        same(f"{hf}attn.c_proj.bias", f"{ours}attention/out/bias"),
    ]
    for hf_name, our_name in (("c_fc", "fc_in"), ("c_proj", "fc_out")):  # Conv1D: in x out, as ours
        found += [same(f"{hf}mlp.{hf_name}.weight", f"{ours}mlp/{our_name}/kernel")]
        found += [same(f"{hf}mlp.{hf_name}.bias", f"{ours}mlp/{our_name}/bias")]
    return found + layer_norm(f"{hf}ln_1", f"{ours}attention_norm") + layer_norm(f"{hf}ln_2", f"{ours}mlp_norm")


LAYOUT = Layout("gpt2", "GPT2LMHeadModel", from_config, to_config, tensors, run_family="gpt")
