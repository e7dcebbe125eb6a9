"""Where numbers go: a JSON-lines file, TensorBoard event files and the console.

Only process 0 writes; other processes get a logger that stays silent. Each record is
`{"step": n, "train/loss": ..., ...}`, one per line of `metrics.jsonl` in the workdir.
"""

import collections
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
import rich.console
import rich.progress


def _import_tensorboardx():
    """tensorboardX, imported without PyTorch: its writer imports torch when it can (2 s per process)
    only to accept torch tensors, and we log Python floats. Torch stays importable afterwards."""
    if "torch" in sys.modules:
        import tensorboardX

        return tensorboardX
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


tensorboardX = _import_tensorboardx()


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Logger:
    """Writes metrics for steps of one run and draws a progress bar with throughput and ETA."""

    def __init__(self, workdir: str | Path, total_steps: int, start_step: int = 0):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        workdir = Path(workdir)
        self.jsonl = _open_jsonl(workdir / "metrics.jsonl", start_step)
        self.tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"))
        self.console = rich.console.Console(stderr=True, soft_wrap=True)
        self.progress = rich.progress.Progress(
            rich.progress.TextColumn("[bold]{task.description}"),
            rich.progress.BarColumn(),
            rich.progress.MofNCompleteColumn(),
            rich.progress.TextColumn("{task.fields[throughput]}"),
            rich.progress.TimeElapsedColumn(),
            rich.progress.TextColumn("eta"),
            rich.progress.TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, throughput="")
        self.progress.start()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records metrics for `step` in every sink and prints them above the progress bar."""
        if not self.active:
            return
        record = {"step": int(step)} | {name: _clean(value) for name, value in metrics.items()}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, int(step))
        self.console.print(f"step {step}: " + "  ".join(f"{name} {_format(value)}" for name, value in metrics.items()))

    def advance(self, step: int, examples_per_second: float | None = None) -> None:
        """Moves the progress bar to `step`."""
        if not self.active:
            return
        throughput = f"{examples_per_second:,.0f} ex/s" if examples_per_second else ""
        self.progress.update(self.task, completed=step, throughput=throughput)

    def close(self) -> None:
        if not self.active:
            return
        self.progress.stop()
        self.tensorboard.close()
        self.jsonl.close()


def _clean(value: float) -> float | None:
    """JSON has no NaN or infinity: those are written as null."""
    value = float(value)
    return value if math.isfinite(value) else None


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN or infinite (or the loss spiked: `LossSpikeError`) at `step`."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step  # the first bad step


class StorageError(RuntimeError):
    """A file the run writes or reads failed (a full disk, a permission, a directory removed under it)."""


class LossSpikeError(NonFiniteError):
    """The loss stayed above k times its recent median for n consecutive steps."""


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


@dataclasses.dataclass(frozen=True)
class Throughput:
    """What turns examples/s into tokens/s and MFU: 0 where the experiment does not say."""

    tokens_per_example: int = 0
    flops_per_example: float = 0.0  # training FLOPs (forward + backward) of one example
    peak_flops: float = 0.0  # FLOP/s of the devices the step runs on

    def rates(self, examples_per_second: float) -> dict[str, float]:
        """perf/tokens_per_second and perf/mfu (model FLOPs utilisation, 0..1) where known."""
        rates = {}
        if self.tokens_per_example:
            rates["perf/tokens_per_second"] = examples_per_second * self.tokens_per_example
        if self.flops_per_example and self.peak_flops:
            rates["perf/mfu"] = examples_per_second * self.flops_per_example / self.peak_flops
        return rates


class TrainMetrics:
    """Train metrics since the last log. A finished window reaches the host one step late,
    after the next step is dispatched, so the device never waits for the host."""

    def __init__(
        self,
        logger: Logger,
        batch_size: int,
        start_step: int,
        skip_nonfinite: bool,
        throughput: "Throughput | None" = None,
        spikes: LossSpikes | None = None,
    ):
        self.logger, self.batch_size, self.skip_nonfinite = logger, batch_size, skip_nonfinite
        self.throughput = throughput or Throughput()
        self.spikes = spikes or LossSpikes(0.0, 1, 1)
        self.window, self.finished = [], None
        self.last_time, self.last_step = time.perf_counter(), start_step

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.window.append(metrics)

    def finish_window(self, step: int) -> None:
        if self.window:
            self.finished, self.window = (step, self.window), []

    def flush(self) -> None:
        """Logs the mean of the finished window, if any (one device-to-host transfer)."""
        if self.finished is None:
            return
        step, window = self.finished
        host = self._checked(step, window)
        average = np.nanmean if self.skip_nonfinite else np.mean
        values = {f"train/{name}": float(average([metrics[name] for metrics in host])) for name in host[0]}
        if self.skip_nonfinite:
            values["train/skipped_steps"] = float(sum(not np.isfinite(metrics["loss"]) for metrics in host))
        now = time.perf_counter()
        values["perf/examples_per_second"] = (step - self.last_step) * self.batch_size / max(now - self.last_time, 1e-9)
        values |= self.throughput.rates(values["perf/examples_per_second"])
        self.logger.write(step, values)
        self.logger.advance(step, values["perf/examples_per_second"])
        self.finished, self.last_time, self.last_step = None, now, step

    def check_pending(self, step: int) -> None:
        """Raises NonFiniteError if any step not yet logged went non-finite (called before a save)."""
        if self.finished is not None:
            self._checked(*self.finished)
        self._checked(step, self.window)

    def _checked(self, last_step: int, window: list) -> list[dict]:
        host = jax.device_get(window)
        for step, metrics in enumerate(host, start=last_step - len(host) + 1):
            finite = np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
            if not finite and not self.skip_nonfinite:
                raise NonFiniteError(
                    f"non-finite loss or gradients at step {step} "
                    f"(loss {metrics['loss']}, grad norm {metrics['grad_norm']})",
                    step=step,
                )
            self.spikes.check(step, float(metrics["loss"]))
        return host


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short (the disk filled, the process died mid-write) is dropped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _open_jsonl(path: Path, start_step: int):
    """A fresh run starts a fresh file. A resumed one keeps the records up to its checkpoint's
    step and drops the later ones, which the resumed run is about to write again."""
    kept = (
        [record for record in read_jsonl(path) if record["step"] <= start_step] if start_step and path.exists() else []
    )
    handle = open(path, "w", encoding="utf-8")
    handle.writelines(json.dumps(record) + "\n" for record in kept)
    handle.flush()
    return handle
