"""Decoder language models at published sizes: the Llama family (RoPE, RMSNorm, gated MLP, grouped-query
attention; Qwen2/2.5, Qwen3, Mistral, Gemma 1-3 and the mixtures of experts Mixtral and Qwen3-MoE are its
settings) and GPT-2; Hugging Face checkpoints in and out (research/tools/hf/), fine-tuned by `:from=RUN`.

  python launch.py --config experiments/lm.py:cpu --workdir runs/lm_cpu
  python launch.py --config experiments/lm.py:llama3-8b --dry_run --target gpu:h100:8 --config.batch_size=16
  python -m research.tools.hf import HF_DIR runs/imported
  python launch.py --config experiments/lm.py:from=runs/imported --workdir runs/tuned
Expected: `:cpu`, shakespeare_gpt:cpu's budget (nanoGPT's CPU run: 2,000 steps of 12 x 64 characters) for a Llama
of its size (0.805M parameters: 4 layers of 128, 4 heads, 2 key/value heads, SwiGLU 390, tied embeddings): val loss
1.657 vs the GPT's 1.886 in ~3 min on 2 cores (docs/results.md; `:cpu-FAMILY`: each family's block); `:smoke` 4.2
to ~3.1. Named sizes (research/models/published.py): published shapes, counts, batches. Data: Tiny Shakespeare.
"""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from research import experiment, metrics, perf
from research.config import DEFAULT_PARAM_RULES, NANOGPT_OPTIMIZER, choose, trainer_config
from research.data import stream, text
from research.errors import ConfigError
from research.models import apply_with_dropout, compute_dtype, gpt, moe, param_count, published
from research.models.llama import ARCHITECTURE, MOE_RUN, PIPELINE_RUN, Llama

