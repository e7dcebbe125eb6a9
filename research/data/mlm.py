"""Masked-language-model data on Tiny Shakespeare for the BERT experiments: the sentencepiece
vocabulary, BERT's masking over windows, next-sentence pairs, and the encoder (its shape per
variant, how it reads a batch), shared by bert_pretrain and bert_finetune so that a pre-trained
encoder fits the classifier.

The tokenizer is a sentencepiece BPE (`tokenizer.vocab_size` pieces) trained deterministically on
the pre-training text (tiny_shakespeare's train split minus every speech that
shakespeare_speakers holds out), plus [MASK] and [CLS] (and [SEP] with next-sentence pairs).
Every example is [CLS] followed by `max_length - 1` pieces. A window's mask is drawn from
(seed, offset), so a resumed run and every evaluation see the same masks.
"""

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from research.data import pipeline, text
from research.errors import ConfigError
from research.models import apply_with_dropout, compute_dtype
from research.models.bert import BertEncoder

NEXT_SENTENCE_MIN_DISTANCE = 2000  # pieces: a random B comes from at least this far away (another scene)

# The encoder and tokenizer of each variant: pre-training and fine-tuning must agree on them.
ENCODERS = {
    None: {},  # the GPU config: 4 layers of 256, 128-piece windows, 2,000 pieces
    "cpu": {
        "model.max_length": 64,
        "model.num_layers": 2,
        "model.width": 128,
        "model.dropout_rate": 0.0,
        "model.tie_embeddings": False,
    },  # untied output embeddings: see bert_pretrain's docstring
    "smoke": {
        "tokenizer.vocab_size": 300,
        "model.max_length": 32,
        "model.num_layers": 1,
        "model.num_heads": 2,
        "model.width": 32,
        "model.dropout_rate": 0.0,
    },
}


def encoder_config(variant: str | None) -> ml_collections.ConfigDict:
    """The `tokenizer` and `model` config sections of the BERT encoder for a variant (None, "cpu", "smoke")."""
    config = ml_collections.ConfigDict(
        {
            "tokenizer": {"vocab_size": 2000},  # sentencepiece BPE pieces
            "model": {
                "max_length": 128,
                "num_layers": 4,
                "num_heads": 4,
                "width": 256,
                "dropout_rate": 0.1,
                "dtype": "float32",
                "remat": "none",  # transformer.REMAT_POLICIES
                "tie_embeddings": True,  # False: the MLM head has its own output matrix (not transferred)
                # True: BERT's next-sentence prediction too: [CLS] A [SEP] B [SEP], B the text after A or a line
                # from elsewhere, half and half; segment embeddings; the pooler transfers to a classifier
                "next_sentence": False,
            },
        }
    )
    if variant not in ENCODERS:
        raise ConfigError(f"unknown config variant {variant!r}: use no ':arg' or one of 'cpu', 'smoke'")
    config.update_from_flattened_dict(ENCODERS[variant])
    return config


@functools.lru_cache(maxsize=4)
def tokenizer(vocab_size: int, data_dir: str) -> text.SubwordTokenizer:
    """Sentencepiece BPE trained (deterministically) on the pre-training text."""
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


def pieces(config: ml_collections.ConfigDict, ids) -> list[str]:
    """Each id's text: its sentencepiece piece, or [PAD], [MASK], [CLS], [SEP]."""
    specials = {
        value: f"[{name.upper()}]" for name, value in special_ids(config).items() if name in ("mask", "cls", "sep")
    }
    specials[text.PAD_ID] = "[PAD]"
    pieces_of = tokenizer(config.tokenizer.vocab_size, config.data_dir)
    return [specials.get(int(i)) or pieces_of.piece(int(i)) for i in ids]


def without_held_out_speeches(corpus: str, data_dir: str) -> str:
    """`corpus` minus every block (name line and speech) whose speech shakespeare_speakers holds out."""
    held_out = {
        record["text"].decode("utf-8")
        for split in ("validation", "test")
        for record in pipeline.tfds_source("shakespeare_speakers", split, data_dir=data_dir)
    }
    blocks = [block for block in corpus.split("\n\n") if "\n".join(block.strip("\n").split("\n")[1:]) not in held_out]
    return "\n\n".join(blocks)


