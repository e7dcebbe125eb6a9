"""Character-level LSTM (or GRU) language model on Tiny Shakespeare, next to shakespeare_gpt.

  python launch.py --config experiments/shakespeare_lstm.py:cpu --workdir runs/lstm_cpu
  python launch.py --config experiments/shakespeare_lstm.py:cpu --workdir runs/gru_cpu \
      --config.model.cell=gru --config.model.width=254
Reference: char-rnn (Karpathy 2015) trains 2-3 layer LSTMs of 128-512 units on this corpus and
publishes no validation number for it, so the comparison is shakespeare_gpt at the same parameter
count and budget. `:cpu` is shakespeare_gpt's `:cpu` in every respect but the model (64-character
windows, state reset per window, batch 12, 2,000 steps, the GPT's AdamW and schedule) and the lr
(2e-3, char-rnn's default): a 2-layer LSTM of 220 units, 0.81M parameters against the GPT's
0.80M. Expected: val loss ~1.67 against the GPT's 1.886, ~3.5 min on a 2-core CPU (docs/results.md).
The default config matches shakespeare_gpt's default (10.7M parameters: 2 x 816 units). The GRU
at a matched count: width 254. `:smoke` (1 layer of 64, 100 steps) reaches val loss ~2.45.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from research import metrics
from research.config import NANOGPT_OPTIMIZER, choose, trainer_config
from research.data import text
from research.models import apply_with_dropout, compute_dtype, param_count
from research.models.rnn import RecurrentLM


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """shakespeare_gpt's data, optimizer and evaluation schedule with a recurrent model of the GPT's size."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict({"name": "tiny_shakespeare", "block_size": 256, "max_eval_windows": 0})
    config.model = ml_collections.ConfigDict(
        {
            "cell": "lstm",  # or "gru"
            "num_layers": 2,
            "width": 816,
            "embedding_dim": 0,
            "dropout_rate": 0.2,
            "dtype": "float32",  # embedding_dim 0: width
        }
    )
    config.optimizer.kwargs.b2 = 0.99
    config.update_from_flattened_dict(
        NANOGPT_OPTIMIZER
        | {
            "num_steps": 5000,
            "batch_size": 64,
            "eval_batch_size": 64,
            "log_every": 50,
            "eval_every": 250,
            "checkpoint.every_steps": 1000,
        }
    )
    cpu = {
        "data.block_size": 64,
        "model.width": 220,
        "model.dropout_rate": 0.0,
        "num_steps": 2000,
        "batch_size": 12,
        "eval_every": 500,
        "optimizer.learning_rate": 2e-3,
    }
    smoke = {
        "data.block_size": 32,
        "data.max_eval_windows": 64,
        "model.num_layers": 1,
        "model.width": 64,
        "model.dropout_rate": 0.0,
        "num_steps": 100,
        "batch_size": 16,
        "eval_every": 0,
        "log_every": 10,
        "optimizer.learning_rate": 1e-2,
    }
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": cpu, "smoke": smoke}))
    return config


def make_data(config: ml_collections.ConfigDict, split: str):
    return text.char_lm_batches(config, split)


encode_text, decode_tokens = text.encode_chars, text.decode_chars  # the language model's hooks: characters


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    return RecurrentLM(
        vocab_size=text.char_corpus(config.data.name, config.data_dir)[0].vocab_size,
        width=config.model.width,
        num_layers=config.model.num_layers,
        cell=config.model.cell,
        embedding_dim=config.model.embedding_dim or None,
        dropout_rate=config.model.dropout_rate,
        dtype=compute_dtype(config.model.dtype),
    )


def parameter_count(config: ml_collections.ConfigDict) -> int:
    """Parameters of the configured model (shapes only, nothing allocated)."""
    tokens = jnp.zeros((1, config.data.block_size), jnp.int32)
    return param_count(jax.eval_shape(make_model(config).init, jax.random.PRNGKey(0), tokens))


def loss_fn(params, batch, rng, *, model):
    logits_BxLxV = apply_with_dropout(model, {"params": params}, batch["inputs"], rng=rng)
    return metrics.next_token_loss(logits_BxLxV, batch)


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    return metrics.next_token_metrics(model.apply({"params": params}, batch["inputs"]), batch)
