"""BERT-style masked-language-model pre-training on Tiny Shakespeare subwords (for bert_finetune).

  python launch.py --config experiments/bert_pretrain.py:cpu --workdir runs/bert_pretrain_cpu
Reference: Devlin et al. 2019 (BERT) masking: 15% of the tokens are predicted, of those 80%
become [MASK], 10% a random token (a real piece, never padding or a special id), 10% stay.
`:cpu` predicts 40% (`data.mask_rate`; Wettig et al. 2023, "Should you mask 15% in masked
language modeling?"): on a CPU budget the run is starved of predictions, not of context. BERT
publishes no number for this corpus; the result is the MLM curve (eval/accuracy: the masked
pieces recovered) and bert_finetune's gain.
MEASURED `:cpu` (2 layers, 128 wide, 2,000 pieces, 0.68M parameters of which 0.66M encoder, an
untied MLM output matrix of 0.26M more; 64-piece windows, batch 32, 6,400 steps, lr 2e-3 after 100
warm-up steps, cosine to 5%; 2026-11-24, 18 min 28 s on this quiet 2-core CPU): val MLM accuracy
0.279 / 0.336 / 0.363 / 0.371 at steps 1,600 / 3,200 / 4,800 / 6,400 (loss 4.09 / 3.66 / 3.47 / 3.42);
test 0.341 / 3.72 at the end. (A second run of the same config pinned to one core, whose float
sums XLA orders differently: 0.369 / 3.43 at the end.)
Same settings, 1,600 steps (the previous `:cpu`, 7 min): tied embeddings val 0.248 / 4.62, untied
0.274 / 4.16 (test 0.274 / 4.31); untied with whole-word masking (`data.whole_word_masking`, a
harder task: whole names to recall) 0.263 / 4.47; untied with next-sentence prediction
(`model.next_sentence`) 0.118 / 5.87 MLM and 0.62 next-sentence accuracy: at this budget the
half-length contexts and the second loss cost the MLM most of what it learns.
Earlier, tied, 2026-11-23: 15% masked, 1,200 steps val 0.131 / 5.870; 40% masked, 800 steps 0.173 /
5.573; 15% masked, 1,500 steps of 16 x 128 pieces, lr 1e-3 constant 0.172 / 5.611.
For scale: always guessing the most frequent piece is right 0.10 of the time, and the piece
frequencies alone score 6.02 nats (uniform: 7.60). The MLM sits near those for the first few
hundred steps and only then learns to read the context. What bert_finetune gains from it (its
docstring): on shakespeare_acceptability the fine-tuned encoder is right on 0.59 / 0.62 (val /
test, 3 seeds) against 0.49 / 0.46 from scratch, and more pre-training helps (0.54 / 0.60 after
1,600 steps); on shakespeare_speakers it does not beat scratch. The default config (4 x 256,
10,000 steps of 64) is for a GPU; not run here.
`:smoke` (1 layer, 32 wide, 300 pieces) runs in seconds; its loss falls from ~5.6 to ~5.2.
Untied output embeddings (Chung et al. 2021) are `:cpu`'s choice: with BERT's tied ones every
masked position pushes every other piece's input embedding away as a wrong answer; untied, a
piece's input embedding is trained only where the piece is read, and the MLM was better (0.274
against 0.248 at 1,600 steps), and so was transfer to the speakers (val/test 0.378/0.346 against
0.349/0.297, 3 seeds).

Tokens: a sentencepiece BPE vocabulary (`tokenizer.vocab_size` pieces) trained, deterministically,
on the pre-training text, plus [MASK] and [CLS] (and [SEP] with next-sentence pairs); every example
is [CLS] followed by `max_length - 1` pieces, the layout bert_finetune's classifier reads. (Characters were tried
first: a 2-layer MLM on characters sat at the unigram loss for 700 steps, ~3.1 nats, since a
masked character is guessed only once attention has learnt to read its neighbours.)
No leak into bert_finetune: every speech that shakespeare_speakers holds out for validation or
test (with its speaker's name line) is cut from the pre-training text.
What the pre-training sees: the `train` split of tiny_shakespeare (its first 90%) minus every
held-out speech, so about 90% of bert_finetune's 1,032 training speeches, unlabelled, and none of
its validation or test speeches; tiny_shakespeare's own validation split stays unseen, for the
MLM numbers above, and for shakespeare_acceptability's lines, which are cut from it.
The encoder is pre-LayerNorm (Xiong et al. 2020), which trains stably even without warm-up.
Training windows start at every piece offset, shuffled; each window's mask is drawn from
(seed, offset), so a resumed run sees the same masks. Evaluation: the non-overlapping windows of
the validation text, masked from their offsets: the same positions every evaluation.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from research import metrics
from research.config import choose, trainer_config
from research.data import pipeline, text
from research.models import compute_dtype
from research.models.bert import BertEncoder, BertForMaskedLM, BertForPreTraining

def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """A 4-layer, 256-wide encoder (GPU); `:cpu` 2 layers of 128; `:smoke` 1 of 32."""
    config = trainer_config()
    config.data = ml_collections.ConfigDict({
        "name": "tiny_shakespeare",
        "max_eval_windows": 0,  # 0: every window
        "mask_rate": 0.15,  # the share of each window's pieces to predict (BERT's 15%)
        "whole_word_masking": False,  # True: predict every piece of the chosen words (text.mask_tokens)
    })
    config.tokenizer = ml_collections.ConfigDict({"vocab_size": 2000})  # sentencepiece BPE pieces
    config.model = ml_collections.ConfigDict({
        "max_length": 128, "num_layers": 4, "num_heads": 4, "width": 256, "dropout_rate": 0.1, "dtype": "float32",
        "remat": "none",  # transformer.REMAT_POLICIES
        "tie_embeddings": True,  # False: the MLM head has its own output matrix (not transferred)
        # True: BERT's next-sentence prediction too: [CLS] A [SEP] B [SEP], B the text after A or a
        # line from elsewhere, half and half; segment embeddings; the pooler transfers to bert_finetune
        "next_sentence": False,
    })
    config.optimizer.kwargs.b2 = 0.99
    config.update_from_flattened_dict({"optimizer.name": "adam", "optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 0.01})
    config.update_from_flattened_dict({
        "num_steps": 10000, "batch_size": 64, "eval_batch_size": 64, "eval_every": 1000, "checkpoint.every_steps": 1000,
    })
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": CPU, "smoke": SMOKE}))
    return config


# Shared with bert_finetune, whose encoder must have the same shapes.
CPU = {  # 64-piece windows: half the attention, and [CLS] + 63 pieces hold 73% of the speeches whole
    "model.max_length": 64, "model.num_layers": 2, "model.width": 128, "model.dropout_rate": 0.0,
    "model.tie_embeddings": False,  # see the docstring
    "num_steps": 6400, "batch_size": 32, "eval_every": 1600, "checkpoint.every_steps": 1600,
    "optimizer.learning_rate": 2e-3, "optimizer.schedule.name": "warmup_cosine", "optimizer.schedule.warmup_steps": 100,
    "optimizer.schedule.final_fraction": 0.05,
    "data.mask_rate": 0.4,  # 2.7x the predictions per step of 15% (Wettig et al. 2023): see the docstring
}
SMOKE = {
    "tokenizer.vocab_size": 300, "model.max_length": 32, "model.num_layers": 1, "model.num_heads": 2, "model.width": 32,
    "model.dropout_rate": 0.0,
    "data.max_eval_windows": 64, "num_steps": 100, "batch_size": 16, "eval_every": 0, "log_every": 10,
    "optimizer.learning_rate": 3e-3,
}


@functools.lru_cache(maxsize=4)
def tokenizer(vocab_size: int, data_dir: str) -> text.SubwordTokenizer:
    """Sentencepiece BPE trained (deterministically) on the pre-training text; bert_finetune rebuilds the same one."""
    corpus = without_held_out_speeches(text.split_text("tiny_shakespeare", "train", data_dir), data_dir)
    return text.SubwordTokenizer.train(corpus, vocab_size)


def special_ids(config: ml_collections.ConfigDict) -> dict:
    """[MASK], [CLS] (and for next-sentence pairs [SEP]) ids after sentencepiece's, the vocabulary size
    with them, and sentencepiece's reserved ids."""
    pieces = tokenizer(config.tokenizer.vocab_size, config.data_dir)
    size = pieces.vocab_size
    ids = {"mask": size, "cls": size + 1, "vocab_size": size + 2, "reserved": pieces.reserved_ids}
    return ids | ({"sep": size + 2, "vocab_size": size + 3} if config.model.next_sentence else {})


