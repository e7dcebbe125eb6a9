"""k-fold cross-validation splits as tfds split strings, for small datasets such as optdigits.

Fold i of k validates on the i-th of k contiguous, near-equal blocks of the prepared split
and trains on the rest. tfds stores records in an order shuffled by hashed key, so the blocks
are not runs of the original file; the folds are the same on every machine and in every run.
In an experiment config:

  config.data.splits.update(folds.kfold_splits("train", size=3823, k=5, fold=2))
"""


def fold_bounds(size: int, k: int) -> list[tuple[int, int]]:
    """[start, end) of each of the k blocks; sizes differ by at most one."""
    if not 2 <= k <= size:
        raise ValueError(f"k-fold needs 2 <= k <= {size} (the number of examples); got k={k}")
    edges = [round(index * size / k) for index in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def kfold_splits(split: str, *, size: int, k: int, fold: int) -> dict[str, str]:
    """`{"train": ..., "validation": ...}` tfds split strings for fold `fold` (0-based) of `k`."""
    if not 0 <= fold < k:
        raise ValueError(f"fold {fold} is not in 0..{k - 1}")
    start, end = fold_bounds(size, k)[fold]
    train_parts = [f"{split}[:{start}]"] if start else []
    train_parts += [f"{split}[{end}:]"] if end < size else []
    return {"train": "+".join(train_parts), "validation": f"{split}[{start}:{end}]"}
