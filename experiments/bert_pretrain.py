"""BERT-style masked-language-model pre-training on Tiny Shakespeare subwords (for bert_finetune).

  python launch.py --config experiments/bert_pretrain.py:cpu --workdir runs/bert_pretrain_cpu
Reference: Devlin et al. 2019 (BERT) masking: 15% of the tokens are predicted, of those 80% become
[MASK], 10% a random token, 10% stay. `:cpu` predicts 40% (Wettig et al. 2023, "Should you mask
15% in masked language modeling?": on a CPU budget the run is starved of predictions, not of
context) with untied output embeddings (Chung et al. 2021). BERT publishes no number for this
corpus; the result is the MLM curve (eval/accuracy: masked pieces recovered) and bert_finetune's
gain. Expected `:cpu` (2 layers of 128, 2,000 pieces, 0.68M parameters, 6,400 steps of 32): val MLM
accuracy ~0.37, loss ~3.42, ~18 min on a 2-core CPU (docs/results.md has the curve and the
options: whole-word masking, next-sentence prediction, tied embeddings). `:smoke` (1 layer of 32,
300 pieces) runs in seconds; its loss falls from ~5.6 to ~5.2.
Data, tokenizer and encoder: research/data/mlm.py. What pre-training sees: tiny_shakespeare's train
split minus every speech shakespeare_speakers holds out (no leak into bert_finetune); the
validation split stays unseen for the MLM numbers.
"""

import jax.numpy as jnp
import ml_collections
import optax

from research import metrics
from research.config import choose, trainer_config
from research.data import mlm
from research.models.bert import BertForMaskedLM, BertForPreTraining

init_variables = mlm.init_variables  # the contract's hook: the model initialised with its padding mask
token_pieces = mlm.pieces  # the hook that labels attention maps with text


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A 4-layer, 256-wide encoder (GPU); `:cpu` 2 layers of 128; `:smoke` 1 of 32."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "name": "tiny_shakespeare",
            "max_eval_windows": 0,  # 0: every window
            "mask_rate": 0.15,  # the share of each window's pieces to predict (BERT's 15%)
            "whole_word_masking": False,  # True: predict every piece of the chosen words (text.mask_tokens)
        }
    )
    config.update(mlm.encoder_config(arg))  # the tokenizer and model sections, shared with bert_finetune
    config.optimizer.kwargs.b2 = 0.99
    config.update_from_flattened_dict(
        {
            "optimizer.name": "adam",
            "optimizer.learning_rate": 1e-3,
            "optimizer.weight_decay": 0.01,
            "num_steps": 10000,
            "batch_size": 64,
            "eval_batch_size": 64,
            "eval_every": 1000,
            "checkpoint.every_steps": 1000,
        }
    )
    cpu = {
        "num_steps": 6400,
        "batch_size": 32,
        "eval_every": 1600,
        "checkpoint.every_steps": 1600,
        "optimizer.learning_rate": 2e-3,
        "optimizer.schedule.name": "warmup_cosine",
        "optimizer.schedule.warmup_steps": 100,
        "optimizer.schedule.final_fraction": 0.05,
        "data.mask_rate": 0.4,  # 2.7x the predictions per step of 15% (Wettig et al. 2023)
    }
    smoke = {
        "data.max_eval_windows": 64,
        "num_steps": 100,
        "batch_size": 16,
        "eval_every": 0,
        "log_every": 10,
        "optimizer.learning_rate": 3e-3,
    }
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": cpu, "smoke": smoke}))
    return config


def make_data(config: ml_collections.ConfigDict, split: str):
    return mlm.mlm_batches(config, split)


def make_model(config: ml_collections.ConfigDict):
    head = BertForPreTraining if config.model.next_sentence else BertForMaskedLM
    return head(encoder=mlm.make_encoder(config), tie_embeddings=config.model.tie_embeddings)


def loss_fn(params, batch, rng, *, model):
    """Cross-entropy over the masked positions of the real examples; their accuracy. With next-sentence
    pairs, plus the next-sentence cross-entropy (BERT's sum of the two)."""
    outputs = mlm.apply(params, batch, rng, model=model)
    logits_BxLxV = outputs[0] if isinstance(outputs, tuple) else outputs
    weights_BxL = batch["weights"] * batch["mask"][:, None]
    nll_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, batch["targets"])
    correct_BxL = (jnp.argmax(logits_BxLxV, -1) == batch["targets"]).astype(jnp.float32)
    loss, aux = metrics.masked_mean(nll_BxL, weights_BxL), {"accuracy": metrics.masked_mean(correct_BxL, weights_BxL)}
    if isinstance(outputs, tuple):
        next_loss, next_aux = metrics.classification_loss(outputs[1], batch["next_label"], batch["mask"])
        loss, aux = loss + next_loss, aux | {"mlm_loss": loss, "next_sentence_accuracy": next_aux["accuracy"]}
    return loss, aux


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    """MLM loss and accuracy pooled over every masked position (and next-sentence accuracy over the pairs)."""
    outputs = mlm.apply(params, batch, None, model=model)
    logits_BxLxV = outputs[0] if isinstance(outputs, tuple) else outputs
    weights_BxL = batch["weights"] * batch["mask"][:, None]
    results = {
        "loss": metrics.CrossEntropy.from_logits(logits_BxLxV, batch["targets"], weights_BxL),
        "accuracy": metrics.Accuracy.from_logits(logits_BxLxV, batch["targets"], weights_BxL),
    }
    if isinstance(outputs, tuple):
        results["next_sentence_accuracy"] = metrics.Accuracy.from_logits(outputs[1], batch["next_label"], batch["mask"])
    return results
