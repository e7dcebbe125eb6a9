"""LlamaForCausalLM as research/models/llama.py's Llama, and what every decoder of that family shares.

Our parameter names are the checkpoint's one to one (q/k/v biases, QK-norms and Gemma's four norms
included); torch Linear weights are transposed. `decoder_fields` reads what the families' config.json files
share: shapes, norms, the rotary embedding (rope_parameters, or the older rope_theta / rope_scaling /
rope_local_base_freq) and which layers slide (layer_types, or the older sliding_window_pattern). rope
scaling "llama3" (Llama 3.1's context extension) and "linear" (Gemma 3) are implemented; others (YaRN,
dynamic NTK) are refused, as is a pattern of sliding layers that is not periodic.
"""

from typing import Callable

import jax.numpy as jnp

from research.errors import ConfigError
from research.models.llama import Llama
from research.tools.hf.layout import Layout, Tensor, linear, same, untied_head

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# config.json's names of Llama.rope_scaling's four numbers (rope_type "llama3")
LLAMA3_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


def _rope(parameters: dict, theta: float) -> tuple[float, tuple]:
    """(rotary base, Llama.rope_scaling) of one rope_parameters entry."""
    kind = parameters.get("rope_type", parameters.get("type", "default"))
    theta = float(parameters.get("rope_theta", theta))
    if kind == "default":
        return theta, ()
    if kind == "linear":
        return theta, (float(parameters["factor"]),)
    if kind == "llama3":
        return theta, tuple(float(parameters[name]) for name in LLAMA3_SCALING)
    raise ConfigError(f"rope scaling {kind!r} is not implemented: only the default, linear and llama3 ones are")


def _layer_types(config: dict) -> list[str]:
    """Which layers slide, from layer_types or the older fields (Mistral: every layer with a sliding_window;
    Gemma 2: the even ones; Gemma 3: all but every sliding_window_pattern-th)."""
    layers, window = config["num_hidden_layers"], config.get("sliding_window")
    if config.get("layer_types"):
        return list(config["layer_types"])
    if not window or config.get("use_sliding_window") is False:
        return [FULL] * layers
    pattern = {"gemma2": 2, "gemma3_text": config.get("sliding_window_pattern", 6)}.get(config.get("model_type"), 0)
    return [FULL if pattern and (index + 1) % pattern == 0 else SLIDING for index in range(layers)]


def _window_pattern(config: dict) -> tuple[int, int]:
    """(attention_window, global_every) of the layers' types: every N-th layer global, the rest sliding."""
    types = _layer_types(config)
    if SLIDING not in types:
        return 0, 0
    global_at = [index for index, kind in enumerate(types) if kind == FULL]
    every = global_at[0] + 1 if global_at else 0
    if [(index + 1) % every == 0 if every else False for index in range(len(types))] != [
        kind == FULL for kind in types
    ]:
        raise ConfigError("layer_types is not every N-th layer global and the rest sliding: no Llama setting says it")
    return int(config["sliding_window"]), every