def encode(config: ml_collections.ConfigDict, characters: str) -> np.ndarray:
    """Sentencepiece ids of `characters` under the configured vocabulary."""
    return tokenizer(config.tokenizer.vocab_size, config.data_dir).encode(characters)


def without_held_out_speeches(corpus: str, data_dir: str) -> str:
    """`corpus` minus every block (name line and speech) whose speech shakespeare_speakers holds out."""
    held_out = {record["text"].decode("utf-8") for split in ("validation", "test")
                for record in pipeline.tfds_source("shakespeare_speakers", split, data_dir=data_dir)}
    blocks = [block for block in corpus.split("\n\n") if "\n".join(block.strip("\n").split("\n")[1:]) not in held_out]
    return "\n\n".join(blocks)


def split_tokens(config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """A split's token ids (for tiny_shakespeare, without the held-out speeches)."""
    corpus = text.split_text(config.data.name, split, config.data_dir)
    if config.data.name == "tiny_shakespeare":
        corpus = without_held_out_speeches(corpus, config.data_dir)
    return encode(config, corpus)


def masked_windows(tokens: np.ndarray, starts_B: np.ndarray, *, length: int, seed: int, ids: dict,
                   rate: float = 0.15, word_kinds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """[CLS] + tokens[start : start + length - 1] for each start, BERT-masked from (seed, start)."""
    examples = []
    for start in starts_B:
        window = np.concatenate([[ids["cls"]], tokens[start : start + length - 1]]).astype(np.int32)
        examples.append(text.mask_tokens(window, np.random.default_rng([seed, int(start)]), mask_id=ids["mask"],
                                         vocab_size=ids["mask"], rate=rate, special_ids=(*ids["reserved"], ids["cls"]),
                                         word_kinds=word_kinds))
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


NEXT_SENTENCE_MIN_DISTANCE = 2000  # pieces: a random B comes from at least this far away (another scene)


def sentence_pairs(tokens: np.ndarray, starts_B: np.ndarray, *, length: int, seed: int, ids: dict, newline: int,
                   rate: float = 0.15, word_kinds: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """[CLS] A [SEP] B [SEP] from each start, BERT-masked, with `segments` and `next_label` (1: B follows A).

    A is at most half the window from `start`, cut after its last newline; B fills the rest and
    begins at a line start in both cases (the text right after A, or a line at least
    NEXT_SENTENCE_MIN_DISTANCE pieces away), so only what the lines say tells the two apart."""
    line_starts = np.flatnonzero(tokens[:-length] == newline) + 1
    examples = []
    for start in starts_B:
        rng = np.random.default_rng([seed, int(start)])
        half = (length - 3) // 2
        newlines = np.flatnonzero(tokens[start : start + half] == newline)
        a_end = start + newlines[-1] + 1 if len(newlines) else start + half
        is_next = rng.random() < 0.5
        if is_next:
            b_start = a_end
        else:  # a line start, or where A could not end a line (one line longer than A) anywhere
            candidates = line_starts if len(newlines) else np.arange(len(tokens) - length)
            far = candidates[np.abs(candidates - start) >= NEXT_SENTENCE_MIN_DISTANCE]
            b_start = far[rng.integers(len(far))]
        b_length = length - 3 - (a_end - start)
        pair = np.concatenate([[ids["cls"]], tokens[start:a_end], [ids["sep"]], tokens[b_start : b_start + b_length], [ids["sep"]]])
        example = text.mask_tokens(pair.astype(np.int32), rng, mask_id=ids["mask"], vocab_size=ids["mask"], rate=rate,
                                   special_ids=(*ids["reserved"], ids["cls"], ids["sep"]), word_kinds=word_kinds)
        segments = np.zeros(length, np.int32)
        segments[a_end - start + 2 :] = 1
        examples.append(example | {"segments": segments, "next_label": np.asarray(int(is_next), np.int32)})
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def make_data(config: ml_collections.ConfigDict, split: str):
    """Training: masked windows at every offset, shuffled, endless. Evaluation: non-overlapping windows, once."""
    tokens = split_tokens(config, split)
    length = config.model.max_length
    word_kinds = tokenizer(config.tokenizer.vocab_size, config.data_dir).word_kinds if config.data.whole_word_masking else None
    masking = dict(length=length, seed=config.seed, ids=special_ids(config), rate=config.data.mask_rate, word_kinds=word_kinds)
    if config.model.next_sentence:
        mask = functools.partial(sentence_pairs, tokens, newline=int(encode(config, "\n")[0]), **masking)
    else:
        mask = functools.partial(masked_windows, tokens, **masking)
    if split == "train":
        starts = np.arange(len(tokens) - length + 2)
        return pipeline.array_batches({"start": starts}, batch_size=config.batch_size, seed=config.seed,
                                      transform=lambda batch: mask(batch["start"]))
    starts = np.arange(0, len(tokens) - length + 2, length - 1)[: config.data.max_eval_windows or None]
    source = pipeline.array_source(start=starts)
    return pipeline.eval_batches(source, batch_size=config.eval_batch_size,
                                 transform=lambda record: {key: value[0] for key, value in mask(record["start"][None]).items()})


def make_encoder(config: ml_collections.ConfigDict) -> BertEncoder:
    """The configured encoder: pre-LayerNorm; segment embeddings only for next-sentence pairs."""
    model = config.model
    return BertEncoder(vocab_size=special_ids(config)["vocab_size"], max_length=model.max_length,
                       num_layers=model.num_layers, num_heads=model.num_heads, width=model.width,
                       num_segments=2 if model.next_sentence else 0,
                       dropout_rate=model.dropout_rate, pre_layer_norm=True, dtype=compute_dtype(model.dtype),
                       remat=model.remat)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The configured model."""
    head = BertForPreTraining if config.model.next_sentence else BertForMaskedLM
    return head(encoder=make_encoder(config), tie_embeddings=config.model.tie_embeddings)


def apply(params, batch, rng, *, model) -> jax.Array:
    """Model outputs; dropout only in training (rng given). Padding (id 0) is masked out of attention."""
    rngs = None if rng is None else {"dropout": rng}
    return model.apply({"params": params}, batch["inputs"], batch["inputs"] != text.PAD_ID, batch.get("segments"),
                       deterministic=rng is None, rngs=rngs)


def loss_fn(params, batch, rng, *, model):
    """Cross-entropy over the masked positions of the real examples; their accuracy. With next-sentence
    pairs, plus the next-sentence cross-entropy (BERT's sum of the two)."""
    outputs = apply(params, batch, rng, model=model)
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
    outputs = apply(params, batch, None, model=model)
    logits_BxLxV = outputs[0] if isinstance(outputs, tuple) else outputs
    weights_BxL = batch["weights"] * batch["mask"][:, None]
    results = {
        "loss": metrics.CrossEntropy.from_logits(logits_BxLxV, batch["targets"], weights_BxL),
        "accuracy": metrics.Accuracy.from_logits(logits_BxLxV, batch["targets"], weights_BxL),
    }
    if isinstance(outputs, tuple):
        results["next_sentence_accuracy"] = metrics.Accuracy.from_logits(outputs[1], batch["next_label"], batch["mask"])
    return results


def init_variables(model: nn.Module, rng: jax.Array, batch) -> dict:
    """Variables of the model, initialised with its padding mask."""
    return model.init(rng, batch["inputs"], batch["inputs"] != text.PAD_ID)
