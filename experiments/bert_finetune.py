"""A BERT classifier fine-tuned from bert_pretrain: who speaks this speech (shakespeare_speakers), and
is this line as Shakespeare wrote it (shakespeare_acceptability).

  python launch.py --config experiments/bert_pretrain.py:cpu --workdir runs/bert_pretrain_cpu
  python launch.py --config experiments/bert_finetune.py:cpu --workdir runs/bert_finetune_cpu \
      --config.init_from.workdir=runs/bert_pretrain_cpu            # add --config.freeze=^encoder/ to freeze it
  python launch.py --config experiments/bert_finetune.py:cpu --workdir runs/bert_scratch_cpu   # from scratch
  # the acceptability task: add --config.data.name=shakespeare_acceptability to both
Reference: Devlin et al. 2019 (BERT): a pre-trained encoder fine-tuned with a small head beats
the same network trained from scratch on the labelled data alone.
Protocol (`:cpu`, 0.68M parameters, [CLS] + up to 63 pieces, mean-pooled, 250 steps of 32 with 25
warm-up steps and cosine decay to 10%, evaluated every 25 steps): both arms train the same model
on the same examples for the same steps, the fine-tuned arm from bert_pretrain's `:cpu` checkpoint
(untied embeddings, 6,400 steps, val MLM accuracy 0.371). Each arm's peak lr was picked from
{1e-4, 3e-4, 1e-3} (speakers: {3e-4, 1e-3, 3e-3}) by seed 0's validation accuracy; the test
split chose nothing. Entries: the
final step's val / test accuracy. Each run ~1.5 min on one core of this 2-core CPU. MEASURED 2026-11-24:

shakespeare_acceptability (1,679 / 209 / 209 lines, half corrupted by a word swap or a
replaced word; chance 0.5; a bag of words cannot tell the classes apart):
  arm (lr)                                   seed 0     seed 1     seed 2     mean val / test
  scratch (3e-4)                             .502/.474  .469/.431  .502/.469  .491/.458
  fine-tuned (3e-4)                          .589/.632  .569/.598  .598/.617  .585/.616
  fine-tuned, a second 6,400-step MLM (0.369) .636/.660  .569/.612  .589/.589  .598/.620
  fine-tuned from a 1,600-step MLM (0.274)   .536/.608  .579/.603  .531/.579  .549/.597
TRANSFER WINS: +0.09 val / +0.16 test over scratch, in every seed; a longer pre-training adds
+0.04-0.05 val. Scratch at 1e-4 / 1e-3 (seed 0): .498/.512, .488/.469: 1,679 lines do not teach a
fresh model word order. Fine-tuned at 1e-4 / 1e-3 (seed 0, 1,600-step MLM): .498/.550, .517/.526;
from the second 6,400-step MLM at 1e-3: .598/.560. (The two 6,400-step MLMs are the same config;
XLA sums floats in a different order on one core than on two, and the fine-tuned runs inherit it.)

shakespeare_speakers (8 speakers, 1,032 / 128 / 128 speeches; chance 0.125):
  arm (lr)                                   seed 0     seed 1     seed 2     mean val / test
  scratch (3e-4)                             .391/.352  .359/.406  .406/.438  .385/.399
  fine-tuned, the second 6,400-step MLM (1e-3) .383/.344  .398/.375  .344/.313  .375/.344
  fine-tuned, 1,600-step untied MLM (1e-3)   .367/.336  .359/.352  .406/.352  .378/.346
  fine-tuned, 1,600-step tied MLM (3e-3)     .430/.312  .281/.273  .336/.305  .349/.297
TRANSFER DOES NOT WIN HERE: validation is a tie, test favours scratch (128 speeches: +-0.04 is
noise). Why: the speakers are told apart by their words (names, places, each play's topics); a
bag-of-pieces logistic regression scores 0.445 / 0.398, no better than either arm, and the scratch
model, whose small random blocks leave each piece's embedding in the mean, is such a bag of
learnt embeddings. MLM pre-training at this budget teaches word order and local fit (which is
what the acceptability task asks), not who speaks: scored zero-shot by the MLM head at a
"[MASK]:" name slot before the speech, the pre-trained models name the right speaker 0.16-0.17
of the time (chance 0.125). Also measured on the speakers, seed 0 (val / test): 6,400-step MLM
at lr 3e-4 .281/.313; encoder dropout 0.1 scratch .391/.391, fine-tuned .375/.359; 256 labelled
speeches scratch .320/.234, fine-tuned .320/.227; whole-word-masked MLM .344/.320; the cloze head
(`model.head=cloze`: the MLM head's guess at "\\n\\n[MASK]:\\n" before the speech, over the 8 names'
first pieces; prompt-based fine-tuning as PET / LM-BFF, no new layer) .336/.313; earlier (tied,
2026-11-23): [CLS] pooling, encoder lr scaled 0.3x, weaker MLMs: none won.

The encoder's configuration and tokenizer (the same sentencepiece pieces, retrained identically
from the same text, plus [MASK] and [CLS]) are bert_pretrain's, variant for variant, so a
checkpoint's params["encoder"] fits; `init_from.include` takes the encoder and any head the
classifier shares with pre-training (the cloze head: the whole MLM; `pooling=cls` after
next-sentence pre-training: the pooler); the rest starts at random. An example is [CLS] followed
by the text's first `max_length - 1` pieces, padded (padding is masked out of attention).
`:smoke` trains on 64 examples only, so that 60 steps can fit them.
"""

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax

