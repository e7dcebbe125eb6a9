"""Where numbers go: a JSON-lines file, TensorBoard event files, the console, and Weights & Biases when
`config.logging.wandb` is set.

Only process 0 writes; other processes get a logger that stays silent. Each record is
`{"step": n, "train/loss": ..., ...}`, one per line of `metrics.jsonl` in the workdir. A W&B run gets the config,
the same records (`step` is its x-axis, so a resumed or rolled-back run writes its steps again) and the final
results as its summary; its id is kept in WORKDIR/wandb/run_id, so a resumed run goes on in the same W&B run.
"""

import dataclasses
import importlib.util
import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import ml_collections
import numpy as np
import rich.console
import rich.progress

from research.errors import ConfigError, NonFiniteError


def tensorboard_writer(directory: Path):
    """tensorboardX's SummaryWriter, imported when process 0 first logs and without PyTorch: its writer imports
    torch when it can (2 s per process) only to accept torch tensors, and we log Python floats. For the length of
    the import `import torch` raises ImportError, which tensorboardX handles; torch stays importable after."""
    if "torch" not in sys.modules:
        sys.modules["torch"] = None
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    import tensorboardX

    return tensorboardX.SummaryWriter(str(directory))


def check_backends(config: ml_collections.ConfigDict) -> None:
    """A one-line error, before the run starts, for a logging backend asked for and not installed or set wrong."""
    settings = config.logging if "logging" in config else None
    if settings is None:
        return
    if settings.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError('config.logging.wandb is set but wandb is not installed: pip install -e ".[wandb]"')
    if settings.wandb_mode not in ("online", "offline"):
        raise ConfigError(f"logging.wandb_mode {settings.wandb_mode!r}: use 'online' or 'offline'")


def wandb_run(workdir: Path, config: ml_collections.ConfigDict):
    """A W&B run for the workdir (the one a resumed run started, by the id in WORKDIR/wandb/run_id), silent on the
    terminal; a failure to start (no login online) is one line."""
    import wandb

    directory = workdir / "wandb"
    directory.mkdir(parents=True, exist_ok=True)
    kept = directory / "run_id"
    if not kept.exists():
        kept.write_text(secrets.token_hex(6) + "\n")  # W&B ids are lowercase letters and digits
    settings = config.logging
    options = dict(project=settings.wandb_project, entity=settings.wandb_entity or None, mode=settings.wandb_mode)
    options |= dict(name=workdir.absolute().name, id=kept.read_text().strip(), resume="allow", dir=str(workdir))
    options |= dict(config=config.to_dict(), tags=[tag for tag in settings.wandb_tags.split(",") if tag])
    quiet = wandb.Settings(silent=True, console="off", x_disable_stats=True, save_code=False)
    try:
        run = wandb.init(settings=quiet, **options)
    except Exception as error:  # wandb raises its own types, and plain ones, for a missing login or network
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ConfigError(
            f"Weights & Biases did not start ({first}): run `wandb login`, or set config.logging.wandb_mode=offline"
        ) from None
    run.define_metric("*", step_metric="step")
    return run


def _format(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class Logger:
    """Writes metrics for steps of one run and draws a progress bar with throughput and ETA."""

    def __init__(
        self, workdir: str | Path, total_steps: int, start_step: int = 0, config: ml_collections.ConfigDict = None
    ):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        workdir = Path(workdir)
        self.jsonl = _open_jsonl(workdir / "metrics.jsonl", start_step)
        self.tensorboard = tensorboard_writer(workdir / "tensorboard")
        logging = config.logging if config is not None and "logging" in config else None
        self.wandb = wandb_run(workdir, config) if logging is not None and logging.wandb else None
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
        if self.wandb is not None:
            self.wandb.log({"step": int(step)} | {name: float(value) for name, value in metrics.items()})
        self.console.print(f"step {step}: " + "  ".join(f"{name} {_format(value)}" for name, value in metrics.items()))

    def summarize(self, results: Mapping[str, float]) -> None:
        """The run's final results, as the W&B run's summary (results.json holds them on disk)."""
        if self.active and self.wandb is not None:
            self.wandb.summary.update({name: float(value) for name, value in results.items()})

    def advance(self, step: int, examples_per_second: float | None = None) -> None:
        """Moves the progress bar to `step`."""
        if not self.active:
            return
        throughput = f"{examples_per_second:,.0f} ex/s" if examples_per_second else ""
        self.progress.update(self.task, completed=step, throughput=throughput)

    def close(self, failed: bool = False) -> None:
        if not self.active:
            return
        self.progress.stop()
        self.tensorboard.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)


def _clean(value: float) -> float | None:
    """JSON has no NaN or infinity: those are written as null."""
    value = float(value)
    return value if math.isfinite(value) else None


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
        check_loss: Callable[[int, float], None] | None = None,
    ):
        self.logger, self.batch_size, self.skip_nonfinite = logger, batch_size, skip_nonfinite
        self.throughput = throughput or Throughput()
        self.check_loss = check_loss or (lambda step, loss: None)  # the loss-spike rule (research/resilience)
        self.window, self.finished = [], None
        self.last_time, self.last_step = time.perf_counter(), start_step

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.window.append(metrics)

    def finish_window(self, step: int) -> None:
        if self.window:
            self.finished, self.window = (step, self.window), []

    def close_window(self, step: int) -> None:
        """Logs everything up to `step` now (the loop stops there): the finished window, then the open one."""
        self.flush()
        self.finish_window(step)
        self.flush()

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
            self.check_loss(step, float(metrics["loss"]))
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
