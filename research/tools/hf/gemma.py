"""GemmaForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM (Gemma 3's text model) as research/models/llama.py's
Llama (Gemma Team 2024, 2024b, 2025).

Every Gemma: GeGLU (tanh-approximated gelu), RMSNorm multiplying by (1 + w) (its checkpoints store w),
embeddings times sqrt(width) and a head tied to them. Gemma 2 adds a norm after each sub-block, local
(sliding-window) and global layers alternating, attention scores divided by sqrt(query_pre_attn_scalar) and
soft-capped at 50, logits at 30. Gemma 3 replaces the soft-caps by QK-norm, has five local layers per global
one, and a rotary base per kind (rope_local_base_freq for the local ones; the global ones may be scaled).
Gemma3ForConditionalGeneration (text and images: the published 4B, 12B and 27B) is read as its text decoder
(`text_model`); export writes Gemma3ForCausalLM.
"""

from research.errors import ConfigError
from research.models.llama import Llama
from research.tools.hf import llama
from research.tools.hf.layout import Layout

GEMMA = dict(norm_offset=1.0, scale_embeddings=True)
# Gemma3TextConfig's defaults (transformers 5.24), which the published text_configs leave out (the 4B's names only
# its width, MLP, depth, window and rope scaling)
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262208, num_attention_heads=8, num_key_value_heads=4, head_dim=256)
GEMMA3_TEXT_DEFAULTS |= dict(query_pre_attn_scalar=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0)
GEMMA3_TEXT_DEFAULTS |= dict(sliding_window=4096, sliding_window_pattern=6, rms_norm_eps=1e-6, tie_word_embeddings=True)
GEMMA3_TEXT_DEFAULTS |= dict(max_position_embeddings=131072, hidden_activation="gelu_pytorch_tanh")
TEXT_PREFIXES = ("language_model.model.", "model.language_model.")  # transformers 4.50's names, and later ones
GEMMA_ALLOWED = dict(norm_offset=(1.0,), scale_embeddings=(True,), activation=("gelu_tanh",))
LATER = dict(post_norms=True)  # Gemma 2 and 3


def _fields(config: dict) -> dict:
    """What every Gemma's config.json gives. transformers runs every Gemma's gelu tanh-approximated, the
    "gelu" of the first releases' config.json included (it says so and replaces it)."""
    activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
    if not str(activation).startswith("gelu"):
        raise ConfigError(f"hidden_activation {activation!r}: a Gemma's MLP is GeGLU")
    return llama.decoder_fields(config | {"hidden_act": "gelu_pytorch_tanh"}) | GEMMA


def _later_fields(config: dict) -> dict:
    """What Gemma 2 and 3 add: the norms after each sub-block, the query scale, soft-caps where set."""
    return (
        _fields(config)
        | LATER
        | dict(
            query_scale_dim=int(config.get("query_pre_attn_scalar") or 0),
            attention_softcap=float(config.get("attn_logit_softcapping") or 0.0),
            logit_softcap=float(config.get("final_logit_softcapping") or 0.0),
        )
    )


def gemma_from_config(config: dict, **overrides) -> Llama:
    """The Llama a GemmaForCausalLM config.json describes."""
    return Llama(**_fields(config) | overrides)


def gemma_to_config(model: Llama) -> dict:
    llama.refuse(model, "GemmaForCausalLM", **GEMMA_ALLOWED)
    return llama.decoder_config(model)


def gemma2_from_config(config: dict, **overrides) -> Llama:
    """The Llama a Gemma2ForCausalLM config.json describes."""
    return Llama(**_later_fields(config) | overrides)


def _later_config(model: Llama) -> dict:
    return llama.decoder_config(model, "hidden_activation") | {
        "query_pre_attn_scalar": model.query_scale_dim or model.head_dim or model.width // model.num_heads,
        "attn_logit_softcapping": model.attention_softcap or None,
        "final_logit_softcapping": model.logit_softcap or None,
    }


def gemma2_to_config(model: Llama) -> dict:
    later = dict(post_norms=(True,), query_scale_dim="any", attention_softcap="any", logit_softcap="any")
    llama.refuse(model, "Gemma2ForCausalLM", **GEMMA_ALLOWED, **later, attention_window="any", global_every="any")
    return _later_config(model)


def gemma3_from_config(config: dict, **overrides) -> Llama:
    """The Llama a Gemma3ForCausalLM (Gemma3TextConfig) config.json describes, its defaults where it is silent."""
    return Llama(**_later_fields(GEMMA3_TEXT_DEFAULTS | config) | dict(qk_norm=True) | overrides)


def text_model(config: dict, tensors: dict) -> tuple[dict, dict]:
    """A Gemma3ForConditionalGeneration checkpoint's text decoder as a Gemma3ForCausalLM one: its text_config and
    its language model's tensors under Gemma3ForCausalLM's names (the vision tower and projector left out)."""
    text_config = {"tie_word_embeddings": config.get("tie_word_embeddings", True)} | config["text_config"]
    text_config |= {"model_type": GEMMA3.model_type, "architectures": [GEMMA3.architecture]}
    renamed = {}
    for name, array in tensors.items():
        prefix = next((prefix for prefix in TEXT_PREFIXES if name.startswith(prefix)), None)
        if prefix:
            renamed["model." + name.removeprefix(prefix)] = array
        elif name in ("language_model.lm_head.weight", "lm_head.weight"):
            renamed["lm_head.weight"] = array
    return text_config, renamed


def _rope_per_layer_type(model: Llama) -> dict:
    """rope_parameters with an entry per layer type, the only form Gemma3TextConfig reads (from a single dict
    it would take its default bases, 1M and 10k, for both kinds)."""
    rope = llama.rope_parameters(model)
    if llama.FULL in rope:
        return rope
    local = rope  # the local layers rotate as the global ones, unless all are local with a base of their own
    if model.attention_window and model.rope_local_theta:
        local = {"rope_type": "default", "rope_theta": model.rope_local_theta}
    return {llama.FULL: rope, llama.SLIDING: local}


def gemma3_to_config(model: Llama) -> dict:
    later = dict(post_norms=(True,), qk_norm=(True,), query_scale_dim="any", attention_softcap="any")
    sliding = dict(attention_window="any", global_every="any", rope_local_theta="any", logit_softcap="any")
    llama.refuse(model, "Gemma3ForCausalLM", **GEMMA_ALLOWED, **later, **sliding)
    return _later_config(model) | {"rope_parameters": _rope_per_layer_type(model)}


GEMMA1 = Layout("gemma", "GemmaForCausalLM", gemma_from_config, gemma_to_config, llama.tensors, run_family="gemma")
GEMMA2 = Layout("gemma2", "Gemma2ForCausalLM", gemma2_from_config, gemma2_to_config, llama.tensors, "gemma2")
GEMMA3 = Layout("gemma3_text", "Gemma3ForCausalLM", gemma3_from_config, gemma3_to_config, llama.tensors, "gemma3")