NANOGPT = "nanoGPT README (github.com/karpathy/nanoGPT), shakespeare_char CPU run (~1.88): the GPT's, same budget"
SMOKE_SOURCE, LOSS = "this repository's smoke run (a regression guard)", dict(metric="eval/loss", better="min")
REFERENCES = (
    experiment.Reference(config="cpu", value=1.88, tolerance=0.05, source=NANOGPT, kind="published", **LOSS),
    experiment.Reference(config="smoke", value=3.09, tolerance=0.15, source=SMOKE_SOURCE, kind="ours", **LOSS),
)  # --bench_optimizer's and --compare_optimizers' workload: :cpu until the loss AdamW passes near step 1,650
BENCHMARK = experiment.Workload("loss", 1.70, "min", 100, 2000, (("adamw", 1e-3), ("momentum", 0.3)))
PARAM_RULES = (  # vocabulary dimensions split over tensor too; scanned layers' leading layer axis over `stage`
    (r"layers/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("stage", "fsdp", "tensor")),  # L x D x F
    (r"layers/(o_proj|down_proj)/kernel$", ("stage", "tensor", "fsdp")),  # L x F x D
    (r"layers_\d+/(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel$", ("fsdp", "tensor")),  # column-parallel
    (r"layers_\d+/(o_proj|down_proj)/kernel$", ("tensor", "fsdp")),  # row-parallel
    (r"(embed_tokens|token_embedding)/embedding$", ("tensor", "fsdp")),  # V x D
    (r"(lm_head|head)/kernel$", ("fsdp", "tensor")),  # D x V
    *moe.PARAM_RULES,  # experts over `expert`
) + DEFAULT_PARAM_RULES  # the GPT's attention and MLP, position embeddings, the replicated rest

GPT2 = dict(family="gpt", vocab_size=50257, block_size=1024, use_bias=True, tie_embeddings=True)
LLAMA = dict(scan_layers=True, remat="full", dtype="bfloat16", loss_chunk=1024)  # how the named decoders train
SIZES = {name: GPT2 | size for name, size in gpt.SIZES.items()} | {
    name: LLAMA | published.settings(name) | dict(family=published.SIZES[name][0]) for name in published.SIZES
}
PUBLISHED_PARAMETERS = gpt.PUBLISHED_PARAMETERS | published.PUBLISHED_PARAMETERS
BATCHES = dict.fromkeys(gpt.SIZES, 512) | published.BATCHES  # GPT-2: 512 x 1,024 (Radford et al. 2019, sec. 2.3)
CPU_BLOCKS = {f"cpu-{family}": published.cpu_block(family) for family in published.CPU_SCALED}  # each family's block
NAMED = {"num_steps": 10000, "eval_every": 1000, "data.tokenizer": "bpe:8192", "data.max_eval_windows": 64}
NAMED |= {"mesh.fsdp": -1, "mesh.data": 1, "optimizer.learning_rate": 3e-4}  # a named size's run
CPU = {"num_steps": 2000, "batch_size": 12, "eval_every": 500, "log_every": 50}  # shakespeare_gpt:cpu's budget
SMOKE = {"model.block_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 1}
SMOKE |= {"model.width": 64, "model.mlp_dim": 176, "data.max_eval_windows": 64, "num_steps": 150, "batch_size": 16}
SMOKE |= {"eval_every": 0, "log_every": 10, "optimizer.learning_rate": 1e-2, "optimizer.schedule.warmup_steps": 10}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """`:cpu` (default), `:smoke`, `:cpu-FAMILY`, `:smoke-FAMILY`, a published size (SIZES) or `:from=RUN`."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "name": "tiny_shakespeare",
            "tokenizer": "chars",  # chars, bpe:N (byte-level BPE trained here) or the path of a tokenizer.json
            "max_eval_windows": 0,  # 0: the whole validation text; >0: only its first N windows
            "prepared": "",  # corpora of research.data.prepare, "DIR" or "DIR:0.7,DIR:0.3": docs/data.md
            "segment_ids": False,  # prepared: attention and the loss stay inside each document
            "end_ids": (),  # token ids that end a generated text (a checkpoint's generation_config.json eos_token_id)
        }
    )
    config.model = ml_collections.ConfigDict(
        {  # the model modules' field names (research/models/llama.py and gpt.py document each; research/tools/hf/
            # fills them from a config.json); the shape is :cpu's, a Llama of the GPT's parameter count
            "family": "llama",  # gpt or a family of research/models/published.py (the Llama's settings)
            **{"vocab_size": 0, "block_size": 64},  # vocab 0: the tokenizer's; block: training window, generation cache
            **{"num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "width": 128, "mlp_dim": 390},
            **published.family_settings("llama") | {"tie_embeddings": True},
            "scan_layers": False,  # llama: one compiled block under nn.scan, whatever the depth
            "remat": "none",  # research/models/transformer.py's REMAT_POLICIES
            "dtype": "float32",  # compute dtype (bfloat16: mixed precision)
            "param_dtype": "float32",  # bfloat16 halves parameter memory (moments: optimizer.moment_dtype)
            **{"dropout_rate": 0.0, "use_bias": False},  # gpt only (GPT-2's checkpoints have biases)
            "loss_chunk": 0,  # >0: the loss's head runs on this many positions at a time
            "attention": "auto",  # llama: research/models/kernels.py (cuDNN on GPUs, splash on TPUs, else XLA)
            **{key: getattr(Llama, key) for key in MOE_RUN + PIPELINE_RUN},  # experts: moe.py; stages: pipeline.py
        }
    )
    config.mesh = ml_collections.ConfigDict({"stage": 1, "data": -1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1})
    config.param_rules = PARAM_RULES
    config.optimizer.kwargs.b2 = 0.99
    config.update_from_flattened_dict(NANOGPT_OPTIMIZER | CPU | {"eval_batch_size": 64, "checkpoint.every_steps": 1000})
    if arg in SIZES:
        config.model.update(SIZES[arg])
        config.update_from_flattened_dict(NAMED | {"batch_size": BATCHES[arg]})
        return config
    if arg and arg.startswith("from="):
        return from_run(config, arg.removeprefix("from="))
    blocks = {name: {f"model.{key}": value for key, value in block.items()} for name, block in CPU_BLOCKS.items()}
    blocks |= {name.replace("cpu", "smoke"): SMOKE | block for name, block in blocks.items()}  # the block, in seconds
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": {}, "smoke": SMOKE} | blocks))
    return config


def from_run(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """`config` fine-tuning another lm run (as `python -m research.tools.hf import` makes): its architecture, layer
    layout, parameter dtype, tokenizer, end ids and parameters; how this one computes and trains stays `config`'s."""
    keys = [f"model.{key}" for key in (*ARCHITECTURE, "family", "scan_layers", "param_dtype", "use_bias")]
    keys += ["model.moe_aux_weight", "data.tokenizer", "data.end_ids"]
    config.update_from_flattened_dict(experiment.settings_of(workdir, __file__, keys))
    config.init_from.workdir = str(Path(workdir).absolute())
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
    chat = stream.parse_sources(config.data.prepared)[0][0].chat
    if (config.data.segment_ids or chat) and config.model.family == "gpt":  # the GPT takes no document ids
        raise ConfigError("data.segment_ids and chat corpora need a model.family of the Llama, not gpt")
    return stream.lm_batches(config, split)


def encode_text(config: ml_collections.ConfigDict, prompt: str):
    return tokenizer_and_splits(config)[0].encode(prompt)


def end_ids(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    return tuple(config.data.end_ids)


def tokenizer_file(config: ml_collections.ConfigDict) -> str:
    path = str(tokenizer_and_splits(config)[0].path) if config.data.prepared else config.data.tokenizer
    return path if path.endswith(".json") else ""


def decode_tokens(config: ml_collections.ConfigDict, ids) -> str:
    """The text of `ids` up to the first end id (data.end_ids)."""
    ends = [index for index, token in enumerate(ids) if token in config.data.end_ids]
    return tokenizer_and_splits(config)[0].decode(list(ids)[: (ends or [None])[0]])


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    model = config.model
    types = dict(dtype=compute_dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype))
    shared = {name: model[name] for name in ("block_size", "num_layers", "num_heads", "width", "tie_embeddings")}
    shared |= dict(vocab_size=vocab_size(config), remat=model.remat, loss_chunk=model.loss_chunk, **types)
    if model.family == "gpt":
        return gpt.GPT(dropout_rate=model.dropout_rate, use_bias=model.use_bias, **shared)
    if model.family not in published.FAMILIES:
        raise ConfigError(f"model.family {model.family!r}: use gpt or one of {', '.join(published.FAMILIES)}")
    settings = {name: model[name] for name in (*ARCHITECTURE, *MOE_RUN, *PIPELINE_RUN, "scan_layers", "attention")}
    return Llama(**settings | shared | dict(rope_scaling=tuple(model.rope_scaling), stack_rules=config.param_rules))


def hf_layout(config: ml_collections.ConfigDict) -> str:
    """The configured model as a Hugging Face checkpoint: its family's model_type (research/tools/hf/)."""
    return {"gpt": "gpt2", "gemma3": "gemma3_text"}.get(config.model.family, config.model.family)


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of the configured model (shapes only, nothing allocated)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return param_count(jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), tokens))


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
    return config.model.block_size


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one window: 6 N per token (N the active parameters) plus attention (research/perf.py)."""
    shape = decoder_shape(config)
    attention = (shape.layers, shape.heads * shape.head_dim, shape.length, shape.layer_windows)
    active = perf.active_parameters(shape, parameter_count(config))
    return shape.length * perf.gpt_training_flops_per_token(active, *attention)


def decoder_shape(config: ml_collections.ConfigDict) -> experiment.DecoderShape:
    """The configured decoder's shape, for the dry run, the planner and research/perf.py's activation count."""
    model = config.model
    common = dict(layers=model.num_layers, width=model.width, heads=model.num_heads, vocab=vocab_size(config))
    common |= dict(length=model.block_size, remat=model.remat, loss_chunk=model.loss_chunk, remat_key="model.remat")
    common |= dict(dtype_bytes=jnp.dtype(model.dtype).itemsize, pipeline=tuple(model[key] for key in PIPELINE_RUN))
    if model.family == "gpt":  # multi-head, a 4 x width MLP, XLA's attention, never scanned
        gpt_shape = dict(kv_heads=model.num_heads, head_dim=model.width // model.num_heads, mlp_dim=4 * model.width)
        return experiment.DecoderShape(**gpt_shape, scan_layers=False, fused_attention=False, attention="xla", **common)
    return experiment.DecoderShape(
        kv_heads=model.num_kv_heads,
        head_dim=model.head_dim or model.width // model.num_heads,
        mlp_dim=model.mlp_dim,
        scan_layers=model.scan_layers,
        fused_attention=model.attention != "xla" and model.dtype != "float32",
        attention=model.attention,
        layer_windows=tuple(kind.window for kind in make_model(config).layer_kinds()),
        attention_softcap=model.attention_softcap,
        experts=model.num_experts,
        experts_per_token=model.experts_per_token,
        capacity_factor=model.moe_capacity_factor if model.moe_dispatch == "capacity" else 0.0,
        scan_layers_key="model.scan_layers",
        pipeline_key="model.pipeline",
        **common,
    )


def _features_or_logits(params, batch, rng, model, hidden: bool):
    """(logits or features, what the experts' routers sowed: {} for a dense model)."""
    if isinstance(model, gpt.GPT):
        return apply_with_dropout(model, {"params": params}, batch["inputs"], rng=rng, return_hidden=hidden), {}
    rngs = None if rng is None else {"dropout": rng}  # the decoder has none; adapters on it may (lora.dropout)
    options = dict(segment_ids_BxL=batch.get("segment_ids"), return_hidden=hidden, mutable=[moe.COLLECTION], rngs=rngs)
    return model.apply({"params": params}, batch["inputs"], **options)


def loss_fn(params, batch, rng, *, model):
    """The next-token loss, plus the routers' weighted losses for experts (their statistics as metrics)."""
    outputs, sown = _features_or_logits(params, batch, rng, model, hidden=bool(model.loss_chunk))
    if model.loss_chunk:
        softcap = 0.0 if isinstance(model, gpt.GPT) else model.logit_softcap
        loss, values = metrics.chunked_next_token_loss(
            outputs, model.head_kernel(params), batch, model.loss_chunk, softcap
        )
    else:
        loss, values = metrics.next_token_loss(outputs, batch)
    router_loss, router_metrics = moe.router_terms(sown, model)  # 0 and {} without experts
    return loss + router_loss, values | router_metrics


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    return metrics.next_token_metrics(_features_or_logits(params, batch, None, model, hidden=False)[0], batch)
