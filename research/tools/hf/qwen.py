"""Qwen2ForCausalLM (Qwen2, Qwen2.5) and Qwen3ForCausalLM as research/models/llama.py's Llama.

Qwen2 is Llama with biases on the query, key and value projections; Qwen3 drops them for an RMSNorm on
each head's query and key (qk_norm) and a head width of its own. Both may slide some layers
(use_sliding_window, layer_types), which the released checkpoints do not.
"""

from research.models.llama import Llama
from research.tools.hf import llama
from research.tools.hf.layout import Layout

SLIDING = dict(attention_window="any", global_every="any")  # layer_types holds any pattern of sliding layers


def qwen2_from_config(config: dict, **overrides) -> Llama:
    """The Llama a Qwen2ForCausalLM config.json describes."""
    return Llama(**llama.decoder_fields(config) | dict(attention_bias=True) | overrides)


def qwen2_to_config(model: Llama) -> dict:
    llama.refuse(model, "Qwen2ForCausalLM", attention_bias=(True,), **SLIDING)
    return llama.decoder_config(model) | {"use_sliding_window": bool(model.attention_window)}


def qwen3_from_config(config: dict, **overrides) -> Llama:
    """The Llama a Qwen3ForCausalLM config.json describes."""
    qwen3 = dict(qk_norm=True, attention_bias=bool(config.get("attention_bias")))
    return Llama(**llama.decoder_fields(config) | qwen3 | overrides)


def qwen3_to_config(model: Llama) -> dict:
    llama.refuse(model, "Qwen3ForCausalLM", qk_norm=(True,), attention_bias=(False, True), **SLIDING)
    window = bool(model.attention_window)
    return llama.decoder_config(model) | {"attention_bias": model.attention_bias, "use_sliding_window": window}


QWEN2 = Layout("qwen2", "Qwen2ForCausalLM", qwen2_from_config, qwen2_to_config, llama.tensors, run_family="qwen2")
QWEN3 = Layout("qwen3", "Qwen3ForCausalLM", qwen3_from_config, qwen3_to_config, llama.tensors, run_family="qwen3")
