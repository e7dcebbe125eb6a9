"""grain pipelines over random-access sources: shuffled training batches and padded eval batches.

Batch sizes given here are global; each process reads its own slice of every global batch,
so `research.sharding.put_batch` can assemble global arrays on the mesh. Every batch carries
`mask` (1 for a real example, 0 for padding) so losses and metrics can ignore padding.
"""

import collections
import dataclasses
import math
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from research import sharding
from research.data import catalog
from research.errors import ConfigError

Record = Mapping[str, Any]
Transform = Callable[[Record], dict[str, np.ndarray]]
RandomTransform = Callable[[Record, np.random.Generator], dict[str, np.ndarray]]


def tfds_source(name: str, split: str, *, data_dir: str | None = None) -> Sequence[Record]:
    """Random-access records of a split of a dataset named in `catalog.DATASETS` (or `tfds:NAME`).

    The dataset is prepared as array_record first if needed (no TensorFlow for ours).
    """
    return catalog.source(name, split, data_dir)


@dataclasses.dataclass(frozen=True)
class Process:
    """Which slice of the data this process reads: `jax.process_index()` of `jax.process_count()` by default."""

    index: int
    count: int

    @classmethod
    def current(cls) -> "Process":
        return cls(jax.process_index(), jax.process_count())


def local_batch_size(global_batch_size: int, process: Process | None = None) -> int:
    """This process's share of a global batch."""
    count = (process or Process.current()).count
    if global_batch_size % count:
        raise ConfigError(f"batch size {global_batch_size} does not divide over {count} processes")
    return global_batch_size // count


def _with_mask(record: Record, value: float) -> dict[str, np.ndarray]:
    return dict(record) | {"mask": np.float32(value)}


STREAM_LENGTH = 2**62  # "endless": more batches than any run draws


def global_positions(batch: int, batch_size: int, process: Process) -> range:
    """Positions in the global example stream that this process reads for global batch `batch`.

    Global batch b is stream positions [b * batch_size, (b + 1) * batch_size); process p reads
    its contiguous slice. So the global batch is the same whatever the number of processes, and
    an iterator's state (the batch number) restores on any topology.
    """
    local = local_batch_size(batch_size, process)
    first = batch * batch_size + process.index * local
    return range(first, first + local)


class EpochOrder:
    """`order(epoch)`: the examples' order in that epoch, a permutation drawn from (seed, epoch).

    A plain object, not a closure, so that pipelines using it pickle into worker processes.
    """

    def __init__(self, seed: int, size: int):
        self.seed, self.size, self.cache = seed, size, {}

    def __call__(self, epoch: int) -> np.ndarray:
        if epoch not in self.cache:
            if len(self.cache) >= 2:  # consecutive batches share at most two epochs
                self.cache.pop(min(self.cache))
            self.cache[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self.cache[epoch]


@dataclasses.dataclass
class _LoadBatch:
    """This process's slice of global batch `batch`, one record at a time (see train_batches)."""

    source: Sequence[Record]
    batch_size: int
    seed: int
    process: Process
    transform: Transform | None
    random_transform: RandomTransform | None

    def __post_init__(self):
        self.order = EpochOrder(self.seed, len(self.source))

    def __call__(self, batch: int) -> dict[str, np.ndarray]:
        records = []
        for position in global_positions(batch, self.batch_size, self.process):
            epoch, offset = divmod(position, len(self.source))
            record = self.source[int(self.order(epoch)[offset])]
            record = self.transform(record) if self.transform is not None else record
            if self.random_transform is not None:
                record = self.random_transform(record, np.random.default_rng([self.seed, position]))
            records.append(_with_mask(record, 1.0))
        return {key: np.stack([np.asarray(record[key]) for record in records]) for key in records[0]}


def train_batches(
    source: Sequence[Record],
    *,
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    random_transform: RandomTransform | None = None,
    read_options: grain.ReadOptions | None = None,
    num_workers: int = 0,
    process: Process | None = None,
) -> grain.IterDataset:
    """Endless batches; every epoch a fresh permutation of all examples drawn from (seed, epoch).

    The stream of examples is the same for every process count; each process reads its slice
    of every global batch (see `global_positions`). `random_transform(record, rng)` gets a
    generator seeded by (seed, stream position), so augmentation is the same in every run,
    after a restore and on any topology. `num_workers` > 0 loads batches in that many worker
    processes; the batches are the same either way.
    """
    process = process or Process.current()
    load = _LoadBatch(source, batch_size, seed, process, transform, random_transform)
    dataset = grain.MapDataset.range(STREAM_LENGTH).map(load)
    iterable = dataset.to_iter_dataset(read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=16))
    if num_workers:
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iterable


def split_source(config: ml_collections.ConfigDict, split: str) -> Sequence[Record]:
    """The records of `config.data.name`'s split that `config.data.splits[split]` names ("train[:90%]", say)."""
    return tfds_source(config.data.name, config.data.splits[split], data_dir=config.data_dir)


