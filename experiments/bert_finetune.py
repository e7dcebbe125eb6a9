"""A BERT classifier fine-tuned from bert_pretrain: who speaks this speech (shakespeare_speakers), and
is this line as Shakespeare wrote it (shakespeare_acceptability).

  python launch.py --config experiments/bert_pretrain.py:cpu --workdir runs/bert_pretrain_cpu
  python launch.py --config experiments/bert_finetune.py:cpu --workdir runs/bert_finetune_cpu \
      --config.init_from.workdir=runs/bert_pretrain_cpu            # add --config.freeze=^encoder/ to freeze it
  python launch.py --config experiments/bert_finetune.py:cpu --workdir runs/bert_scratch_cpu   # from scratch
  # the acceptability task: add --config.data.name=shakespeare_acceptability to both
Reference: Devlin et al. 2019 (BERT): a pre-trained encoder fine-tuned with a small head beats the
same network trained from scratch on the labelled data alone. Expected (`:cpu`, 250 steps of 32,
~1.5 min a run; mean of 3 seeds, docs/results.md has every arm and ablation): acceptability val /
test accuracy ~0.59 / 0.62 fine-tuned against ~0.49 / 0.46 from scratch; the speakers, a
bag-of-words task, show no gain (~0.38 / 0.34 against 0.39 / 0.40).
The encoder and tokenizer are bert_pretrain's, variant for variant (research/data/mlm.py), so a
checkpoint's params["encoder"] fits; `init_from.include` takes the encoder and any head shared
with pre-training (the cloze head `model.head=cloze` reads the MLM head at a "[MASK]:" name slot
before the speech: prompt-based fine-tuning, no new layer). An example is [CLS] followed by the
text's first `max_length - 1` pieces, padded. `:smoke` trains on 64 examples so 60 steps fit them.
"""

import flax.linen as nn
import ml_collections
import numpy as np

from research import metrics
from research.config import choose, trainer_config
from research.data import mlm, pipeline, shakespeare_acceptability, shakespeare_speakers, text
from research.errors import ConfigError
from research.models.bert import BertClassifier, BertClozeClassifier

