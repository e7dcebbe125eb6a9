"""Text for language models: tokenizers, a character corpus, training windows and their batches,
sequence packing and MLM masking.

Legend: L sequence length. Token ids are int32. Both tokenizers reserve id 0 for padding so
packed and masked batches can use 0 as "nothing here".
"""

import dataclasses
import functools
import io
from typing import Callable, Sequence

import ml_collections
import numpy as np
import sentencepiece
import tokenizers

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """One id per distinct character of the text it was built from; 0 is padding."""

    characters: str

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.characters) + 1

    def encode(self, text: str) -> np.ndarray:
        """int32 ids; a character not in the vocabulary is an error naming it."""
        table = {character: index + 1 for index, character in enumerate(self.characters)}
        try:
            return np.array([table[character] for character in text], dtype=np.int32)
        except KeyError as error:
            raise ValueError(f"character {error.args[0]!r} is not in this tokenizer's vocabulary") from None

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.characters[index - 1] for index in ids if index != PAD_ID)


WORD_CONTINUES, WORD_BEGINS, WORD_ALONE = 0, 1, 2  # SubwordTokenizer.word_kinds


class SubwordTokenizer:
    """A sentencepiece BPE model trained from text, kept as its serialized bytes (Kudo & Richardson, 2018).

    Whitespace is kept as is and newline is a token of its own, so decode(encode(text)) == text.
    """

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> "SubwordTokenizer":
        """Trains deterministically (one thread) on the lines of `text`."""
        model = io.BytesIO()
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=iter(text.split("\n")),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            user_defined_symbols=["\n"],
            pad_id=PAD_ID,
            unk_id=1,
            bos_id=2,
            eos_id=3,
            num_threads=1,
            minloglevel=2,
        )
        return cls(model.getvalue())

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    def piece(self, i: int) -> str:
        """Id `i`'s piece as text (sentencepiece's word-start mark shown as a space)."""
        return self._processor.id_to_piece(int(i)).replace("\u2581", " ")

    @property
    def reserved_ids(self) -> tuple[int, ...]:
        """Ids that never stand for text: padding, unknown, begin and end of sentence."""
        processor = self._processor
        return tuple(i for i in range(self.vocab_size) if processor.is_control(i) or processor.is_unknown(i))

    @property
    def word_kinds(self) -> np.ndarray:
        """Per id, for whole-word masking: WORD_BEGINS (the piece starts with whitespace), WORD_ALONE
        (newline, reserved ids: a word of their own, the next piece begins another) or WORD_CONTINUES."""
        processor = self._processor

        def kind(i: int) -> int:
            piece = processor.id_to_piece(i)
            if piece == "\n" or processor.is_control(i) or processor.is_unknown(i):
                return WORD_ALONE
            return WORD_BEGINS if piece.startswith("\u2581") else WORD_CONTINUES

        return np.array([kind(i) for i in range(self.vocab_size)], np.int8)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self._processor.encode(text), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._processor.decode([int(index) for index in ids if index != PAD_ID])


