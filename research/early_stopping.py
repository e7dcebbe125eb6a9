"""Early stopping: the run stops when the configured evaluation metric has not improved for `patience`
evaluations (config.early_stopping); the history survives a restart, read back from metrics.jsonl."""

from pathlib import Path
from typing import Sequence

import ml_collections

from research.errors import ConfigError
from research.logger import read_jsonl


def should_stop(history: Sequence[float], *, mode: str, patience: int) -> bool:
    """True when the last `patience` evaluations did not beat the best one before them."""
    if patience <= 0 or len(history) <= patience:
        return False
    best_before = min(history[:-patience]) if mode == "min" else max(history[:-patience])
    recent = history[-patience:]
    improved = min(recent) < best_before if mode == "min" else max(recent) > best_before
    return not improved


def stop(history: list[float], results: dict[str, float], early_stopping: ml_collections.ConfigDict) -> bool:
    """Appends eval/<metric> to `history`; True when it has not improved for `patience` evaluations."""
    if not early_stopping.metric:
        return False
    key = f"eval/{early_stopping.metric}"
    if key not in results or early_stopping.mode not in ("min", "max"):
        raise ConfigError(
            f"early_stopping: metric must be one of {sorted(name[5:] for name in results)} and mode 'min' or 'max'"
        )
    history.append(results[key])
    return should_stop(history, mode=early_stopping.mode, patience=early_stopping.patience)


def history(workdir: Path, early_stopping, up_to_step: int) -> list[float]:
    """The early-stopping metric's values logged up to a resumed step, so patience survives a restart."""
    path, key = workdir / "metrics.jsonl", f"eval/{early_stopping.metric}"
    if not early_stopping.metric or not up_to_step or not path.exists():
        return []
    return [record[key] for record in read_jsonl(path) if key in record and record["step"] <= up_to_step]
