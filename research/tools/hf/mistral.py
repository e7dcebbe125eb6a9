"""MistralForCausalLM as research/models/llama.py's Llama: Llama with every layer attending to the last
`sliding_window` positions (Mistral 7B v0.1: 4,096; v0.3: none)."""

from research.models.llama import Llama
from research.tools.hf import llama
from research.tools.hf.layout import Layout


def from_config(config: dict, **overrides) -> Llama:
    """The Llama a MistralForCausalLM config.json describes."""
    return Llama(**llama.decoder_fields(config) | overrides)


def to_config(model: Llama) -> dict:
    llama.refuse(model, "MistralForCausalLM", attention_window="any")  # on every layer: no layer_types to write
    return {key: value for key, value in llama.decoder_config(model).items() if key != "layer_types"}


LAYOUT = Layout("mistral", "MistralForCausalLM", from_config, to_config, llama.tensors, run_family="mistral")