def labelled_batches(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    transform: Transform,
    random_transform: RandomTransform | None = None,
    source: Sequence[Record] | None = None,
    keys: Sequence[str] = ("image", "label"),
):
    """A labelled dataset's batches, sized and seeded by the config (`source` defaults to `split_source`).
    Training: with a `random_transform` (augmentation, which also preprocesses) one example at a time;
    without, the `keys` columns held in memory, gathered a batch at a time and `transform`ed.
    Evaluation: one padded pass, each example `transform`ed."""
    source = split_source(config, split) if source is None else source
    if split != "train":
        return eval_batches(source, batch_size=config.eval_batch_size, transform=transform)
    if random_transform is not None:
        return train_batches(source, batch_size=config.batch_size, seed=config.seed, random_transform=random_transform)
    columns = {key: column for key, column in load_columns(source).items() if key in keys}
    return array_batches(columns, batch_size=config.batch_size, seed=config.seed, transform=transform)


def load_columns(source: Sequence[Record]) -> dict[str, np.ndarray]:
    """Every record of a (small) source read once into stacked numpy columns, e.g. `image_NxHxW`."""
    records = [source[index] for index in range(len(source))]
    return {key: np.stack([np.asarray(record[key]) for record in records]) for key in records[0]}


def array_batches(
    columns: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    process: Process | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Endless batches of in-memory columns, gathered a whole batch at a time; for small datasets.

    Per-example pipelines cost tens of microseconds of Python per example, more than a small
    model's whole step; here a batch is one numpy gather. The example stream and its slicing
    over processes are those of `train_batches`; `transform` maps a batch of columns to a batch.
    The state (`get_state`) is the batch number, so a restore resumes exactly on any topology.
    """
    process = process or Process.current()
    columns = {key: np.asarray(column) for key, column in columns.items()}
    size = len(next(iter(columns.values())))
    if batch_size > size:
        raise ConfigError(f"batch size {batch_size} exceeds the {size} examples of the dataset")
    order = EpochOrder(seed, size)

    def gather(batch: int) -> dict[str, np.ndarray]:
        positions = np.asarray(global_positions(batch, batch_size, process))
        epochs, offsets = np.divmod(positions, size)
        indices = np.concatenate([order(epoch)[offsets[epochs == epoch]] for epoch in np.unique(epochs)])
        gathered = {key: column[indices] for key, column in columns.items()}
        gathered = transform(gathered) if transform is not None else gathered
        return dict(gathered) | {"mask": np.ones(len(indices), np.float32)}

    dataset = grain.MapDataset.range(STREAM_LENGTH).map(gather)
    # No prefetch threads by default: a gather takes tens of microseconds, which JAX's asynchronous
    # dispatch already overlaps with the step, and a thread handing batches over costs more.
    return dataset.to_iter_dataset(read_options or grain.ReadOptions(num_threads=0))


def eval_batches(
    source: Sequence[Record],
    *,
    batch_size: int,
    transform: Transform | None = None,
    process: Process | None = None,
) -> grain.MapDataset:
    """One ordered pass over every example; the last global batch is padded with masked copies.

    Global batch b holds examples [b * batch_size, (b + 1) * batch_size); process p reads
    its contiguous slice of it, so every process yields the same number of batches.
    """
    process = process or Process.current()
    size = len(source)
    local = local_batch_size(batch_size, process)
    num_batches = math.ceil(size / batch_size)
    offset = process.index * local

    def load(local_index: int) -> dict[str, np.ndarray]:
        batch, position = divmod(local_index, local)
        index = batch * batch_size + offset + position
        record = source[min(index, size - 1)]
        if transform is not None:
            record = transform(record)
        return _with_mask(record, 1.0 if index < size else 0.0)

    return grain.MapDataset.range(num_batches * local).map(load).batch(local)


def prefetch_to_mesh(
    batches: Iterable[Mapping[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Global arrays on the mesh, `size` batches ahead, so host-to-device copies overlap the step.

    The grain iterator underneath is then `size` batches ahead of the step: a checkpoint must
    store the iterator state taken when the step's batch was drawn, not the current one.
    """
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(sharding.put_batch(batch, mesh))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def subset(source: Sequence[Record], indices: Sequence[int]) -> grain.MapDataset:
    """The records of `source` at `indices`, in that order, with random access (e.g. one k-fold split)."""
    indices = np.asarray(indices, dtype=np.int64)
    return grain.MapDataset.range(len(indices)).map(lambda position: source[int(indices[position])])


def array_source(**columns: np.ndarray) -> list[dict[str, np.ndarray]]:
    """In-memory records from equal-length columns, e.g. `array_source(x=x_N, y=y_N)`."""
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns differ in length: {lengths}")
    size = next(iter(lengths.values()))
    return [{name: column[index] for name, column in columns.items()} for index in range(size)]
