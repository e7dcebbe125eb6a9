"""Decoder language models at published sizes: the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query
attention) and GPT-2, as named configs; Hugging Face checkpoints in and out (research/tools/hf/).

  python launch.py --config experiments/lm.py:cpu --workdir runs/lm_cpu
  python launch.py --config experiments/lm.py:llama3-8b --dry_run --target gpu:h100:8 --config.batch_size=16
  python -m research.tools.hf import HF_DIR runs/imported; predict.py --workdir runs/imported --generate "..."
Expected: `:cpu` is shakespeare_gpt:cpu's budget (nanoGPT's CPU run: 2,000 steps of 12 x 64 characters,
its schedule) for a Llama of its size (0.805M vs 0.804M parameters: 4 layers of 128, 4 heads sharing
2 key/value heads, SwiGLU 390 wide, tied embeddings): val loss 1.657 vs the GPT's 1.886 in ~3 min on
a 2-core CPU (docs/results.md). `:smoke` (1 layer of 64, 150 steps) falls from ln(66) ~ 4.2 to ~3.1.
Named sizes (`gpt2-124m` ... `llama2-70b`) have the published shapes, parameter counts (tests) and global
batches; they train on the shipped corpus with a byte-level BPE unless data.tokenizer names a tokenizer.json.
Data: Tiny Shakespeare windows of model.block_size tokens (training: every offset, shuffled;
evaluation: non-overlapping windows, every token scored once), or corpora prepared by
`python -m research.data.prepare` (data.prepared; docs/data.md). model.loss_chunk > 0 computes the
loss that many positions at a time, never the whole batch's logits (research/metrics.py).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from research import metrics, perf
from research.config import DEFAULT_PARAM_RULES, NANOGPT_OPTIMIZER, choose, trainer_config
from research.data import stream, text
from research.errors import ConfigError
from research.experiment import DecoderShape, Reference
from research.models import apply_with_dropout, compute_dtype, gpt, llama, param_count
from research.models.gpt import GPT
from research.models.llama import Llama

NANOGPT = (
    "nanoGPT README (github.com/karpathy/nanoGPT), shakespeare_char CPU run (~1.88): the GPT's number, same budget"
)
SMOKE_SOURCE = "this repository's smoke run (a regression guard, not a paper number)"
REFERENCES = (
    Reference(
        config="cpu", metric="eval/loss", value=1.88, tolerance=0.05, better="min", source=NANOGPT, kind="published"
    ),
    Reference(
        config="smoke", metric="eval/loss", value=3.09, tolerance=0.15, better="min", source=SMOKE_SOURCE, kind="ours"
    ),
)

# Vocabulary dimensions are split too: over `tensor` (the head's output, the embedding's rows).
# Scanned layers ("layers/...") carry a leading layer axis, which stays whole.
PARAM_RULES = (
    (r"layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", (None, "fsdp", "tensor")),  # L x D x F
    (r"layers/(o_proj|down_proj)/kernel$", (None, "tensor", "fsdp")),  # L x F x D
    (r"layers_\d+/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),  # column-parallel
    (r"layers_\d+/(o_proj|down_proj)/kernel$", ("tensor", "fsdp")),  # row-parallel
    (r"(embed_tokens|token_embedding)/embedding$", ("tensor", "fsdp")),  # V x D
    (r"(lm_head|head)/kernel$", ("fsdp", "tensor")),  # D x V
) + DEFAULT_PARAM_RULES  # the GPT's attention and MLP, position embeddings, the replicated rest

GPT2 = dict(family="gpt", vocab_size=50257, block_size=1024, use_bias=True, tie_embeddings=True)
LLAMA = dict(family="llama", tie_embeddings=False, scan_layers=True, remat="full", dtype="bfloat16", loss_chunk=1024)
CONTEXT = {"llama-3.2-1b": 8192, "llama2-7b": 4096, "llama3-8b": 8192, "llama2-70b": 4096}  # training windows
SIZES = {name: GPT2 | size for name, size in gpt.SIZES.items()} | {
    name: LLAMA | size | dict(block_size=CONTEXT[name]) for name, size in llama.SIZES.items()
}
PUBLISHED_PARAMETERS = gpt.PUBLISHED_PARAMETERS | llama.PUBLISHED_PARAMETERS
# Global batches in windows of the training context, as published: GPT-2 512 x 1,024 (Radford et al. 2019,
# sec. 2.3); Llama 2 4M tokens, 1,024 x 4,096 (Touvron et al. 2023, sec. 2.2); Llama 3 16M tokens, 2,048 x 8,192
# (Grattafiori et al. 2024, sec. 3.4.1: the 405B's; the 8B's and Llama 3.2 1B's own are not published).
LLAMA_BATCHES = {"llama2-7b": 1024, "llama2-70b": 1024, "llama3-8b": 2048, "llama-3.2-1b": 2048}
BATCHES = dict.fromkeys(gpt.SIZES, 512) | LLAMA_BATCHES

CPU = {  # shakespeare_gpt:cpu's data, budget and optimizer; a Llama of the GPT's parameter count
    **{"model.block_size": 64, "model.num_layers": 4, "model.num_heads": 4, "model.num_kv_heads": 2},
    **{"model.width": 128, "model.mlp_dim": 390, "num_steps": 2000, "batch_size": 12, "eval_every": 500},
}
SMOKE = {
    **{"model.block_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1},
    **{"model.width": 64, "model.mlp_dim": 176, "data.max_eval_windows": 64, "num_steps": 150, "batch_size": 16},
    **{"eval_every": 0, "log_every": 10, "optimizer.learning_rate": 1e-2, "optimizer.schedule.warmup_steps": 10},
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`:cpu` (the default), `:smoke`, or a published size (SIZES: gpt2-124m ... llama2-70b, research/models)."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "name": "tiny_shakespeare",
            "tokenizer": "chars",  # chars, bpe:N (byte-level BPE trained here) or the path of a tokenizer.json
            "max_eval_windows": 0,  # 0: the whole validation text; >0: only its first N windows
            "prepared": "",  # corpora of research.data.prepare, "DIR" or "DIR:0.7,DIR:0.3": docs/data.md
            "segment_ids": False,  # prepared: attention and the loss stay inside each document
        }
    )
    config.model = ml_collections.ConfigDict(
        {  # the keys are the model modules' field names (research/tools/hf/ fills them from a config.json)
            "family": "llama",  # llama or gpt
            "vocab_size": 0,  # 0: the tokenizer's
            "block_size": 64,  # context: the training window and the generation cache
            "num_layers": 4,
            "num_heads": 4,
            "num_kv_heads": 2,  # llama: key/value heads shared by num_heads / num_kv_heads query heads each
            "width": 128,
            "mlp_dim": 390,  # llama: SwiGLU units (gpt: always 4 x width)
            "head_dim": 0,  # llama: 0 means width / num_heads
            "rope_theta": 10000.0,
            "rope_scaling": (),  # llama: () or Llama 3.1's (factor, low, high frequency factors, original context)
            "norm_epsilon": 1e-5,
            "tie_embeddings": True,
            "scan_layers": False,  # llama: one compiled block under nn.scan, whatever the depth
            "remat": "none",  # research/models/transformer.py's REMAT_POLICIES
            "dtype": "float32",  # compute dtype (bfloat16: mixed precision)
            "param_dtype": "float32",  # bfloat16 halves parameter memory; the optimizer's moments follow it
            "dropout_rate": 0.0,  # gpt only
            "use_bias": False,  # gpt only (GPT-2's checkpoints have biases)
            "loss_chunk": 0,  # >0: the loss's head runs on this many positions at a time
            "attention": "auto",  # llama: research/models/kernels.py (cuDNN on GPUs, splash on TPUs, else XLA)
        }
    )
    config.param_rules = PARAM_RULES
    config.optimizer.kwargs.b2 = 0.99
    config.update_from_flattened_dict(
        NANOGPT_OPTIMIZER
        | {
            "eval_batch_size": 64,
            "log_every": 50,
            "checkpoint.every_steps": 1000,
        }
    )
    config.update_from_flattened_dict(CPU)
    if arg in SIZES:
        config.model.update(SIZES[arg])
        config.data.tokenizer = "bpe:8192"
        config.mesh.update({"data": 1, "fsdp": -1})
        config.update_from_flattened_dict({"batch_size": BATCHES[arg], "num_steps": 10000, "eval_every": 1000})
        config.update_from_flattened_dict({"data.max_eval_windows": 64, "optimizer.learning_rate": 3e-4})
        return config
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": {}, "smoke": SMOKE}))
    return config


def tokenizer_and_splits(config: ml_collections.ConfigDict):
    if config.data.prepared:
        return stream.parse_sources(config.data.prepared)[0][0].tokenizer(), None
    try:
        return text.token_corpus(config.data.name, config.data_dir, config.data.tokenizer)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def vocab_size(config: ml_collections.ConfigDict) -> int:
    """model.vocab_size, or the tokenizer's when it is 0 (66 for Tiny Shakespeare's characters)."""
    return config.model.vocab_size or tokenizer_and_splits(config)[0].vocab_size


def make_data(config: ml_collections.ConfigDict, split: str):
    tokenizer, splits = tokenizer_and_splits(config)
    if tokenizer.vocab_size > vocab_size(config):
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids, the model's vocabulary {vocab_size(config)}")
    if not config.data.prepared:
        return text.window_batches(splits[split], config.model.block_size, config, split)
    if config.data.segment_ids and config.model.family != "llama":
        raise ConfigError("data.segment_ids needs model.family llama (the GPT's attention takes no document ids)")
    return stream.lm_batches(config, split)


def encode_text(config: ml_collections.ConfigDict, prompt: str):
    return tokenizer_and_splits(config)[0].encode(prompt)


def decode_tokens(config: ml_collections.ConfigDict, ids) -> str:
    return tokenizer_and_splits(config)[0].decode(ids)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    model = config.model
    types = dict(dtype=compute_dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype))
    shared = {name: model[name] for name in ("block_size", "num_layers", "num_heads", "width", "tie_embeddings")}
    shared |= dict(vocab_size=vocab_size(config), remat=model.remat, loss_chunk=model.loss_chunk, **types)
    if model.family == "gpt":
        return GPT(dropout_rate=model.dropout_rate, use_bias=model.use_bias, **shared)
    if model.family != "llama":
        raise ConfigError(f"model.family {model.family!r}: use llama or gpt")
    llama_only = ("num_kv_heads", "mlp_dim", "head_dim", "rope_theta", "norm_epsilon", "scan_layers", "attention")
    return Llama(rope_scaling=tuple(model.rope_scaling), **{name: model[name] for name in llama_only}, **shared)


def hf_layout(config: ml_collections.ConfigDict) -> str:
    """The configured model as a Hugging Face checkpoint: LlamaForCausalLM or GPT2LMHeadModel's model_type."""
    return {"llama": "llama", "gpt": "gpt2"}[config.model.family]


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of the configured model (shapes only, nothing allocated)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return param_count(jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), tokens))


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
    return config.model.block_size


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one window: 6 N per token plus attention (research/perf.py)."""
    shape = decoder_shape(config)
    per_token = perf.gpt_training_flops_per_token(
        parameter_count(config), shape.layers, shape.heads * shape.head_dim, shape.length
    )
    return shape.length * per_token


def decoder_shape(config: ml_collections.ConfigDict) -> DecoderShape:
    """The configured decoder's shape, for the dry run, the planner and research/perf.py's activation count."""
    model, llama_family = config.model, config.model.family == "llama"
    return DecoderShape(
        layers=model.num_layers,
        width=model.width,
        heads=model.num_heads,
        kv_heads=model.num_kv_heads if llama_family else model.num_heads,
        head_dim=(model.head_dim if llama_family else 0) or model.width // model.num_heads,
        mlp_dim=model.mlp_dim if llama_family else 4 * model.width,
        vocab=vocab_size(config),
        length=model.block_size,
        remat=model.remat,
        scan_layers=llama_family and model.scan_layers,
        dtype_bytes=jnp.dtype(model.dtype).itemsize,
        fused_attention=llama_family and model.attention != "xla" and model.dtype != "float32",
        loss_chunk=model.loss_chunk,
        remat_key="model.remat",
        scan_layers_key="model.scan_layers" if llama_family else "",  # the GPT's layers are never scanned
    )


def _features_or_logits(params, batch, rng, model, hidden: bool):
    if isinstance(model, GPT):
        return apply_with_dropout(model, {"params": params}, batch["inputs"], rng=rng, return_hidden=hidden)
    segments = batch.get("segment_ids")  # documents packed into a window, where the data marks them
    return model.apply({"params": params}, batch["inputs"], segment_ids_BxL=segments, return_hidden=hidden)


def loss_fn(params, batch, rng, *, model):
    if model.loss_chunk:
        features_BxLxD = _features_or_logits(params, batch, rng, model, hidden=True)
        return metrics.chunked_next_token_loss(features_BxLxD, model.head_kernel(params), batch, model.loss_chunk)
    return metrics.next_token_loss(_features_or_logits(params, batch, rng, model, hidden=False), batch)


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    return metrics.next_token_metrics(_features_or_logits(params, batch, None, model, hidden=False), batch)