from experiments import bert_pretrain
from research import metrics
from research.config import ConfigError, choose
from research.data import pipeline, shakespeare_acceptability, shakespeare_speakers, text
from research.models.bert import BertClassifier, BertClozeClassifier


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """bert_pretrain's encoder and tokenizer for the same `arg`, with a classification task and optimizer."""
    config = bert_pretrain.get_config(arg)  # the same encoder, variant for variant
    config.data = ml_collections.ConfigDict({"name": "shakespeare_speakers", "max_train_examples": 0})  # 0: all 1,032
    config.model.classifier_dropout_rate = 0.1
    config.model.pooling = "mean"  # or "cls": the [CLS] state, which MLM pre-training never trains
    # "pooler": BERT's pooler and a new dense layer over the pooled states; "cloze": the MLM head's
    # guess of the speaker's name at a [MASK] slot before the speech (see the docstring)
    config.model.head = "pooler"
    # Adam's defaults (beta2 0.999), not pre-training's 0.99; the encoder's steps scaled by encoder_scale.
    config.optimizer.kwargs = ml_collections.ConfigDict({"encoder_scale": 1.0})
    config.update_from_flattened_dict({
        "optimizer.name": "experiments.bert_finetune:adam_encoder_scaled", "optimizer.learning_rate": 1e-4,
        "optimizer.weight_decay": 0.01,
    })
    config.update_from_flattened_dict({"optimizer.schedule.name": "constant", "optimizer.schedule.warmup_steps": 0})
    config.init_from.include = r"^(encoder|mlm_|pooler)"  # the encoder, and the heads the model shares with pre-training
    config.update_from_flattened_dict({
        "num_steps": 1000, "batch_size": 32, "eval_batch_size": 64, "eval_every": 200, "log_every": 20,
        "checkpoint.every_steps": 500,
    })
    cpu = {  # warm-up, then cosine decay; every evaluation saved, the best by validation accuracy kept
        "num_steps": 250, "eval_every": 25, "optimizer.learning_rate": 3e-4,
        "optimizer.schedule.name": "warmup_cosine", "optimizer.schedule.warmup_steps": 25,
        "optimizer.schedule.final_fraction": 0.1, "checkpoint.best_metric": "eval/accuracy",
    }
    smoke = {  # 64 speeches, 15 passes over them: the loss must fall as the model fits them
        "data.max_train_examples": 64, "num_steps": 60, "batch_size": 16, "eval_every": 0, "log_every": 10,
        "optimizer.learning_rate": 3e-3,
    }
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": cpu, "smoke": smoke}))
    return config


def prompt(config: ml_collections.ConfigDict) -> np.ndarray:
    """What comes between [CLS] and the speech: nothing, or for the cloze head the corpus's own
    name line with the name masked ("\\n\\n[MASK]:\\n")."""
    if config.model.head != "cloze":
        return np.zeros(0, np.int32)
    ids = bert_pretrain.special_ids(config)
    return np.concatenate([bert_pretrain.encode(config, "\n\n"), [ids["mask"]], bert_pretrain.encode(config, ":\n")]).astype(np.int32)


CLASS_NAMES = {"shakespeare_speakers": shakespeare_speakers.SPEAKER_NAMES,
               "shakespeare_acceptability": shakespeare_acceptability.LABEL_NAMES}


