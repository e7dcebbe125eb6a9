"""Streaming prepared corpora (research/data/prepare.py) for language-model training.

Every document is followed by the end-of-document id, a shard's documents are one token stream, and
a training example is a window of length + 1 tokens of it (inputs and next-token targets). Each
epoch the shards come in a fresh order and each shard's windows in a fresh order, both drawn from
(seed, epoch[, shard]): windows are found by arithmetic, so global batch b is the same for any
process count, each process reads its slice, and the iterator's state is b (resume is exact).
Several corpora mix by weight (grain's deterministic MapDataset.mix). With `segment_ids`, a batch
also carries the document of each position (attention stays inside it) and `weights` that drop the
target after an end-of-document (the loss does not predict across documents).

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
        key = (str(corpus.directory), split, index)
        with self.lock:
            if key not in self.streams:
                shard = corpus.manifest["splits"][split]["shards"][index]
                dtype = np.dtype(corpus.manifest["dtype"])
                eos = np.array([corpus.eos_id], dtype).tobytes()
                reader = ArrayRecordReader(str(corpus.directory / shard["path"]))
                self.streams[key] = np.frombuffer(b"".join(record + eos for record in reader.read_all()), dtype)
                reader.close()
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
        epochs, ranks = np.divmod(np.asarray(positions, np.int64), self.total)
        shards, starts = np.empty_like(ranks), np.empty_like(ranks)
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
                starts[np.flatnonzero(chosen)[mine]] = windows * self.length
        return shards, starts


def assemble(window_BxL1: np.ndarray, eos_id: int, segment_ids: bool) -> dict[str, np.ndarray]:
    """inputs/targets of windows of length + 1; with segment_ids, each position's document and the weights."""
    inputs_BxL = window_BxL1[:, :-1].astype(np.int32)
    batch = {"inputs": inputs_BxL, "targets": window_BxL1[:, 1:].astype(np.int32)}
    if segment_ids:
        ended_BxL = inputs_BxL == eos_id  # the end-of-document id belongs to the document it ends
        batch["segment_ids"] = (1 + np.cumsum(ended_BxL, axis=1) - ended_BxL).astype(np.int32)
        batch["weights"] = (~ended_BxL).astype(np.float32)
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
        offsets = np.arange(length + 1)
        for k, source in enumerate(self.sources):
            rows = np.flatnonzero(drawn[:, 0] == k)
            if not len(rows):
                continue
            shards, starts = source.locate(drawn[rows, 1])
            for shard in np.unique(shards):
                mine = shards == shard
                stream = self.cache.stream(source.corpus, source.split, int(shard))
                window_BxL1[rows[mine]] = stream[starts[mine, None] + offsets]
        batch = assemble(window_BxL1, self.sources[0].corpus.eos_id, self.segment_ids)
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
        shards, starts = self.windows.locate(np.array([index]))
        stream = self.cache.stream(self.windows.corpus, self.windows.split, int(shards[0]))
        window_1xL1 = stream[starts[0] : starts[0] + self.windows.length + 1][None]
        return {
            key: value[0] for key, value in assemble(window_1xL1, self.windows.corpus.eos_id, self.segment_ids).items()
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