init_variables = mlm.init_variables  # the contract's hook: the model initialised with its padding mask
CLASS_NAMES = {
    "shakespeare_speakers": shakespeare_speakers.SPEAKER_NAMES,
    "shakespeare_acceptability": shakespeare_acceptability.LABEL_NAMES,
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """bert_pretrain's encoder and tokenizer for the same `arg`, with a classification task and optimizer."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict({"name": "shakespeare_speakers", "max_train_examples": 0})  # 0: all 1,032
    config.update(mlm.encoder_config(arg))  # the tokenizer and model sections of bert_pretrain's same variant
    config.model.classifier_dropout_rate = 0.1
    config.model.pooling = "mean"  # or "cls": the [CLS] state, which MLM pre-training never trains
    config.model.head = "pooler"  # BERT's pooler and a new dense layer; or "cloze" (see the docstring)
    # Adam's defaults (beta2 0.999); the encoder's steps scaled by `scale` (discriminative fine-tuning).
    config.optimizer.kwargs = ml_collections.ConfigDict({"scale": 1.0})
    config.init_from.include = (
        r"^(encoder|mlm_|pooler)"  # the encoder, and the heads the model shares with pre-training
    )
    config.update_from_flattened_dict(
        {
            "optimizer.name": "discriminative_adam",
            "optimizer.learning_rate": 1e-4,
            "optimizer.weight_decay": 0.01,
            "num_steps": 1000,
            "batch_size": 32,
            "eval_batch_size": 64,
            "eval_every": 200,
            "log_every": 20,
            "checkpoint.every_steps": 500,
        }
    )
    cpu = {  # warm-up, then cosine decay; every evaluation saved, the best by validation accuracy kept
        "num_steps": 250,
        "eval_every": 25,
        "optimizer.learning_rate": 3e-4,
        "optimizer.schedule.name": "warmup_cosine",
        "optimizer.schedule.warmup_steps": 25,
        "optimizer.schedule.final_fraction": 0.1,
        "checkpoint.best_metric": "eval/accuracy",
    }
    smoke = {  # 64 speeches, 15 passes over them: the loss must fall as the model fits them
        "data.max_train_examples": 64,
        "num_steps": 60,
        "batch_size": 16,
        "eval_every": 0,
        "log_every": 10,
        "optimizer.learning_rate": 3e-3,
    }
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": cpu, "smoke": smoke}))
    return config


def prompt(config: ml_collections.ConfigDict) -> np.ndarray:
    """What comes between [CLS] and the speech: nothing, or for the cloze head the corpus's own
    name line with the name masked ("\\n\\n[MASK]:\\n")."""
    if config.model.head != "cloze":
        return np.zeros(0, np.int32)
    mask_id = mlm.special_ids(config)["mask"]
    return np.concatenate([mlm.encode(config, "\n\n"), [mask_id], mlm.encode(config, ":\n")]).astype(np.int32)


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    if config.data.name not in CLASS_NAMES:
        raise ConfigError(
            f"bert_finetune has no classes for data.name={config.data.name!r}: use one of {', '.join(CLASS_NAMES)}"
        )
    return CLASS_NAMES[config.data.name]


def label_ids(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Each speaker's label word for the cloze head: the first piece of the name."""
    if config.data.name != "shakespeare_speakers":
        raise ConfigError("model.head=cloze reads a speaker's name: it needs data.name=shakespeare_speakers")
    firsts = tuple(int(mlm.encode(config, name)[0]) for name in shakespeare_speakers.SPEAKER_NAMES)
    if len(set(firsts)) != len(firsts):
        raise ConfigError(
            f"speaker names share a first piece under a {config.tokenizer.vocab_size}-piece vocabulary: "
            "use model.head=pooler or another tokenizer.vocab_size"
        )
    return firsts


def encode(record, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """[CLS] + the prompt (if any) + the speech's first pieces, padded to max_length; its label."""
    length = config.model.max_length
    head = np.concatenate([[mlm.special_ids(config)["cls"]], prompt(config)])
    pieces = mlm.encode(config, record["text"].decode("utf-8"))[: length - len(head)]
    tokens = np.zeros(length, np.int32)
    tokens[: len(head)] = head
    tokens[len(head) : len(head) + len(pieces)] = pieces
    return {"inputs": tokens, "labels": np.asarray(record["label"], np.int32)}


def make_data(config: ml_collections.ConfigDict, split: str):
    """Encoded speeches (at most 1,032, held in memory): shuffled endless batches for training, else one padded pass."""
    columns = pipeline.load_columns(pipeline.tfds_source(config.data.name, split, data_dir=config.data_dir))
    examples = [
        encode(dict(text=value, label=label), config) for value, label in zip(columns["text"], columns["label"])
    ]
    stacked = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    if split == "train":
        stacked = {key: column[: config.data.max_train_examples or None] for key, column in stacked.items()}
        return pipeline.array_batches(stacked, batch_size=config.batch_size, seed=config.seed)
    return pipeline.eval_batches(pipeline.array_source(**stacked), batch_size=config.eval_batch_size)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    if config.model.head == "cloze":  # the [MASK] slot's position: after [CLS], where the prompt has it
        slot = 1 + int(np.flatnonzero(prompt(config) == mlm.special_ids(config)["mask"])[0])
        return BertClozeClassifier(
            encoder=mlm.make_encoder(config),
            tie_embeddings=config.model.tie_embeddings,
            position=slot,
            label_ids=label_ids(config),
        )
    if config.model.head != "pooler":
        raise ConfigError(f"model.head must be 'pooler' or 'cloze', not {config.model.head!r}")
    return BertClassifier(
        encoder=mlm.make_encoder(config),
        num_classes=len(class_names(config)),
        dropout_rate=config.model.classifier_dropout_rate,
        pooling=config.model.pooling,
    )


def logits_fn(variables, inputs, *, model):
    """The prediction for a batch of token ids: padding masked out of attention, as in training."""
    return model.apply(variables, inputs, inputs != text.PAD_ID)


token_pieces = mlm.pieces  # the hook that labels attention maps and token attributions with text


def loss_fn(params, batch, rng, *, model):
    return metrics.classification_loss(mlm.apply(params, batch, rng, model=model), batch["labels"], batch["mask"])


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    """Loss, accuracy and macro precision / recall / F1 over the real examples."""
    logits_BxK = mlm.apply(params, batch, None, model=model)
    return metrics.classification_metrics(logits_BxK, batch["labels"], batch["mask"], confusion=True)
