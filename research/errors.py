"""Every error a run reports in one line, and how the entry points (launch.py, predict.py) end on one.

A `ConfigError` (and its kinds) is something the user gives wrongly: a config, a file, a workdir. The others
are a run's failures that a rerun or a change of config mends. `exit_on_error` turns each into one line on
stderr and its exit status, never a traceback; anything else is a bug and keeps its traceback.
"""

import contextlib
import logging
import os
import re
import sys
import threading
import warnings
from typing import Iterator

# Exit statuses: 1 is a tool's FAIL (a reproduction, a sweep), 5 the lost-process watchdog's
# (research/resilience/watchdog.py), 2 a bad input.
BAD_INPUT_EXIT, NON_FINITE_EXIT, STORAGE_EXIT, OUT_OF_MEMORY_EXIT = 2, 3, 4, 6

TRAINING_MEMORY_ADVICE = (
    "a smaller batch_size, more accumulate_steps, model.remat=full, or a larger mesh.fsdp "
    "(launch.py --dry_run --target shows the need)"
)
MEMORY_FRACTION_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")  # JAX's GPU pool size


class ConfigError(ValueError):
    """A bad config, experiment, file or workdir: reported in one line, without a traceback."""


class OptimizerError(ConfigError):
    """An optimizer that cannot be made or does not meet the contract (research/optim/contract.py)."""


class MissingDataError(ConfigError):
    """A dataset that is neither prepared nor available offline, with where to put its files."""


class NonFiniteError(RuntimeError):
    """The loss or the gradients became NaN or infinite (or the loss spiked: `LossSpikeError`) at `step`."""

    def __init__(self, message: str, step: int = 0):
        super().__init__(message)
        self.step = step  # the first bad step


class LossSpikeError(NonFiniteError):
    """The loss stayed above k times its recent median for n consecutive steps."""


class StorageError(RuntimeError):
    """A file the run writes or reads failed (a full disk, a permission, a directory removed under it)."""


def fail(message: str, code: int = BAD_INPUT_EXIT) -> None:
    """Ends the process with `error: MESSAGE` on stderr."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def out_of_memory(error: BaseException, advice: str = TRAINING_MEMORY_ADVICE) -> str:
    """One line for a device that ran out of memory compiling or running a program (a JaxRuntimeError saying so),
    with `advice`; "" for any other error. On a GPU it names the pool JAX took (75 % by default)."""
    text = str(error)
    said = re.search(r"(Ran out|Out) of memory[^\n]*", text)  # XLA:TPU's compiler; the GPU and CPU allocators
    if type(error).__name__ not in ("JaxRuntimeError", "XlaRuntimeError") or not said:
        return ""
    import jax

    device = jax.local_devices()[0]
    detail = said.group(0).strip().rstrip(".")
    pool = (device.memory_stats() or {}).get("bytes_limit") if device.platform == "gpu" else None
    where = f"{device.device_kind} ({pool / 2**30:.1f} GiB pool)" if pool else device.device_kind
    if device.platform == "gpu" and not any(name in os.environ for name in MEMORY_FRACTION_VARIABLES):
        advice = "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 (JAX takes 75 % of a GPU by default), " + advice
    return f"out of memory on {where}: {detail}; try {advice}"


def quiet_file_errors() -> None:
    """After a failed write is reported: the libraries' writer threads, exit handlers and event loops
    (tensorboardX's, orbax's, tensorstore's) meet the same full disk again; nothing of theirs is printed after
    the message."""
    logging.disable(logging.CRITICAL)  # asyncio's "exception was never retrieved", absl's
    warnings.simplefilter("ignore")  # an interrupted writer's "coroutine ... was never awaited" at exit
    threading.excepthook = lambda hook: None if issubclass(hook.exc_type, OSError) else threading.__excepthook__(hook)
    sys.unraisablehook = lambda hook: None if isinstance(hook.exc_value, OSError) else sys.__unraisablehook__(hook)


@contextlib.contextmanager
def exit_on_error(
    memory_advice: str = TRAINING_MEMORY_ADVICE,
    memory_exit: int = OUT_OF_MEMORY_EXIT,
    bad_input: tuple[type[Exception], ...] = (ConfigError,),
) -> Iterator[None]:
    """The entry points' one-line endings: a bad input (exit 2), a NonFiniteError (3), a StorageError (4),
    a device out of memory (`memory_exit`, with `memory_advice`); any other exception goes on."""
    try:
        yield
    except bad_input as error:
        fail(str(error).splitlines()[0])
    except NonFiniteError as error:
        fail(str(error), NON_FINITE_EXIT)
    except StorageError as error:
        quiet_file_errors()
        fail(str(error), STORAGE_EXIT)
    except RuntimeError as error:  # jax.errors.JaxRuntimeError: a device out of memory is a config to change
        if not (message := out_of_memory(error, memory_advice)):
            raise
        fail(message, memory_exit)
