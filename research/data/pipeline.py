"""grain pipelines over random-access sources: shuffled training batches and padded eval batches.

Batch sizes given here are global; each process reads its own slice of every global batch,
so `research.sharding.put_batch` can assemble global arrays on the mesh. Every batch carries
`mask` (1 for a real example, 0 for padding) so losses and metrics can ignore padding.
"""

import math
from typing import Any, Callable, Mapping, Sequence

import grain
import jax
import numpy as np
from research.config import ConfigError
from research.data import catalog

Record = Mapping[str, Any]
Transform = Callable[[Record], dict[str, np.ndarray]]


def tfds_source(name: str, split: str, *, data_dir: str | None = None) -> Sequence[Record]:
    """Random-access records of a split of a dataset named in `catalog.DATASETS` (or `tfds:NAME`).

    The dataset is prepared as array_record first if needed (no TensorFlow for ours).
    """
    return catalog.source(name, split, data_dir)


def local_batch_size(global_batch_size: int) -> int:
    """This process's share of a global batch."""
    if global_batch_size % jax.process_count():
        raise ConfigError(f"batch size {global_batch_size} does not divide over {jax.process_count()} processes")
    return global_batch_size // jax.process_count()


def _with_mask(record: Record, value: float) -> dict[str, np.ndarray]:
    return dict(record) | {"mask": np.float32(value)}


def train_batches(
    source: Sequence[Record],
    *,
    batch_size: int,
    seed: int,
    transform: Transform | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Endless batches, reshuffled every epoch from `seed`; this process reads a disjoint shard."""
    dataset = grain.MapDataset.source(source)[jax.process_index() :: jax.process_count()]
    dataset = dataset.seed(seed).shuffle().repeat()
    if transform is not None:
        dataset = dataset.map(transform)
    dataset = dataset.map(lambda record: _with_mask(record, 1.0))
    dataset = dataset.batch(local_batch_size(batch_size), drop_remainder=True)
    return dataset.to_iter_dataset(read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=16))


def eval_batches(
    source: Sequence[Record],
    *,
    batch_size: int,
    transform: Transform | None = None,
) -> grain.MapDataset:
    """One ordered pass over every example; the last global batch is padded with masked copies.

    Global batch b holds examples [b * batch_size, (b + 1) * batch_size); process p reads
    its contiguous slice of it, so every process yields the same number of batches.
    """
    size = len(source)
    local = local_batch_size(batch_size)
    num_batches = math.ceil(size / batch_size)
    offset = jax.process_index() * local

    def load(local_index: int) -> dict[str, np.ndarray]:
        batch, position = divmod(local_index, local)
        index = batch * batch_size + offset + position
        record = source[min(index, size - 1)]
        if transform is not None:
            record = transform(record)
        return _with_mask(record, 1.0 if index < size else 0.0)

    return grain.MapDataset.range(num_batches * local).map(load).batch(local)


def array_source(**columns: np.ndarray) -> list[dict[str, np.ndarray]]:
    """In-memory records from equal-length columns, e.g. `array_source(x=x_N, y=y_N)`."""
    lengths = {name: len(column) for name, column in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"columns differ in length: {lengths}")
    size = next(iter(lengths.values()))
    return [{name: column[index] for name, column in columns.items()} for index in range(size)]
