"""Rolling a run back past a bad stretch: an earlier checkpoint, the data that led there skipped, on again.

With `config.nonfinite = "rollback"`, a NaN/inf loss or gradient, or a loss spike when
`config.rollback.spike_factor` > 0 (`LossSpikes` below), does not end the run. The loop
(research/train.py) moves every checkpoint at or after the first bad step to
WORKDIR/checkpoints_rolled_back/ (kept as evidence) and restores the newest one left (or starts afresh
when none is); the data iterator is not restored but goes on from where the loop found the bad
stretch, so every batch read since the restored step is skipped, plus `rollback.skip_batches` more.
PaLM did this by hand (Chowdhery et al. 2022, sec. 5.1: restart ~100 steps before a spike, skip
~200-500 batches). After `rollback.attempts` rollbacks the next bad step stops the run with the history.
Each rollback is a console line and a record in WORKDIR/rollbacks.jsonl. Deterministic: the same bad
step gives the same recovery (restores are bitwise, the loop finds a bad step at the same point, the
next checkpoint stores the moved iterator); a rerun after a crash meets the same NaN and does the same
(the spike rule needs `spike_window` losses after a restart before it judges again).
"""

import collections
import json
import math
from pathlib import Path

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from research import checkpoint
from research.errors import LossSpikeError, NonFiniteError
from research.resilience import tiers

ROLLED_BACK_DIR = "checkpoints_rolled_back"


def set_aside_from(manager, step: int) -> list[int]:
    """Moves the checkpoints at `step` and later out of the manager's sight, in every tier (process 0 moves,
    every process waits for it); returns their steps."""
    manager.wait_until_finished()
    later = sorted(saved for saved in manager.all_steps() if saved >= step)
    for tier in tiers.tiers_of(manager) if jax.process_index() == 0 else []:
        for saved in [saved for saved in tier.all_steps() if saved >= step]:  # an earlier rollback's copy is replaced
            checkpoint.set_aside(tier, saved, Path(tier.directory).parent / ROLLED_BACK_DIR / str(saved))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("research.resilience.rollback.set_aside_from")
    manager.reload()
    return later


def skip_batches(iterator, count: int) -> None:
    """Advances the training iterator by `count` batches without reading them into the step."""
    for _ in range(count):
        next(iterator)


class Rollbacks:
    """The rollbacks of one run: whether another is allowed, and their history (console and rollbacks.jsonl)."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        self.path, self.config = Path(workdir) / "rollbacks.jsonl", config
        self.history: list[dict] = []

    def allowed(self) -> bool:
        return self.config.nonfinite == "rollback" and len(self.history) < self.config.rollback.attempts

    def record(self, error: NonFiniteError, restored_step: int, skipped: int, set_aside: list[int]) -> None:
        """`skipped`: the batches of training data no step will train on, after restored_step."""
        entry = {
            "attempt": len(self.history) + 1,
            "kind": "loss spike" if isinstance(error, LossSpikeError) else "non-finite",
            "bad_step": error.step,
            "restored_step": restored_step,
            "skipped_batches": skipped,
            "set_aside": set_aside,
            "error": str(error),
        }
        self.history.append(entry)
        print(
            f"rollback {entry['attempt']}/{self.config.rollback.attempts}: {error}; restored step {restored_step}"
            f"{f' (set aside steps {set_aside})' if set_aside else ''}, skipping {skipped} batches of training data"
        )
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def summary(self) -> str:
        """What was tried, for the error that ends the run: '' when nothing was."""
        if not self.history:
            return ""
        tried = ", ".join(
            f"{entry['kind']} at step {entry['bad_step']} -> step {entry['restored_step']} "
            f"+ {entry['skipped_batches']} skipped"
            for entry in self.history
        )
        return f"after {len(self.history)} rollback(s) ({tried}; {self.path}); "


class LossSpikes:
    """The loss-spike rule: `steps` consecutive losses above `factor` x the median of the last `window`
    losses before them (PaLM's restarts, Chowdhery et al. 2022, sec. 5.1); off when `factor` is 0.
    It judges only once it has seen `window` losses, and each step once (a step can be checked before
    a save and again when logged)."""

    def __init__(self, factor: float, window: int, steps: int):
        self.factor, self.steps = factor, max(steps, 1)
        self.recent = collections.deque(maxlen=max(window, 1))
        self.seen, self.spiking = 0, []

    def restart(self, step: int) -> None:
        """Forgets the steps after `step` (a rollback to it); the losses before them stay the reference."""
        self.seen, self.spiking = step, []

    def check(self, step: int, loss: float) -> None:
        if self.factor <= 0 or step <= self.seen or not np.isfinite(loss):
            return
        self.seen = step
        full = len(self.recent) == self.recent.maxlen
        median = float(np.median(self.recent)) if full else math.inf
        if loss <= self.factor * median:  # a spike shorter than `steps` never enters the reference
            self.recent.append(loss)
            self.spiking = []
            return
        self.spiking.append(loss)
        if len(self.spiking) >= self.steps:
            first = step - len(self.spiking) + 1
            raise LossSpikeError(
                f"loss spike at steps {first}-{step}: loss {loss:.4g} above {self.factor:g} x the median "
                f"{median:.4g} of the {len(self.recent)} losses before",
                step=first,
            )
