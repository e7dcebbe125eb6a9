"""The decoder family's published models: each family's settings of research/models/llama.py's Llama, each
model's shape (its config.json on the Hugging Face hub), parameter count, training context and global batch.

Parameter counts are transformers' num_parameters() of the released config.json (tied embeddings counted
once), the same as keras-hub's presets for Gemma and the model cards' rounded figures (Qwen2.5: 0.49B, 7.61B;
Qwen3: 0.6B, 8.2B, 32.8B). The Gemma reports' non-embedding counts agree to the parameter (Gemma Team 2024
Table 2, 2024b Table 2, 2025 Table 1). Gemma 3's 4B and 27B are their text decoders (Gemma3ForCausalLM of the
checkpoint's text_config, whose vocabulary is transformers' default 262,208).
"""

import dataclasses

from research.models.llama import ARCHITECTURE, Llama

# What makes each family's block what it is (the shapes come with each model). Layer i is global when
# global_every divides i + 1; the others attend to the last attention_window positions.
FAMILIES = {
    "llama": {},
    "qwen2": dict(attention_bias=True, rope_theta=1000000.0, norm_epsilon=1e-6),
    "qwen3": dict(qk_norm=True, rope_theta=1000000.0, norm_epsilon=1e-6, head_dim=128),
    "mistral": dict(attention_window=4096, rope_theta=10000.0),
    "gemma": dict(activation="gelu_tanh", norm_offset=1.0, scale_embeddings=True, tie_embeddings=True)
    | dict(norm_epsilon=1e-6, rope_theta=10000.0, head_dim=256),
}
# Mixtures of experts: every MLP a mixture, the router's load-balancing weight their config.json's
# router_aux_loss_coef (Jiang et al. 2024; Qwen Team 2025).
FAMILIES["mixtral"] = dict(rope_theta=1000000.0, num_experts=8, experts_per_token=2, moe_aux_weight=0.02)
FAMILIES["qwen3_moe"] = FAMILIES["qwen3"] | dict(num_experts=128, experts_per_token=8, moe_aux_weight=0.001)
FAMILIES["gemma2"] = FAMILIES["gemma"] | dict(post_norms=True, attention_window=4096, global_every=2)
FAMILIES["gemma2"] |= dict(attention_softcap=50.0, logit_softcap=30.0, query_scale_dim=256)
FAMILIES["gemma3"] = FAMILIES["gemma"] | dict(post_norms=True, qk_norm=True, attention_window=1024, global_every=6)
FAMILIES["gemma3"] |= dict(rope_theta=1000000.0, rope_local_theta=10000.0, query_scale_dim=256, rope_scaling=(8.0,))


def shape(layers: int, heads: int, kv_heads: int, width: int, mlp_dim: int, vocab: int, **rest) -> dict:
    return dict(num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, width=width, mlp_dim=mlp_dim) | dict(
        vocab_size=vocab, **rest
    )


