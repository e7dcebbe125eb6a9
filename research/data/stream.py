"""Streaming prepared corpora (research/data/prepare.py) for language-model training.

Every document is followed by the end-of-document id, a shard's documents are one token stream, and
a training example is a window of length + 1 tokens of it (inputs and next-token targets). Each
epoch the shards come in a fresh order and each shard's windows in a fresh order, both drawn from
(seed, epoch[, shard]): windows are found by arithmetic, so global batch b is the same for any
process count, each process reads its slice, and the iterator's state is b (resume is exact).
Several corpora mix by weight (grain's deterministic MapDataset.mix). With `segment_ids`, a batch
also carries the document of each position (attention stays inside it) and `weights` that drop the
target after an end-of-document (the loss does not predict across documents).

Chat corpora (prepared with --chat_template) carry a loss mask per token, 1 on the assistant's turns: a
window's weights are that mask, and windows are packs of whole conversations (as many consecutive ones as
fit in length + 1 tokens, the rest padding of weight 0 and segment 0; a longer one is cut to a window of
its own), so that no conversation starts in one window and ends in another.

Legend: B batch, L length (block size).
"""

import collections
import dataclasses
import json
import threading
from pathlib import Path
from typing import Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from research.data import pipeline
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus: its directory and manifest."""

    directory: Path
    manifest: dict

    @classmethod
    def open(cls, directory: str | Path) -> "Corpus":
        path = Path(directory) / "manifest.json"
        if not path.exists():
            raise ConfigError(f"{directory}: no manifest.json; prepare it with python -m research.data.prepare")
        return cls(Path(directory), json.loads(path.read_text()))

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    @property
    def chat(self) -> bool:
        """Conversations with a loss mask (research/data/prepare.py --chat_template)."""
        return bool(self.manifest.get("chat_template"))

    def document_lengths(self, split: str, index: int) -> np.ndarray:
        """Tokens of each document of a chat corpus's shard, in order (prepare writes them beside it)."""
        shard = self.manifest["splits"][split]["shards"][index]
        return np.load(self.directory / f"{shard['path']}.lengths.npy")

    @property
    def vocab_size(self) -> int:
        return self.manifest["tokenizer"]["vocab_size"]

    def tokenizer(self) -> tokenizer_lib.CorpusTokenizer:
        """The corpus's tokenizer, checked against the manifest's hash."""
        tokenizer = tokenizer_lib.load(self.directory)
        if tokenizer.sha256 != self.manifest["tokenizer"]["sha256"]:
            raise ConfigError(f"{tokenizer.path} does not match {self.directory}/manifest.json (another tokenizer)")
        return tokenizer

    def stream_lengths(self, split: str) -> np.ndarray:
        """Tokens of each shard's stream: its documents' tokens and one end-of-document id each."""
        shards = self.manifest["splits"][split]["shards"]
        return np.array([shard["tokens"] + shard["documents"] for shard in shards], np.int64)