def split_tokens(config: ml_collections.ConfigDict, split: str) -> np.ndarray:
    """A split's token ids (for tiny_shakespeare, without the held-out speeches)."""
    corpus = text.split_text(config.data.name, split, config.data_dir)
    if config.data.name == "tiny_shakespeare":
        corpus = without_held_out_speeches(corpus, config.data_dir)
    return encode(config, corpus)


def masked_windows(
    tokens: np.ndarray,
    starts_B: np.ndarray,
    *,
    length: int,
    seed: int,
    ids: dict,
    rate: float = 0.15,
    word_kinds: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """[CLS] + tokens[start : start + length - 1] for each start, BERT-masked from (seed, start)."""
    examples = []
    for start in starts_B:
        window = np.concatenate([[ids["cls"]], tokens[start : start + length - 1]]).astype(np.int32)
        examples.append(
            text.mask_tokens(
                window,
                np.random.default_rng([seed, int(start)]),
                mask_id=ids["mask"],
                vocab_size=ids["mask"],
                rate=rate,
                special_ids=(*ids["reserved"], ids["cls"]),
                word_kinds=word_kinds,
            )
        )
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def sentence_pairs(
    tokens: np.ndarray,
    starts_B: np.ndarray,
    *,
    length: int,
    seed: int,
    ids: dict,
    newline: int,
    rate: float = 0.15,
    word_kinds: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
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
        pair = np.concatenate(
            [[ids["cls"]], tokens[start:a_end], [ids["sep"]], tokens[b_start : b_start + b_length], [ids["sep"]]]
        )
        example = text.mask_tokens(
            pair.astype(np.int32),
            rng,
            mask_id=ids["mask"],
            vocab_size=ids["mask"],
            rate=rate,
            special_ids=(*ids["reserved"], ids["cls"], ids["sep"]),
            word_kinds=word_kinds,
        )
        segments = np.zeros(length, np.int32)
        segments[a_end - start + 2 :] = 1
        examples.append(example | {"segments": segments, "next_label": np.asarray(int(is_next), np.int32)})
    return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def mlm_batches(config: ml_collections.ConfigDict, split: str):
    """Training: masked windows at every offset, shuffled, endless. Evaluation: non-overlapping windows, once."""
    tokens = split_tokens(config, split)
    length = config.model.max_length
    word_kinds = (
        tokenizer(config.tokenizer.vocab_size, config.data_dir).word_kinds if config.data.whole_word_masking else None
    )
    masking = dict(
        length=length, seed=config.seed, ids=special_ids(config), rate=config.data.mask_rate, word_kinds=word_kinds
    )
    if config.model.next_sentence:
        mask = functools.partial(sentence_pairs, tokens, newline=int(encode(config, "\n")[0]), **masking)
    else:
        mask = functools.partial(masked_windows, tokens, **masking)
    if split == "train":
        starts = np.arange(len(tokens) - length + 2)
        return pipeline.array_batches(
            {"start": starts},
            batch_size=config.batch_size,
            seed=config.seed,
            transform=lambda batch: mask(batch["start"]),
        )
    starts = np.arange(0, len(tokens) - length + 2, length - 1)[: config.data.max_eval_windows or None]
    source = pipeline.array_source(start=starts)
    return pipeline.eval_batches(
        source,
        batch_size=config.eval_batch_size,
        transform=lambda record: {key: value[0] for key, value in mask(record["start"][None]).items()},
    )


def make_encoder(config: ml_collections.ConfigDict) -> BertEncoder:
    """The configured encoder: pre-LayerNorm (Xiong et al. 2020); segment embeddings only for next-sentence pairs."""
    model = config.model
    return BertEncoder(
        vocab_size=special_ids(config)["vocab_size"],
        max_length=model.max_length,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        width=model.width,
        num_segments=2 if model.next_sentence else 0,
        dropout_rate=model.dropout_rate,
        pre_layer_norm=True,
        dtype=compute_dtype(model.dtype),
        remat=model.remat,
    )


def apply(params, batch, rng, *, model: nn.Module):
    """A BERT model's outputs on a batch; dropout only in training (rng given); padding is masked out of attention."""
    mask_BxL = batch["inputs"] != text.PAD_ID
    return apply_with_dropout(model, {"params": params}, batch["inputs"], mask_BxL, batch.get("segments"), rng=rng)


def init_variables(model: nn.Module, rng: jax.Array, batch) -> dict:
    """A BERT model's variables, initialised with its padding mask."""
    return model.init(rng, batch["inputs"], batch["inputs"] != text.PAD_ID)