def class_names(config: ml_collections.ConfigDict) -> list[str]:
    """The classes of the configured dataset (predict.py prints them)."""
    if config.data.name not in CLASS_NAMES:
        raise ConfigError(f"bert_finetune has no classes for data.name={config.data.name!r}: use one of {', '.join(CLASS_NAMES)}")
    return CLASS_NAMES[config.data.name]


def label_ids(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """Each speaker's label word for the cloze head: the first piece of the name."""
    if config.data.name != "shakespeare_speakers":
        raise ConfigError("model.head=cloze reads a speaker's name: it needs data.name=shakespeare_speakers")
    firsts = tuple(int(bert_pretrain.encode(config, name)[0]) for name in shakespeare_speakers.SPEAKER_NAMES)
    if len(set(firsts)) != len(firsts):
        raise ConfigError(f"speaker names share a first piece under a {config.tokenizer.vocab_size}-piece vocabulary: "
                          "use model.head=pooler or another tokenizer.vocab_size")
    return firsts


def encode(record, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """[CLS] + the prompt (if any) + the speech's first pieces, padded to max_length; its speaker."""
    length = config.model.max_length
    head = np.concatenate([[bert_pretrain.special_ids(config)["cls"]], prompt(config)])
    pieces = bert_pretrain.encode(config, record["text"].decode("utf-8"))[: length - len(head)]
    tokens = np.zeros(length, np.int32)
    tokens[: len(head)] = head
    tokens[len(head) : len(head) + len(pieces)] = pieces
    return {"inputs": tokens, "labels": np.asarray(record["label"], np.int32)}


def make_data(config: ml_collections.ConfigDict, split: str):
    """Encoded speeches: shuffled endless batches for training, one padded pass otherwise."""
    source = pipeline.tfds_source(config.data.name, split, data_dir=config.data_dir)
    columns = pipeline.load_columns(source)  # at most 1,032 speeches: held in memory, gathered a batch at a time
    examples = [encode(dict(text=value, label=label), config)
                for value, label in zip(columns["text"], columns["label"])]
    stacked = {key: np.stack([example[key] for example in examples]) for key in examples[0]}
    if split == "train":
        stacked = {key: column[: config.data.max_train_examples or None] for key, column in stacked.items()}
        return pipeline.array_batches(stacked, batch_size=config.batch_size, seed=config.seed)
    return pipeline.eval_batches(pipeline.array_source(**stacked), batch_size=config.eval_batch_size)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The configured model."""
    if config.model.head == "cloze":  # the [MASK] slot's position: after [CLS], where the prompt has it
        slot = 1 + int(np.flatnonzero(prompt(config) == bert_pretrain.special_ids(config)["mask"])[0])
        return BertClozeClassifier(encoder=bert_pretrain.make_encoder(config), tie_embeddings=config.model.tie_embeddings,
                                   position=slot, label_ids=label_ids(config))
    if config.model.head != "pooler":
        raise ConfigError(f"model.head must be 'pooler' or 'cloze', not {config.model.head!r}")
    return BertClassifier(encoder=bert_pretrain.make_encoder(config), num_classes=len(class_names(config)),
                          dropout_rate=config.model.classifier_dropout_rate, pooling=config.model.pooling)


def adam_encoder_scaled(learning_rate: optax.ScalarOrSchedule, encoder_scale: float = 1.0, b1: float = 0.9,
                        b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam whose steps on params["encoder"] are scaled by encoder_scale: a lower learning rate for the
    pre-trained layers than for the new head (Howard & Ruder 2018's discriminative fine-tuning)."""
    in_encoder = lambda params: {key: key == "encoder" for key in params}
    return optax.chain(optax.adam(learning_rate, b1=b1, b2=b2, eps=eps), optax.masked(optax.scale(encoder_scale), in_encoder))


def loss_fn(params, batch, rng, *, model):
    """Mean cross-entropy over the real examples; their accuracy."""
    logits_BxK = bert_pretrain.apply(params, batch, rng, model=model)
    return metrics.classification_loss(logits_BxK, batch["labels"], batch["mask"])


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    """Loss, accuracy and macro precision / recall / F1 over the real examples."""
    logits_BxK = bert_pretrain.apply(params, batch, None, model=model)
    return metrics.classification_metrics(logits_BxK, batch["labels"], batch["mask"], confusion=True)


def init_variables(model: nn.Module, rng: jax.Array, batch) -> dict:
    """Variables of the classifier, initialised with its padding mask."""
    return bert_pretrain.init_variables(model, rng, batch)
