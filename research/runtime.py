"""Process set-up that has to happen before JAX starts: XLA:CPU flags, and which memory allocator
serves XLA's buffers. The entry points (launch.py, predict.py, the benchmarks) call
`configure_process()` before they import JAX.

XLA flags. This jaxlib (0.10) hands 2-D convolutions with more than 16 channels to YNNPACK, whose
kernels ran 1.9-2.2x slower here than XLA's own (Eigen) convolutions on the MNIST CNN's and
ResNet-20's shapes (benchmarks/conv_kernels.py, 2026-11-24: MNIST conv 2 forward + input
gradient + weight gradient 113.6 -> 60.7 ms, PyTorch 53.5); the MNIST CNN's whole training step
went from 0.65x to 0.88-0.95x PyTorch's speed. `xla_flags` adds
--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION to XLA_FLAGS
for the jaxlib versions it was measured on (an XLA that does not know a flag aborts, and the
flag is experimental), unless XLA_FLAGS already sets it. Dots stay with YNNPACK: without it the
CNN step was slower (0.80x).

Allocator.

XLA:CPU allocates a compiled step's temporary buffers afresh on every call. glibc's malloc serves
blocks that large with mmap and unmaps them when they are freed, so every training step faults its
whole working set back in, 4 KiB at a time, and the kernel zeroes each page: on our 2-core machine
~300,000 page faults and 0.65 s of kernel time per GPT 6L/384d step (14% of the CPU time), 75,000
per ResNet-20 step. tcmalloc keeps freed memory for the next step (~100 faults, no kernel time);
with it our GPT steps ran 1.1-1.4x faster, PyTorch's within run-to-run noise (benchmarks/README.md).

RESEARCH_ALLOCATOR picks, in launch.py, predict.py and the benchmarks:
  auto       (default) tcmalloc when it is installed (Debian/Ubuntu: apt install libtcmalloc-minimal4),
             else glibc's malloc as it is;
  tcmalloc   tcmalloc, or a one-line error when it is not installed;
  hugepages  glibc's malloc asked for transparent huge pages (GLIBC_TUNABLES glibc.malloc.hugetlb=1,
             glibc >= 2.35): 2 MiB faults instead of 4 KiB ones (~1,000 a step), but each is a 2 MiB
             page to zero and, with the kernel's default THP defrag, sometimes to compact: measured
             between 0.8x and 1.1x of glibc's default, so only on request;
  system     glibc's malloc as it is.
Preloading a library or setting a glibc tunable only works from the process's start (the dynamic
loader reads them), so the process re-executes itself once with them in its environment, as
PyTorch's CPU launcher does.

Standard library only, so that it runs before JAX is imported.
"""

import ctypes.util
import importlib.metadata
import os
import sys

CHOICES = ("auto", "tcmalloc", "hugepages", "system")
VARIABLE = "RESEARCH_ALLOCATOR"
APPLIED = "RESEARCH_ALLOCATOR_APPLIED"  # set in the re-executed process: what it runs with
HUGEPAGES_TUNABLE = "glibc.malloc.hugetlb=1"
XLA_CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}
XLA_CPU_FLAGS_MEASURED_ON = ("0.10.",)  # jaxlib version prefixes whose XLA has these flags and was measured with them


def xla_flags(current: str, jaxlib_version: str | None) -> str:
    """XLA_FLAGS with XLA_CPU_FLAGS added: each flag only when `current` does not set it already,
    and none for a jaxlib outside XLA_CPU_FLAGS_MEASURED_ON (or none installed)."""
    if jaxlib_version is None or not jaxlib_version.startswith(XLA_CPU_FLAGS_MEASURED_ON):
        return current
    added = [f"--{name}={value}" for name, value in XLA_CPU_FLAGS.items() if f"--{name}=" not in current]
    return " ".join([*current.split(), *added])


def installed_jaxlib() -> str | None:
    """The installed jaxlib's version, read from its package metadata (no import), or None."""
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def configure_process() -> None:
    """The XLA flags into this process's environment, then the allocator (which may re-execute it)."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), installed_jaxlib())
    use_fast_allocator()


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
    if choice == "hugepages":
        tunables = [part for part in environ.get("GLIBC_TUNABLES", "").split(":") if part and not part.startswith("glibc.malloc.hugetlb=")]
        return dict(environ, GLIBC_TUNABLES=":".join([*tunables, HUGEPAGES_TUNABLE]), **{APPLIED: "hugepages"})
    if tcmalloc:
        preload = [tcmalloc, *filter(None, environ.get("LD_PRELOAD", "").split(":"))]
        return dict(environ, LD_PRELOAD=":".join(preload), **{APPLIED: "tcmalloc"})
    if choice == "tcmalloc":
        raise ValueError(f"{VARIABLE}=tcmalloc but no tcmalloc library is installed: install libtcmalloc-minimal4, or use {VARIABLE}=hugepages")
    return None  # auto without tcmalloc: glibc's malloc as it is


def use_fast_allocator() -> None:
    """Re-execute this process (same interpreter and arguments) with the allocator's environment, once."""
    if APPLIED in os.environ or os.environ.get(VARIABLE) == "system":
        return  # allocator_environment would say so too; this skips find_tcmalloc's ldconfig call
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
    """What this process's allocator is: tcmalloc, hugepages or system (with a hint when tcmalloc would help)."""
    applied = os.environ.get(APPLIED)
    if applied:
        return applied
    if os.environ.get(VARIABLE) == "system" or not sys.platform.startswith("linux"):
        return "system"
    return "system (apt install libtcmalloc-minimal4 for faster CPU steps: research/runtime.py)"