class ShardCache:
    """Shard streams in memory, the `size` most recently used; thread-safe (grain reads with threads)."""

    def __init__(self, size: int = 2):
        self.size, self.streams, self.lock = size, collections.OrderedDict(), threading.Lock()

    def stream(self, corpus: Corpus, split: str, index: int) -> np.ndarray:
        """The shard's token stream: its documents, each followed by the end-of-document id."""
        return self._load(corpus, split, index)[0]

    def loss_mask(self, corpus: Corpus, split: str, index: int) -> np.ndarray:
        """A chat shard's mask, aligned with its stream (0 on every end-of-document id)."""
        return self._load(corpus, split, index)[1]

    def _load(self, corpus: Corpus, split: str, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        key = (str(corpus.directory), split, index)
        with self.lock:
            if key not in self.streams:
                shard = corpus.manifest["splits"][split]["shards"][index]
                dtype = np.dtype(corpus.manifest["dtype"])
                eos = np.array([corpus.eos_id], dtype).tobytes()
                reader = ArrayRecordReader(str(corpus.directory / shard["path"]))
                records = reader.read_all()
                reader.close()
                if corpus.chat:  # a record: its ids, then a byte per id
                    sizes = [len(record) // (dtype.itemsize + 1) * dtype.itemsize for record in records]
                    ids = b"".join(record[:size] + eos for record, size in zip(records, sizes))
                    mask = b"".join(record[size:] + b"\0" for record, size in zip(records, sizes))
                    self.streams[key] = (np.frombuffer(ids, dtype), np.frombuffer(mask, np.uint8))
                else:
                    self.streams[key] = (np.frombuffer(b"".join(record + eos for record in records), dtype), None)
                while len(self.streams) > self.size:
                    self.streams.popitem(last=False)
            self.streams.move_to_end(key)
            return self.streams[key]


@dataclasses.dataclass
class Windows:
    """The windows of one split of one corpus: `locate(positions)` gives each one's shard and start."""

    corpus: Corpus
    split: str
    length: int
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        if self.corpus.chat:  # packs of whole conversations: each shard's (starts, sizes)
            shards = range(len(self.corpus.manifest["splits"][self.split]["shards"]))
            self.packs = [
                pack(self.corpus.document_lengths(self.split, index) + 1, self.length + 1) for index in shards
            ]
            self.counts = np.array([len(starts) for starts, _ in self.packs], np.int64)
        else:
            self.packs = None
            self.counts = np.maximum(self.corpus.stream_lengths(self.split) - 1, 0) // self.length
        self.total = int(self.counts.sum())
        if not self.total:
            raise ConfigError(
                f"{self.corpus.directory}: its {self.split} split has no window of {self.length + 1} tokens"
            )
        self.orders: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()  # grain's reading threads share this object

    def _order(self, *key: int) -> np.ndarray:
        """The permutation drawn from (seed, *key): the shards for (epoch,), a shard's windows for (epoch, shard)."""
        with self.lock:
            if key not in self.orders:
                size = len(self.counts) if len(key) == 1 else int(self.counts[key[1]])
                order = np.random.default_rng([self.seed, *key]).permutation(size) if self.shuffle else np.arange(size)
                self.orders[key] = order
                while len(self.orders) > 8:
                    self.orders.popitem(last=False)
            return self.orders[key]

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, start token) of each window at these stream positions (any epoch)."""
        return self.spans(positions)[:2]

    def spans(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, start token, tokens: length + 1 but for a pack of conversations) of each window."""
        epochs, ranks = np.divmod(np.asarray(positions, np.int64), self.total)
        shards, starts = np.empty_like(ranks), np.empty_like(ranks)
        sizes = np.full_like(ranks, self.length + 1)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            shard_order = self._order(int(epoch))
            ends = np.cumsum(self.counts[shard_order])
            slot = np.searchsorted(ends, ranks[chosen], side="right")
            within = ranks[chosen] - (ends[slot] - self.counts[shard_order[slot]])
            shards[chosen] = shard_order[slot]
            for shard in np.unique(shard_order[slot]):
                mine = shard_order[slot] == shard
                windows = self._order(int(epoch), int(shard))[within[mine]]
                rows = np.flatnonzero(chosen)[mine]
                if self.packs is None:
                    starts[rows] = windows * self.length
                else:
                    starts[rows], sizes[rows] = self.packs[shard][0][windows], self.packs[shard][1][windows]
        return shards, starts, sizes


def pack(documents: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, tokens) of each pack of consecutive documents of these stream lengths: as many as fit in
    `capacity` tokens, a longer document its own pack, cut to `capacity`."""
    starts, sizes, start, size = [], [], 0, 0
    for document in documents.tolist():
        if size and size + document > capacity:
            starts.append(start)
            sizes.append(size)
            start, size = start + size, 0
        size += document
        if size >= capacity:
            starts.append(start)
            sizes.append(capacity)
            start, size = start + size, 0
    if size:
        starts.append(start)
        sizes.append(size)
    return np.array(starts, np.int64), np.array(sizes, np.int64)


def read(stream: np.ndarray, starts_B: np.ndarray, sizes_B: np.ndarray, width: int, pad: int = 0) -> np.ndarray:
    """Rows of `width` tokens of `stream` from each start, those past the row's size `pad`."""
    offsets = np.arange(width)
    if np.all(sizes_B == width):  # whole windows (every one but a chat corpus's)
        return stream[starts_B[:, None] + offsets]
    valid_BxW = offsets < sizes_B[:, None]
    return np.where(valid_BxW, stream[np.minimum(starts_B[:, None] + offsets, len(stream) - 1)], pad)


def assemble(
    window_BxL1: np.ndarray,
    eos_id: int,
    segment_ids: bool,
    mask_BxL1: np.ndarray | None = None,
    sizes_B: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """inputs/targets of windows of length + 1; with segment_ids, each position's document and the weights.
    A chat window's `mask_BxL1` (1 on what the loss counts, 0 on its padding) weighs each target, and the
    padding past its `sizes_B` tokens is segment 0."""
    inputs_BxL = window_BxL1[:, :-1].astype(np.int32)
    batch = {"inputs": inputs_BxL, "targets": window_BxL1[:, 1:].astype(np.int32)}
    if segment_ids or mask_BxL1 is not None:
        ended_BxL = inputs_BxL == eos_id  # the end-of-document id belongs to the document it ends
        batch["segment_ids"] = (1 + np.cumsum(ended_BxL, axis=1) - ended_BxL).astype(np.int32)
        batch["weights"] = (~ended_BxL).astype(np.float32)
    if mask_BxL1 is not None:
        batch["weights"] *= mask_BxL1[:, 1:]
    if sizes_B is not None:
        batch["segment_ids"] *= np.arange(inputs_BxL.shape[1]) < sizes_B[:, None]
    return batch


class LoadBatch:
    """This process's slice of global batch b, mixed over the sources (a plain object: it pickles)."""

    def __init__(
        self,
        sources: Sequence[Windows],
        weights: Sequence[float],
        batch_size: int,
        segment_ids: bool,
        process: pipeline.Process | None = None,
    ):
        self.sources, self.batch_size, self.segment_ids = list(sources), batch_size, segment_ids
        self.process = process or pipeline.Process.current()
        tags = [grain.MapDataset.range(2**40).map(lambda i, k=k: (k, i)) for k in range(len(self.sources))]
        self.mixture = grain.MapDataset.mix(tags, list(weights)) if len(tags) > 1 else tags[0]
        self.cache = ShardCache(2 * len(self.sources))

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        positions = pipeline.global_positions(batch, self.batch_size, self.process)
        drawn = np.array([self.mixture[position] for position in positions], np.int64).reshape(-1, 2)
        length = self.sources[0].length
        window_BxL1 = np.empty((len(drawn), length + 1), np.int64)
        chat = self.sources[0].corpus.chat
        mask_BxL1, sizes_B = np.zeros_like(window_BxL1, np.float32), np.empty(len(drawn), np.int64)
        for k, source in enumerate(self.sources):
            rows = np.flatnonzero(drawn[:, 0] == k)
            if not len(rows):
                continue
            shards, starts, sizes = source.spans(drawn[rows, 1])
            sizes_B[rows] = sizes
            for shard in np.unique(shards):
                mine = shards == shard
                stream = self.cache.stream(source.corpus, source.split, int(shard))
                window_BxL1[rows[mine]] = read(stream, starts[mine], sizes[mine], length + 1)
                if chat:
                    loss_mask = self.cache.loss_mask(source.corpus, source.split, int(shard))
                    mask_BxL1[rows[mine]] = read(loss_mask, starts[mine], sizes[mine], length + 1)
        options = dict(mask_BxL1=mask_BxL1, sizes_B=sizes_B) if chat else {}
        batch = assemble(window_BxL1, self.sources[0].corpus.eos_id, self.segment_ids, **options)
        return batch | {"mask": np.ones(len(drawn), np.float32)}


def parse_sources(spec: str) -> list[tuple[Corpus, float]]:
    """`DIR` or `DIR:WEIGHT,DIR:WEIGHT,...` (weights normalised) as opened corpora sharing one tokenizer."""
    sources = []
    for part in spec.split(","):
        directory, _, weight = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "1")
        try:
            weight = float(weight)
        except ValueError:
            raise ConfigError(f"data.prepared {spec!r}: {weight!r} is not a weight (DIR:0.7,DIR:0.3)") from None
        sources.append((Corpus.open(directory), weight))
    hashes = {corpus.manifest["tokenizer"]["sha256"] for corpus, _ in sources}
    if len(hashes) > 1:
        raise ConfigError(f"data.prepared {spec!r}: the corpora were prepared with different tokenizers")
    if any(weight <= 0 for _, weight in sources):
        raise ConfigError(f"data.prepared {spec!r}: weights must be > 0")
    total = sum(weight for _, weight in sources)
    return [(corpus, weight / total) for corpus, weight in sources]


def train_batches(
    spec: str, *, length: int, batch_size: int, seed: int, segment_ids: bool, threads: int = 2
) -> grain.IterDataset:
    """Endless training batches of the corpora `spec` names, read `threads` batches ahead in background threads."""
    sources = parse_sources(spec)
    windows = [Windows(corpus, "train", length, seed + 7919 * k) for k, (corpus, _) in enumerate(sources)]
    load = LoadBatch(windows, [weight for _, weight in sources], batch_size, segment_ids)
    dataset = grain.MapDataset.range(pipeline.STREAM_LENGTH).map(load)
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))