class ByteLevelTokenizer:
    """A Hugging Face `tokenizers` tokenizer: a model's tokenizer.json, or a byte-level BPE (GPT-2's
    scheme, Radford et al. 2019) trained here from text. Every byte has an id, so any text encodes."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str) -> "ByteLevelTokenizer":
        return cls(tokenizers.Tokenizer.from_file(path))

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: Sequence[str] = ("<pad>",)) -> "ByteLevelTokenizer":
        """A byte-level BPE of `vocab_size` ids learned from `text` (deterministic); the special tokens come
        first (id 0 is <pad>)."""
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
        return cls(tokenizer)

    def save(self, path: str) -> None:
        """Writes tokenizer.json (what `tokenizers` and transformers' PreTrainedTokenizerFast load)."""
        self.tokenizer.save(path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.array(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(index) for index in ids])


@dataclasses.dataclass(frozen=True)
class WindowSource:
    """Random-access language-model examples cut from one long token array.

    Example i is tokens[i * stride : i * stride + length + 1], split into inputs and targets
    (the next token); by default windows do not overlap.
    """

    tokens: np.ndarray
    length: int
    stride: int = 0

    def __len__(self) -> int:
        step = self.stride or self.length
        return max(0, (len(self.tokens) - self.length - 1) // step + 1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * (self.stride or self.length)
        window = self.tokens[start : start + self.length + 1]
        return {"inputs": window[:-1], "targets": window[1:]}


def window_columns(tokens: np.ndarray, length: int, stride: int = 0) -> tuple[dict[str, np.ndarray], Callable]:
    """The windows of `WindowSource` for `pipeline.array_batches`: start offsets plus a batch gather.

    Returns `({"start": starts_N}, transform)`; the transform turns a batch of starts into
    `inputs_BxL` and `targets_BxL` with one numpy gather instead of one Python call per window.
    """
    windows = WindowSource(tokens, length, stride)
    starts = np.arange(len(windows), dtype=np.int64) * (stride or length)
    offsets = np.arange(length + 1)

    def gather(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        window_BxL1 = tokens[batch["start"][:, None] + offsets]
        return {"inputs": window_BxL1[:, :-1], "targets": window_BxL1[:, 1:]}

    return {"start": starts}, gather


def pack(documents: Sequence[np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Packs token sequences into rows of `length`, in order, each row filled before the next starts.

    A document longer than a row continues in the next one. Returns `tokens_NxL`,
    `segment_ids_NxL` (1, 2, ... per document within a row, 0 padding) and `positions_NxL`
    (position within the document piece), the layout attention masks need.
    """
    tokens, segments, positions = [], [], []
    row_tokens, row_segments, row_positions = [], [], []

    def finish_row():
        padding = length - len(row_tokens)
        tokens.append(row_tokens + [PAD_ID] * padding)
        segments.append(row_segments + [0] * padding)
        positions.append(row_positions + [0] * padding)

    for document in documents:
        document = [int(token) for token in document]
        while document:
            if len(row_tokens) == length:
                finish_row()
                row_tokens, row_segments, row_positions = [], [], []
            piece = document[: length - len(row_tokens)]
            document = document[len(piece) :]
            segment = (row_segments[-1] if row_segments else 0) + 1
            row_tokens += piece
            row_segments += [segment] * len(piece)
            row_positions += list(range(len(piece)))
    if row_tokens:
        finish_row()
    as_array = lambda rows: np.array(rows, dtype=np.int32).reshape(-1, length)
    return {"tokens": as_array(tokens), "segment_ids": as_array(segments), "positions": as_array(positions)}


def mask_tokens(
    tokens_L: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_id: int,
    vocab_size: int,
    rate: float = 0.15,
    special_ids: Sequence[int] = (PAD_ID,),
    word_kinds: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """BERT masking (Devlin et al., 2019): pick `rate` of the non-special tokens to predict;
    of those 80% become `mask_id`, 10% a random token, 10% stay as they are.

    With `word_kinds` (per token id: WORD_CONTINUES, WORD_BEGINS or WORD_ALONE, see
    `SubwordTokenizer.word_kinds`) whole words are picked
    (BERT's whole-word masking; Cui et al. 2021): every piece of a chosen word is predicted, so
    a name cut into pieces must be recalled from its context, not completed from its own first
    piece. Words are taken in random order while they fit in the `rate` budget (at least one).
    A random token is drawn uniformly from the ids below `vocab_size` that are neither special
    nor `mask_id`: padding there would be hidden from attention, a [CLS] or [MASK] would say "predict me".
    Returns `inputs`, `targets` (the original tokens) and `weights` (1 where a prediction counts).
    """
    candidates = np.flatnonzero(~np.isin(tokens_L, special_ids))
    count = min(len(candidates), max(1, round(rate * len(candidates)))) if len(candidates) else 0
    if word_kinds is None or not count:
        chosen = rng.permutation(candidates)[:count]
    else:  # a word starts at a word-beginning piece, after a word-alone piece or after a gap (a special token, an edge)
        kinds = word_kinds[tokens_L[candidates]]
        after_alone = np.concatenate([[False], kinds[:-1] == WORD_ALONE])
        starts = (kinds != WORD_CONTINUES) | after_alone | (np.diff(candidates, prepend=-2) != 1)
        words = np.split(candidates, np.flatnonzero(starts)[1:])
        order = rng.permutation(len(words))
        lengths = np.array([len(words[i]) for i in order])
        taken = max(1, int(np.searchsorted(np.cumsum(lengths), count, side="right")))
        chosen = np.concatenate([words[i] for i in order[:taken]])
    action = rng.random(len(chosen))
    inputs = tokens_L.copy()
    inputs[chosen[action < 0.8]] = mask_id
    randomized = chosen[(action >= 0.8) & (action < 0.9)]
    replacements = np.setdiff1d(np.arange(vocab_size), [*special_ids, mask_id])
    if len(randomized) and not len(replacements):
        raise ValueError(f"no token below vocab_size {vocab_size} is free to be a random replacement")
    if len(randomized):
        inputs[randomized] = rng.choice(replacements, size=len(randomized))
    weights = np.zeros(tokens_L.shape, np.float32)
    weights[chosen] = 1.0
    return {"inputs": inputs.astype(np.int32), "targets": tokens_L.astype(np.int32), "weights": weights}


def split_text(name: str, split: str, data_dir: str | None = None) -> str:
    """The whole text of a one-example-per-split dataset such as `tiny_shakespeare`."""
    from research.data import catalog  # imported here: catalog imports every builder, text needs none

    return catalog.source(name, split, data_dir)[0]["text"].decode("utf-8")


@functools.lru_cache(maxsize=4)  # three splits, read and encoded once per process
def char_corpus(name: str, data_dir: str) -> tuple[CharTokenizer, dict[str, np.ndarray]]:
    """The character tokenizer of a one-text-per-split dataset (all its splits) and each split's token ids."""
    splits = {split: split_text(name, split, data_dir) for split in ("train", "validation", "test")}
    tokenizer = CharTokenizer.from_text("".join(splits.values()))
    return tokenizer, {split: tokenizer.encode(characters) for split, characters in splits.items()}


@functools.cache
def token_corpus(name: str, data_dir: str, tokenizer: str) -> tuple[object, dict[str, np.ndarray]]:
    """The tokenizer `tokenizer` names and each split's ids: "chars" (char_corpus), "bpe:N" (a byte-level
    BPE of N ids trained on the train split) or the path of a tokenizer.json."""
    if tokenizer == "chars":
        return char_corpus(name, data_dir)
    splits = {split: split_text(name, split, data_dir) for split in ("train", "validation", "test")}
    if tokenizer.startswith("bpe:"):
        count = tokenizer.removeprefix("bpe:")
        if not count.isdigit() or int(count) < 257:
            raise ValueError(f"data.tokenizer {tokenizer!r}: give bpe:N with N > 256 (every byte has an id)")
        made = ByteLevelTokenizer.train(splits["train"], int(count))
    elif tokenizer.endswith(".json"):
        try:
            made = ByteLevelTokenizer.from_file(tokenizer)
        except Exception as error:  # tokenizers raises its own Exception type
            raise ValueError(f"data.tokenizer {tokenizer!r} is not a readable tokenizer.json: {error}") from None
    else:
        raise ValueError(f"data.tokenizer {tokenizer!r}: use chars, bpe:N or the path of a tokenizer.json")
    return made, {split: made.encode(text) for split, text in splits.items()}


def char_lm_batches(config: ml_collections.ConfigDict, split: str):
    """Language-model batches of `inputs` and `targets` (the next characters) of `config.data.name`'s split,
    windows of `config.data.block_size`. Training: windows at every offset, shuffled, endless. Evaluation:
    non-overlapping windows, once (the first `config.data.max_eval_windows` when > 0): every character
    scored exactly once."""
    tokens = char_corpus(config.data.name, config.data_dir)[1][split]
    return window_batches(tokens, config.data.block_size, config, split)


def window_batches(tokens: np.ndarray, length: int, config: ml_collections.ConfigDict, split: str):
    """Batches of `length`-token windows of `tokens` (char_lm_batches's windows, any tokenizer)."""
    from research.data import pipeline  # pipeline imports every dataset builder; the tokenizers above need none

    if split == "train":
        starts, gather = window_columns(tokens, length, stride=1)
        return pipeline.array_batches(starts, batch_size=config.batch_size, seed=config.seed, transform=gather)
    windows = WindowSource(tokens, length)
    if config.data.max_eval_windows:
        windows = pipeline.subset(windows, range(min(config.data.max_eval_windows, len(windows))))
    return pipeline.eval_batches(windows, batch_size=config.eval_batch_size)


def encode_chars(config: ml_collections.ConfigDict, prompt: str) -> np.ndarray:
    """A prompt as ids of `config.data.name`'s character vocabulary (a language model's encode_text hook)."""
    return char_corpus(config.data.name, config.data_dir)[0].encode(prompt)


def decode_chars(config: ml_collections.ConfigDict, ids) -> str:
    """Ids of `config.data.name`'s character vocabulary as text (a language model's decode_tokens hook)."""
    return char_corpus(config.data.name, config.data_dir)[0].decode(ids)
