"""Process set-up that has to happen before JAX starts: which memory allocator serves XLA's buffers.

XLA:CPU allocates a compiled step's temporary buffers afresh on every call. glibc's malloc serves
blocks that large with mmap and unmaps them when they are freed, so every training step faults its
whole working set back in, 4 KiB at a time, and the kernel zeroes each page: on our 2-core machine
~300,000 page faults and 0.65 s of kernel time per GPT 6L/384d step (14% of the CPU time), 75,000
per ResNet-20 step (benchmarks/README.md). Two cures, tried in this order by `auto`:
  tcmalloc   preloaded when installed (Debian: libtcmalloc-minimal4): it keeps freed memory for the
             next step; ~100 faults per step, no kernel time;
  hugepages  glibc's own malloc asked for transparent huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=1,
             glibc >= 2.35): 2 MiB faults instead of 4 KiB ones, ~1,000 per step.
Both are set by re-executing the process with the variables in its environment (the dynamic loader
reads them only at start), as PyTorch's CPU launcher does. RESEARCH_ALLOCATOR=system keeps the
process as it is; tcmalloc or hugepages insist on one.

Standard library only: launch.py and the benchmarks call `use_fast_allocator()` before importing JAX.
"""

import ctypes.util
import os
import sys

CHOICES = ("auto", "tcmalloc", "hugepages", "system")
VARIABLE = "RESEARCH_ALLOCATOR"
APPLIED = "RESEARCH_ALLOCATOR_APPLIED"  # set in the re-executed process: what it runs with
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library's name as the dynamic loader finds it, or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def allocator_environment(environ: dict[str, str], platform: str = sys.platform, tcmalloc: str | None = None) -> dict[str, str] | None:
    """The environment to re-execute with for the allocator `environ` asks for, or None to run as is."""
    choice = environ.get(VARIABLE, "auto")
    if choice not in CHOICES:
        raise ValueError(f"{VARIABLE}={choice!r} is not an allocator: use one of {', '.join(CHOICES)}")
    if APPLIED in environ or choice == "system" or not platform.startswith("linux"):
        return None
    if choice in ("auto", "tcmalloc") and tcmalloc:
        preload = [tcmalloc, *filter(None, environ.get("LD_PRELOAD", "").split(":"))]
        return dict(environ, LD_PRELOAD=":".join(preload), **{APPLIED: "tcmalloc"})
    if choice == "tcmalloc":
        raise ValueError(f"{VARIABLE}=tcmalloc but no tcmalloc library is installed: install libtcmalloc-minimal4, or use {VARIABLE}=hugepages")
    tunables = [part for part in environ.get("GLIBC_TUNABLES", "").split(":") if part and not part.startswith("glibc.malloc.hugetlb=")]
    return dict(environ, GLIBC_TUNABLES=":".join([*tunables, HUGEPAGES_TUNABLE]), **{APPLIED: "hugepages"})


def use_fast_allocator() -> None:
    """Re-execute this process (same interpreter and arguments) with the allocator's environment, once."""
    if APPLIED in os.environ or os.environ.get(VARIABLE) == "system":
        return
    try:
        environment = allocator_environment(dict(os.environ), tcmalloc=find_tcmalloc())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def allocator_in_use() -> str:
    """What this process's allocator is: tcmalloc, hugepages or system."""
    return os.environ.get(APPLIED, "system")