def decoder_fields(config: dict, activation_key: str = "hidden_act") -> dict:
    """The Llama fields that config.json's shared keys give (the families add theirs)."""
    width, heads = config["hidden_size"], config["num_attention_heads"]
    act = config.get(activation_key) or config.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise ConfigError(f"{activation_key} {act!r}: the gated MLP takes {', '.join(ACTIVATIONS)}")
    if config.get("mlp_bias"):
        raise ConfigError("config.json sets mlp_bias: this decoder's MLP has no biases")
    window, every = _window_pattern(config)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = float(config.get("rope_theta", 10000.0))
    local_theta = 0.0
    if FULL in rope or SLIDING in rope:  # one rotary embedding per layer type (Gemma 3)
        theta, scaling = _rope(rope[FULL], theta)
        local_theta, local_scaling = _rope(rope.get(SLIDING, {}), theta)
        if local_scaling:
            raise ConfigError("rope scaling on the sliding layers is not implemented (Gemma 3 scales its global ones)")
    else:
        theta, scaling = _rope(rope, theta)
        local_theta = float(config.get("rope_local_base_freq") or 0.0)
    return dict(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        width=width,
        mlp_dim=config["intermediate_size"],
        head_dim=config.get("head_dim") or width // heads,
        block_size=config.get("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta if window and every else 0.0,
        norm_epsilon=config.get("rms_norm_eps", 1e-6),
        attention_window=window,
        global_every=every,
        activation=ACTIVATIONS[act],
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def rope_parameters(model: Llama) -> dict:
    """rope_parameters as transformers 5 writes it: one dict, or one per layer type where they differ."""
    global_rope = {"rope_type": "default", "rope_theta": model.rope_theta}
    if len(model.rope_scaling) == 1:
        global_rope |= {"rope_type": "linear", "factor": model.rope_scaling[0]}
    elif model.rope_scaling:
        *factors, context = model.rope_scaling
        global_rope |= {"rope_type": "llama3"} | dict(zip(LLAMA3_SCALING, (*factors, int(context))))
    if not (model.attention_window and model.global_every and model.rope_local_theta):
        return global_rope
    return {FULL: global_rope, SLIDING: {"rope_type": "default", "rope_theta": model.rope_local_theta}}


def decoder_config(model: Llama, activation_key: str = "hidden_act") -> dict:
    """The config.json keys every family shares, of this model."""
    kinds = model.layer_kinds()
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
        "rope_theta": model.rope_theta,  # as transformers 4 reads it; 5 reads rope_parameters
        "rope_parameters": rope_parameters(model),
        "sliding_window": model.attention_window or None,
        "layer_types": [SLIDING if kind.window else FULL for kind in kinds],
        "tie_word_embeddings": model.tie_embeddings,
        activation_key: {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[model.activation],
        "dtype": jnp.dtype(model.param_dtype).name,
    }


def refuse(model: Llama, architecture: str, **allowed) -> None:
    """A ConfigError naming the first setting of `model` that `architecture` cannot hold (`allowed`: the values
    it takes, a tuple of them per field)."""
    defaults = Llama(vocab_size=1, num_layers=1, num_heads=1, num_kv_heads=1, width=1, mlp_dim=1)
    fixed = ("attention_bias", "qk_norm", "post_norms", "norm_offset", "scale_embeddings", "activation")
    fixed += ("query_scale_dim", "attention_softcap", "logit_softcap", "attention_window", "global_every")
    fixed += ("num_experts", "shared_mlp_dim")
    for field in (*fixed, "rope_local_theta"):
        value = getattr(model, field)
        takes = allowed.get(field, (getattr(defaults, field),))
        if takes != "any" and value not in takes:
            raise ConfigError(f"a {architecture} has no {field}={value!r}: export this model as another family")


def from_config(config: dict, **overrides) -> Llama:
    """The Llama a LlamaForCausalLM config.json describes (`overrides`: scan_layers, dtype, ...)."""
    if config.get("attention_bias"):
        raise ConfigError("config.json sets attention_bias: LlamaForCausalLM's biases are not read (Qwen2 has them)")
    return Llama(**decoder_fields(config) | overrides)


def to_config(model: Llama) -> dict:
    """The config.json of the same model as transformers' LlamaForCausalLM (but its architecture and type)."""
    refuse(model, "LlamaForCausalLM")
    settings = {
        key: value for key, value in decoder_config(model).items() if key not in ("layer_types", "sliding_window")
    }
    return settings | {"attention_bias": False, "mlp_bias": False}


def dense_mlp(hf: str, ours: str) -> list[Tensor]:
    """One layer's gated MLP (`hf`: the layer's checkpoint prefix, `ours`: its parameters')."""
    return [linear(f"{hf}mlp.{name}.weight", f"{ours}{name}/kernel") for name in MLP]


def tensors(model: Llama, mlp: Callable[[str, str], list[Tensor]] = dense_mlp) -> list[Tensor]:
    """Every tensor of the model's checkpoint and the parameter it holds (the same names in every family; `mlp`
    gives each layer's MLP: research/tools/hf/moe.py's mixtures)."""
    found = [same("model.embed_tokens.weight", "embed_tokens/embedding"), same("model.norm.weight", "norm/scale")]
    norms = ("input_layernorm", "post_attention_layernorm")
    norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm") if model.post_norms else ()
    for index in range(model.num_layers):
        hf, ours = f"model.layers.{index}.", f"layers_{index}/"
        found += [linear(f"{hf}self_attn.{name}.weight", f"{ours}{name}/kernel") for name in ATTENTION]
        if model.attention_bias:
            found += [same(f"{hf}self_attn.{name}.bias", f"{ours}{name}/bias") for name in ATTENTION[:3]]
        if model.qk_norm:
            found += [same(f"{hf}self_attn.{name}.weight", f"{ours}{name}/scale") for name in ("q_norm", "k_norm")]
        found += mlp(hf, ours)
        found += [same(f"{hf}{name}.weight", f"{ours}{name}/scale") for name in norms]
    return found + untied_head(model.tie_embeddings, "lm_head.weight", "lm_head/kernel")


LAYOUT = Layout("llama", "LlamaForCausalLM", from_config, to_config, tensors, run_family="llama")
