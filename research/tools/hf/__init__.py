"""Hugging Face checkpoints in and out: `config.json` + safetensors in the layout `transformers` loads.

  python -m research.tools.hf import HF_DIR WORKDIR [--scan_layers] [--experiment experiments/lm.py:cpu]
  python -m research.tools.hf export WORKDIR HF_DIR [--checkpoint latest] [--max_shard_size 5GB]

convert.py reads and writes the files and checks them; each family's layout (the architecture, its
config.json as our module, which tensor holds which parameter) is a file beside it, listed in `LAYOUTS`
by config.json's model_type: llama.py (LlamaForCausalLM), gpt2.py (GPT2LMHeadModel), bert.py
(BertForMaskedLM: published BERT's post-LayerNorm encoder, through from_hf / to_hf), moe.py (MixtralForCausalLM,
Qwen3MoeForCausalLM: each expert's tensors stacked into ours by the layout's `combine`). A new family is a
layout file (layout.py says what one holds) and its entry in `LAYOUTS`. A file that does not fit (another
architecture, a missing tensor, a wrong shape, a rope scaling not implemented) is a one-line ConfigError
naming the tensor. `import` and `export` (__main__.py) turn checkpoints into runs and back; a run's
experiment names the layout it exports as with its `hf_layout` hook. Large models are written as shards
with `model.safetensors.index.json`, as `save_pretrained` does.
"""
