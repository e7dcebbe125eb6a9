"""Timing helpers the CPU benchmarks share (no PyTorch import): a process's CPU-seconds, and a call timed over
repeats with the cores it kept busy."""

import resource
import time
from typing import Callable

from research import perf


def cpu_seconds() -> float:
    """This process's CPU time so far: every thread, user and system."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(call: Callable[[], object], calls: int, repeats: int = 5) -> tuple[float, float]:
    """(median seconds per call over `repeats` rounds of `calls` calls, cores busy over all of them), after one
    untimed call; `call` must wait for its result."""
    call()
    times, cpu_start, start = [], cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        begin = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - begin) / calls)
    return perf.median(times), (cpu_seconds() - cpu_start) / (time.perf_counter() - start)