@dataclasses.dataclass
class EvalWindows:
    """The validation windows of a corpus, in order and without overlap: every token scored once."""

    windows: Windows
    segment_ids: bool

    def __post_init__(self):
        self.cache = ShardCache(1)

    def __len__(self) -> int:
        return self.windows.total

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        corpus, split, width = self.windows.corpus, self.windows.split, self.windows.length + 1
        shards, starts, sizes = self.windows.spans(np.array([index]))
        window_1xL1 = read(self.cache.stream(corpus, split, int(shards[0])), starts, sizes, width)
        options = {}
        if corpus.chat:
            mask_1xL1 = read(self.cache.loss_mask(corpus, split, int(shards[0])), starts, sizes, width)
            options = dict(mask_BxL1=mask_1xL1.astype(np.float32), sizes_B=sizes)
        return {
            key: value[0] for key, value in assemble(window_1xL1, corpus.eos_id, self.segment_ids, **options).items()
        }


def eval_batches(spec: str, *, length: int, batch_size: int, segment_ids: bool, max_windows: int) -> grain.MapDataset:
    """One pass over the first corpus's validation split (its first `max_windows` windows when > 0)."""
    corpus = parse_sources(spec)[0][0]
    windows = EvalWindows(Windows(corpus, "validation", length, seed=0, shuffle=False), segment_ids)
    source = windows if not max_windows else pipeline.subset(windows, range(min(max_windows, len(windows))))
    return pipeline.eval_batches(source, batch_size=batch_size)


def lm_batches(config, split: str):
    """A language model's batches of `config.data.prepared` (windows of model.block_size): endless shuffled
    training batches, or one pass over the validation split for "validation" and "test"."""
    windows = dict(length=config.model.block_size, segment_ids=config.data.segment_ids)
    if split == "train":
        return train_batches(config.data.prepared, batch_size=config.batch_size, seed=config.seed, **windows)
    return eval_batches(
        config.data.prepared, batch_size=config.eval_batch_size, max_windows=config.data.max_eval_windows, **windows
    )
