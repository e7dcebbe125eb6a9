"""The tokenizer of a prepared corpus (research/data/prepare.py), saved beside its shards.

`bpe:N` (a byte-level BPE trained on a sample: GPT-2's scheme, the `tokenizers` library), a Hugging Face
tokenizer.json, a sentencepiece .model, or `bytes` (id = byte + 1). Id 0 is padding where the
tokenizer has one; every corpus has an end-of-document id that streaming puts between documents.
"""

import dataclasses
import functools
import hashlib
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece
import tokenizers

from research.data import text
from research.errors import ConfigError

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.bytes")


@dataclasses.dataclass
class CorpusTokenizer:
    kind: str  # "hf", "sentencepiece" or "bytes"
    backend: object
    vocab_size: int
    eos_id: int
    path: Path

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if self.kind == "hf":
            return [
                np.asarray(e.ids, np.int64) for e in self.backend.encode_batch(list(texts), add_special_tokens=False)
            ]
        if self.kind == "sentencepiece":
            return [np.asarray(ids, np.int64) for ids in self.backend.encode(list(texts))]
        return [np.frombuffer(document.encode("utf-8"), np.uint8).astype(np.int64) + 1 for document in texts]

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0].astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if int(i) != self.eos_id]
        if self.kind == "hf":
            return self.backend.decode(ids)
        if self.kind == "sentencepiece":
            return self.backend.decode(ids)
        return bytes(i - 1 for i in ids if 0 < i <= 256).decode("utf-8", errors="replace")

    def token(self, index: int) -> str:
        """The text of one id as a template names it (an end-of-document piece, say); "" for bytes."""
        if self.kind == "hf":
            return self.backend.id_to_token(index) or ""
        if self.kind == "sentencepiece":
            return self.backend.id_to_piece(index)
        return ""

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def build(spec: str, sample: str, output: Path) -> CorpusTokenizer:
    """Saves the tokenizer `spec` names into `output` (training a BPE on `sample`) and loads it."""
    output.mkdir(parents=True, exist_ok=True)
    if spec == "bytes":
        (output / "tokenizer.bytes").write_text("bytes: id = byte + 1, end of document 257\n")
    elif spec.startswith("bpe:"):
        count = spec.removeprefix("bpe:")
        if not count.isdigit() or int(count) < 258:
            raise ConfigError(f"--tokenizer {spec!r}: give bpe:N with N >= 258 (every byte, padding, end of document)")
        bpe = text.ByteLevelTokenizer.train(sample, int(count), special_tokens=("<pad>", "<|endoftext|>"))
        bpe.save(str(output / "tokenizer.json"))
    elif spec.endswith(".json") or spec.endswith(".model"):
        if not Path(spec).is_file():
            raise ConfigError(f"--tokenizer {spec!r}: no such file")
        shutil.copyfile(spec, output / ("tokenizer.json" if spec.endswith(".json") else "tokenizer.model"))
    else:
        raise ConfigError(f"--tokenizer {spec!r}: use bpe:N, bytes, or the path of a tokenizer.json or a .model")
    return load(output)


def load(directory: Path) -> CorpusTokenizer:
    """The tokenizer saved in a prepared corpus's directory, read once per process while its file is unchanged
    (evaluation encodes text after text); an unusable one is a one-line error."""
    directory = Path(directory)
    path = next((directory / name for name in FILES if (directory / name).exists()), None)
    if path is None:
        raise ConfigError(f"{directory}: no tokenizer (one of {', '.join(FILES)}): prepare the corpus first")
    return _read(path.absolute(), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read(path: Path, modified: int) -> CorpusTokenizer:
    if path.name == "tokenizer.bytes":
        return CorpusTokenizer("bytes", None, 258, 257, path)
    if path.name == "tokenizer.model":
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        if processor.eos_id() < 0:
            raise ConfigError(f"{path}: the sentencepiece model has no end-of-document piece </s>")
        return CorpusTokenizer("sentencepiece", processor, processor.get_piece_size(), processor.eos_id(), path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # tokenizers raises its own Exception type
        raise ConfigError(f"{path} is not a readable tokenizer.json: {str(error).splitlines()[0]}") from None
    vocabulary = backend.get_vocab(with_added_tokens=True)
    eos = next((vocabulary[name] for name in EOS_NAMES if name in vocabulary), None)
    if eos is None:
        raise ConfigError(f"{path}: no end-of-document token (one of {', '.join(EOS_NAMES)}) in its vocabulary")
    return CorpusTokenizer("hf", backend, backend.get_vocab_size(with_added_tokens=True), eos, path)