LLAMA3 = dict(vocab=128256, rope_theta=500000.0)  # Llama 3's tokenizer and rotary base
LLAMA31 = LLAMA3 | dict(rope_scaling=(8.0, 1.0, 4.0, 8192))  # Llama 3.1's extension to 128K (config.json)
LLAMA2 = dict(vocab=32000, rope_theta=10000.0)
QWEN, GEMMA, GEMMA3 = 151936, 256000, 262208
SIZES = {  # (family, shape)
    "llama-3.2-1b": ("llama", shape(16, 32, 8, 2048, 8192, head_dim=64, tie_embeddings=True, **LLAMA3)),
    "llama2-7b": ("llama", shape(32, 32, 32, 4096, 11008, **LLAMA2)),
    "llama3-8b": ("llama", shape(32, 32, 8, 4096, 14336, **LLAMA3)),
    "llama2-70b": ("llama", shape(80, 64, 8, 8192, 28672, **LLAMA2)),
    "llama3.1-8b-128k": ("llama", shape(32, 32, 8, 4096, 14336, **LLAMA31)),  # Llama 3.1 8B at its whole context
    "llama3.1-405b": ("llama", shape(126, 128, 8, 16384, 53248, **LLAMA31)),
    "qwen2.5-0.5b": ("qwen2", shape(24, 14, 2, 896, 4864, QWEN, tie_embeddings=True)),
    "qwen2.5-7b": ("qwen2", shape(28, 28, 4, 3584, 18944, 152064)),
    "qwen3-0.6b": ("qwen3", shape(28, 16, 8, 1024, 3072, QWEN, tie_embeddings=True)),
    "qwen3-8b": ("qwen3", shape(36, 32, 8, 4096, 12288, QWEN)),
    "qwen3-32b": ("qwen3", shape(64, 64, 8, 5120, 25600, QWEN)),
    "mistral-7b": ("mistral", shape(32, 32, 8, 4096, 14336, 32000)),
    "mixtral-8x7b": ("mixtral", shape(32, 32, 8, 4096, 14336, 32000)),  # mlp_dim: each expert's
    "qwen3-30b-a3b": ("qwen3_moe", shape(48, 32, 4, 2048, 768, QWEN)),
    "gemma-2b": ("gemma", shape(18, 8, 1, 2048, 16384, GEMMA)),
    "gemma-7b": ("gemma", shape(28, 16, 16, 3072, 24576, GEMMA)),
    "gemma2-2b": ("gemma2", shape(26, 8, 4, 2304, 9216, GEMMA)),
    "gemma2-9b": ("gemma2", shape(42, 16, 8, 3584, 14336, GEMMA)),
    "gemma2-27b": ("gemma2", shape(46, 32, 16, 4608, 36864, GEMMA, head_dim=128, query_scale_dim=144)),
    "gemma3-1b": ("gemma3", shape(26, 4, 1, 1152, 6912, 262144, attention_window=512, rope_scaling=())),
    "gemma3-4b": ("gemma3", shape(34, 8, 4, 2560, 10240, GEMMA3)),
    "gemma3-27b": ("gemma3", shape(62, 32, 16, 5376, 21504, GEMMA3, head_dim=128, query_scale_dim=168)),
}
PUBLISHED_PARAMETERS = {
    "llama-3.2-1b": 1_235_814_400,
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama2-70b": 68_976_648_192,
    "llama3.1-8b-128k": 8_030_261_248,
    "llama3.1-405b": 405_853_388_800,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,
    "qwen3-8b": 8_190_735_360,
    "qwen3-32b": 32_762_123_264,
    "mistral-7b": 7_241_732_096,  # Mistral 7B v0.1 (v0.3 has no sliding window and 32,768 tokens)
    "mixtral-8x7b": 46_702_792_704,
    "qwen3-30b-a3b": 30_532_122_624,
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-1b": 999_885_952,
    "gemma3-4b": 3_880_263_168,
    "gemma3-27b": 27_009_346_304,
}
PUBLISHED_ACTIVE_PARAMETERS = {  # of the mixtures, per token, as their authors round them
    "mixtral-8x7b": 12.9e9,  # "46.7B total parameters, 12.9B per token" (mistral.ai/news/mixtral-of-experts)
    "qwen3-30b-a3b": 3.3e9,  # "30.5B in total and 3.3B activated" (the Qwen/Qwen3-30B-A3B model card)
}
# Training windows: Llama 2 4,096, Llama 3 8,192 (their papers); Qwen2.5 and Qwen3 pre-train at 4,096 before
# their long-context stages (Qwen Team 2024 sec. 3.2, 2025 sec. 3.2); Mistral 7B's 8,192 (Jiang et al. 2023);
# Gemma 1-2 8,192 (their reports); Gemma 3 32,768 before its 128K extension (Gemma Team 2025 sec. 2.2).
CONTEXT = dict.fromkeys(("llama2-7b", "llama2-70b"), 4096) | dict.fromkeys(("llama-3.2-1b", "llama3-8b"), 8192)
CONTEXT |= {"llama3.1-405b": 8192, "llama3.1-8b-128k": 131072}  # the 405B's pre-training; 3.1's longest (sec. 3.4.2)
CONTEXT |= {name: 4096 for name in SIZES if name.startswith("qwen")}
CONTEXT |= {name: 8192 for name in SIZES if name.startswith(("mistral", "gemma-", "gemma2"))}
CONTEXT |= {name: 32768 for name in SIZES if name.startswith(("gemma3", "mixtral"))}  # Mixtral: Jiang et al. 2024
# Global batches in windows of the training context, as published: Llama 2 4M tokens, 1,024 x 4,096 (Touvron et
# al. 2023, sec. 2.2); Llama 3 16M tokens, 2,048 x 8,192 (Grattafiori et al. 2024, sec. 3.4.1: the 405B's). Qwen,
# Mistral and Gemma publish none: 4M tokens, as Llama 2.
BATCHES = {name: 4 * 2**20 // CONTEXT[name] for name in SIZES} | {"llama2-7b": 1024, "llama2-70b": 1024}
BATCHES |= {"llama3-8b": 2048, "llama-3.2-1b": 2048, "llama3.1-405b": 2048, "llama3.1-8b-128k": 128}  # 16M tokens


def family_settings(family: str) -> dict:
    """Every architecture field of Llama for a family: its FAMILIES entry over Llama's defaults."""
    defaults = {field.name: field.default for field in dataclasses.fields(Llama) if field.name in ARCHITECTURE}
    return {name: value for name, value in defaults.items() if value is not dataclasses.MISSING} | FAMILIES[family]


def settings(name: str) -> dict:
    """The Llama fields of a published model: its family's settings, its shape, its training context."""
    family, fields = SIZES[name]
    return family_settings(family) | fields | {"block_size": CONTEXT[name]}


# :cpu-FAMILY, each family's block at :cpu's size: windows scaled to 64 tokens (Mistral's and Gemma 2's half of
# 8,192, Gemma 3's a quarter, its last of 4 layers global); experts whose active width is :cpu's MLP of 390
# (top-2 of 8 x 195, top-8 of 32 x 48); head width, tied embeddings and query scale as :cpu's.
CPU_SCALED = {"qwen2": {}, "qwen3": {}, "mistral": dict(attention_window=32), "gemma": {}}
CPU_SCALED |= {"gemma2": dict(attention_window=32), "gemma3": dict(attention_window=16, global_every=4)}
CPU_SCALED |= {"mixtral": dict(mlp_dim=195), "qwen3_moe": dict(num_experts=32, mlp_dim=48)}


def cpu_block(family: str) -> dict:
    """The Llama fields of a family's block at :cpu's size (CPU_SCALED), its family named."""
    cpu = dict(head_dim=0, tie_embeddings=True, query_scale_dim=0)
    return family_settings(family) | cpu | CPU_SCALED[family] | dict(family=family)
