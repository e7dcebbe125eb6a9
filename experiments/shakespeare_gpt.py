"""Character-level GPT language model on Tiny Shakespeare (nanoGPT's shakespeare_char setup).

  python launch.py --config experiments/shakespeare_gpt.py:cpu --workdir runs/gpt_cpu
  python launch.py --config experiments/shakespeare_gpt.py --workdir runs/gpt      # one GPU
Expected (nanoGPT's README, github.com/karpathy/nanoGPT): the default config (6 layers, 6 heads,
384 wide, block 256, batch 64, dropout 0.2, 5,000 iterations) reaches val loss 1.47; `:cpu` (4
layers, 4 heads, 128 wide, block 64, batch 12, 2,000 iterations, dropout 0) ~1.88: measured 1.886
in ~4.5 min on a 2-core CPU (docs/results.md). `:smoke` (1 layer, 64 wide, 150 steps, seconds)
falls from ln(66) ~ 4.2 to val loss ~2.9.
Data: the 66-symbol character vocabulary of the whole corpus (65 characters + padding); training
windows start at every offset of the train split, shuffled (nanoGPT draws random offsets);
evaluation reads the validation (test) text once in non-overlapping windows, every character
scored once. Optimizer: nanoGPT's AdamW (beta2 0.99, decoupled weight decay 0.1 on weights and
embeddings), lr 1e-3 after a 100-step warm-up, cosine to 1e-4, gradients clipped at norm 1.0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from research import metrics, perf
from research.config import NANOGPT_OPTIMIZER, choose, trainer_config
from research.data import text
from research.experiment import Reference
from research.models import apply_with_dropout, compute_dtype, param_count
from research.models.gpt import GPT

NANOGPT = "nanoGPT README (github.com/karpathy/nanoGPT), shakespeare_char"
REFERENCES = (
    Reference(
        config=None,
        metric="eval/loss",
        value=1.47,
        tolerance=0.03,
        better="min",
        source=NANOGPT + ", one GPU",
        kind="published",
    ),
    Reference(
        config="cpu",
        metric="eval/loss",
        value=1.88,
        tolerance=0.05,
        better="min",
        source=NANOGPT + ", CPU run (~1.88)",
        kind="published",
    ),
    Reference(
        config="smoke",
        metric="eval/loss",
        value=2.9,
        tolerance=0.15,
        better="min",
        source="this repository's smoke run (a regression guard, not a paper number)",
        kind="ours",
    ),
)


CPU = {  # nanoGPT's README CPU run
    "data.block_size": 64,
    "model.num_layers": 4,
    "model.num_heads": 4,
    "model.width": 128,
    "model.dropout_rate": 0.0,
    "num_steps": 2000,
    "batch_size": 12,
    "eval_every": 500,
}
SMOKE = {
    "data.block_size": 32,
    "data.max_eval_windows": 64,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.width": 64,
    "model.dropout_rate": 0.0,
    "num_steps": 150,
    "batch_size": 16,
    "eval_every": 0,
    "log_every": 10,
    "optimizer.learning_rate": 1e-2,
    "optimizer.schedule.warmup_steps": 10,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """nanoGPT's shakespeare_char GPU config; `:cpu` its CPU run, `:smoke` a few seconds."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "name": "tiny_shakespeare",
            "block_size": 256,  # characters per window, the model's context
            "max_eval_windows": 0,  # 0: the whole validation / test text; >0: only its first N windows
        }
    )
    config.model = ml_collections.ConfigDict(
        {
            "num_layers": 6,
            "num_heads": 6,
            "width": 384,
            "dropout_rate": 0.2,
            "use_bias": False,
            "dtype": "float32",
            "remat": "none",  # compute dtype (bfloat16: mixed precision); transformer.REMAT_POLICIES
        }
    )
    config.optimizer.kwargs.b2 = 0.99
    config.update_from_flattened_dict(
        NANOGPT_OPTIMIZER  # weight decay on weights and embeddings, not biases or norms
        | {
            "num_steps": 5000,
            "batch_size": 64,
            "eval_batch_size": 64,
            "log_every": 50,
            "eval_every": 250,
            "checkpoint.every_steps": 1000,
        }
    )
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": CPU, "smoke": SMOKE}))
    return config


def vocab_size(config: ml_collections.ConfigDict) -> int:
    """Characters of the corpus plus padding (66 for Tiny Shakespeare)."""
    return text.char_corpus(config.data.name, config.data_dir)[0].vocab_size


def make_data(config: ml_collections.ConfigDict, split: str):
    return text.char_lm_batches(config, split)


encode_text, decode_tokens = text.encode_chars, text.decode_chars  # the language model's hooks: characters


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    return GPT(
        vocab_size=vocab_size(config),
        block_size=config.data.block_size,
        dtype=compute_dtype(config.model.dtype),
        num_layers=config.model.num_layers,
        num_heads=config.model.num_heads,
        width=config.model.width,
        dropout_rate=config.model.dropout_rate,
        use_bias=config.model.use_bias,
        remat=config.model.remat,
    )


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of the configured model (shapes only, nothing allocated)."""
    tokens = jnp.zeros((1, config.data.block_size), jnp.int32)
    return param_count(jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), tokens))


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
    return config.data.block_size


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one window: 6 N per token plus attention (research/perf.py)."""
    model = config.model
    per_token = perf.gpt_training_flops_per_token(
        parameter_count(config), model.num_layers, model.width, config.data.block_size
    )
    return config.data.block_size * per_token


def loss_fn(params, batch, rng, *, model):
    logits_BxLxV = apply_with_dropout(model, {"params": params}, batch["inputs"], rng=rng)
    return metrics.next_token_loss(logits_BxLxV, batch)


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    return metrics.next_token_metrics(model.apply({"params": params}, batch["inputs"]), batch)
