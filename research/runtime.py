"""Process set-up for the entry points (launch.py, predict.py, the benchmarks): what must happen
before JAX starts, XLA:CPU flags and the memory allocator (`configure_process`, standard library
only), and what comes right after: fake CPU devices, jax.distributed and the compilation cache.

XLA flags: on the jaxlib versions measured (XLA_CPU_FLAGS_MEASURED_ON), 2-D convolutions run on
XLA's own kernels instead of YNNPACK's, which were slower on our CNNs (docs/performance.md); an
XLA_FLAGS that sets the flag itself wins, and an unmeasured jaxlib keeps its own choice (an XLA
that does not know a flag aborts).

Allocator: XLA:CPU allocates a step's temporaries afresh on every call, and glibc's malloc hands
such large blocks back to the kernel, so each step faults its working set in again.
RESEARCH_ALLOCATOR picks: `auto` (default: the first of AUTO_ORDER that is installed, else glibc's
malloc as it is), `mimalloc` (the cmeel-mimalloc wheel, a dependency on Linux, so pip installs it),
`tcmalloc` (the system's, e.g. apt install libtcmalloc-minimal4), `hugepages` (glibc with
transparent huge pages, GLIBC_TUNABLES glibc.malloc.hugetlb=1) or `system`; a named one that is
missing is a one-line error. A preload or tunable only works from a process's start, so the process
re-executes itself once with it. docs/performance.md has the measurements behind AUTO_ORDER.
"""

import contextlib
import ctypes.util
import importlib.metadata
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

CHOICES = ("auto", "mimalloc", "tcmalloc", "hugepages", "system")
AUTO_ORDER = ("tcmalloc", "mimalloc")  # the system's tcmalloc where installed (as fast or faster), else the wheel's
MIMALLOC = ("cmeel-mimalloc", "cmeel.prefix/lib/libmimalloc.so")  # the wheel and the library inside it
# mimalloc decommits freed pages after 10 ms by default, so a step still faulted ~4,000 pages back in; kept
# instead (as tcmalloc keeps them), a step faults none (docs/performance.md); an environment that sets it wins
MIMALLOC_OPTIONS = {"MIMALLOC_PURGE_DELAY": "-1"}
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
    """The XLA flags into this process's environment, then the allocator (which may re-execute it), then JAX
    started on the CPU without the accelerator plugins' start-up noise where the machine has no accelerator."""
    os.environ["XLA_FLAGS"] = xla_flags(os.environ.get("XLA_FLAGS", ""), installed_jaxlib())
    use_fast_allocator()
    if "JAX_PLATFORMS" not in os.environ and not accelerator_present():
        # JAX then initialises neither the CUDA plugin (a traceback: no CUDA) nor libtpu (no TPU worker); a
        # --target still reaches the TPU and GPU compilers through their topologies (research/tools/targets.py).
        os.environ["JAX_PLATFORMS"] = "cpu"
    if os.environ.get("JAX_PLATFORMS") == "cpu":
        import_jax_quietly()


# The lines the CUDA plugin's libraries write straight to file descriptor 2 (C++ logging before absl is set up)
# each time one is loaded on a machine without a GPU; nothing else is dropped.
PLUGIN_NOISE = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called")


def accelerator_present(root: str = "/") -> bool:
    """Whether the OS shows an NVIDIA or AMD GPU or a Google TPU: their device nodes, or a PCI device of NVIDIA or
    Google. Errs towards True (JAX then looks for itself); imports nothing."""
    dev, pci = Path(root, "dev"), Path(root, "sys/bus/pci/devices")
    nodes = ["nvidiactl", "nvidia0", "kfd", "accel0"]  # NVIDIA, AMD (ROCm), TPU v2-v5e
    if any((dev / node).exists() for node in nodes) or any(dev.glob("vfio/[0-9]*")):  # TPU v5p, v6e: VFIO
        return True
    vendors = {"0x10de", "0x1ae0"}  # NVIDIA, Google
    return any(path.read_text().strip() in vendors for path in pci.glob("*/vendor") if path.is_file())


@contextlib.contextmanager
def native_stderr_without(noise: Sequence[str]) -> Iterator[None]:
    """File descriptor 2, where C++ libraries log, into a temporary file for the block; then its lines that contain
    none of `noise` go to stderr as they came (Python's own writes and tracebacks included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not any(part in line for part in noise)))
            sys.stderr.flush()


def import_jax_quietly() -> None:
    """JAX imported and its plugins registered with the lines the CUDA plugin logs on a machine without a GPU
    dropped (each of its libraries logs once as it loads; JAX loads them whatever platform it is asked for)."""
    with native_stderr_without(PLUGIN_NOISE):
        import jax  # noqa: F401
        from jax._src import xla_bridge  # plugin discovery has no public entry; it runs once per process

        discover = getattr(xla_bridge, "_discover_and_register_pjrt_plugins", None)
        if discover is not None:
            discover()


def find_tcmalloc() -> str | None:
    """The tcmalloc shared library's name as the dynamic loader finds it, or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def find_mimalloc() -> str | None:
    """The path of the mimalloc library the cmeel-mimalloc wheel installed (read from its metadata), or None."""
    try:
        path = importlib.metadata.distribution(MIMALLOC[0]).locate_file(MIMALLOC[1])
    except importlib.metadata.PackageNotFoundError:
        return None
    return str(path) if Path(str(path)).is_file() else None


def find_allocators() -> dict[str, str]:
    """{name: library} of the preloadable allocators installed here."""
    found = {"mimalloc": find_mimalloc(), "tcmalloc": find_tcmalloc()}
    return {name: library for name, library in found.items() if library}


def allocator_environment(
    environ: dict[str, str], platform: str = sys.platform, libraries: dict[str, str] | None = None
) -> dict[str, str] | None:
    """The environment to re-execute with for the allocator `environ` asks for, or None to run as is.
    `libraries`: the installed preloadable allocators (find_allocators)."""
    choice, libraries = environ.get(VARIABLE, "auto"), libraries or {}
    if choice not in CHOICES:
        raise ValueError(f"{VARIABLE}={choice!r} is not an allocator: use one of {', '.join(CHOICES)}")
    if APPLIED in environ or choice == "system" or not platform.startswith("linux"):
        return None
    if choice == "hugepages":
        tunables = [
            part
            for part in environ.get("GLIBC_TUNABLES", "").split(":")
            if part and not part.startswith("glibc.malloc.hugetlb=")
        ]
        return dict(environ, GLIBC_TUNABLES=":".join([*tunables, HUGEPAGES_TUNABLE]), **{APPLIED: "hugepages"})
    wanted = AUTO_ORDER if choice == "auto" else (choice,)
    name = next((name for name in wanted if name in libraries), None)
    if name:
        preload = [libraries[name], *filter(None, environ.get("LD_PRELOAD", "").split(":"))]
        options = MIMALLOC_OPTIONS if name == "mimalloc" else {}
        return options | dict(environ, LD_PRELOAD=":".join(preload), **{APPLIED: name})
    if choice != "auto":
        how = "pip install cmeel-mimalloc" if choice == "mimalloc" else "install libtcmalloc-minimal4"
        raise ValueError(f"{VARIABLE}={choice} but no {choice} library is installed: {how}, or use {VARIABLE}=auto")
    return None  # auto with neither: glibc's malloc as it is


def use_fast_allocator() -> None:
    """Re-execute this process (same interpreter and arguments) with the allocator's environment, once."""
    if APPLIED in os.environ or os.environ.get(VARIABLE) == "system":
        return  # allocator_environment would say so too; this skips find_tcmalloc's ldconfig call
    try:
        environment = allocator_environment(dict(os.environ), libraries=find_allocators())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if environment is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def allocator_in_use() -> str:
    """What this process's allocator is: mimalloc, tcmalloc, hugepages or system (with a hint when a faster one
    would help)."""
    applied = os.environ.get(APPLIED)
    if applied:
        return applied
    if os.environ.get(VARIABLE) == "system" or not sys.platform.startswith("linux"):
        return "system"
    return "system (pip install cmeel-mimalloc for faster CPU steps: research/runtime.py)"


def use_fake_devices(count: int) -> None:
    """`count` CPU devices instead of one (before anything asks JAX for its devices): for the dry run and the
    optimizer kit."""
    import jax

    if count:
        jax.config.update("jax_num_cpu_devices", count)


def use_compile_target(target: str) -> None:
    """Before JAX starts: fake CPU devices for a `cpu:N` target; for a TPU or GPU target, JAX's own backend on
    the CPU (the target's compiler is reached through its topology, research/tools/targets.py). Without a TPU
    here, libtpu is told it runs on one host of the target's kind, which it would otherwise ask a metadata server
    for and log that it could not (the topology it compiles for is the target's either way)."""
    import jax

    if target.startswith("cpu:") and target[4:].isdigit():
        use_fake_devices(int(target[4:]))
    if target.startswith("tpu:") and not accelerator_present():
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target[4:].split("x")[0].replace("v5e-", "v5litepod-"))
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if target:
        jax.config.update("jax_platforms", "cpu")


def cluster_detected() -> bool:
    """Whether the environment describes several processes that jax.distributed can find on its own."""
    counts = (os.environ.get("SLURM_NTASKS"), os.environ.get("OMPI_COMM_WORLD_SIZE"))
    several_tpu_hosts = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return any(count and int(count) > 1 for count in counts) or several_tpu_hosts


# jax.distributed's own failure detection: a process silent this long is declared dead by the coordination
# service, and every other process aborts with a C++ stack trace. The PeerWatchdog (research/resilience/watchdog.py)
# notices a lost process sooner and says so in one line; this is the backstop behind it.
HEARTBEAT_TIMEOUT_SECONDS = 60


def start_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Joins the other processes: explicitly (a coordinator address) or as the cluster (SLURM,
    Open MPI, a TPU pod) describes them; a single process does nothing."""
    import jax

    if coordinator is None and not cluster_detected():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    if coordinator is None:
        jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS)
    elif num_processes is None or process_id is None:
        from research.errors import ConfigError

        raise ConfigError("--coordinator_address needs --num_processes and --process_id")
    else:
        jax.distributed.initialize(
            coordinator,
            num_processes=num_processes,
            process_id=process_id,
            heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS,
        )


def use_compilation_cache(directory: str) -> None:
    """Compiled executables are kept in `directory` ('' turns the cache off), keyed by program, devices and flags."""
    import jax

    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    # Every compile, not only those over a second: a small config's steps compile in less.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", 4 * 2**30)  # least recently used entries go first


def run_local_processes(count: int, argv: list[str], workdir: str | Path, grace_seconds: float = 60.0) -> int:
    """Runs launch.py's command line `argv` as `count` processes on 127.0.0.1 that train together;
    process 0 prints, the others log to WORKDIR/process_logs. When one fails, the others get
    `grace_seconds` to stop on their own (research/resilience/watchdog.py) before they are killed, and one line
    names the first to fail. Returns the first failure's exit code (128 + N for signal N)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logs = Path(workdir) / "process_logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index in range(count):
        coordinates = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={index}"]
        command = [sys.executable, *argv, "--local_processes=0", *coordinates]  # the last value of a flag wins
        output = None if index == 0 else open(logs / f"process_{index}.log", "w")
        children.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT if output else None))
    forward = lambda number, frame: [child.send_signal(number) for child in children]
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, forward)
    first_failure, deadline = None, None
    while any(child.poll() is None for child in children):
        failed = [index for index, child in enumerate(children) if child.poll()]
        if failed and first_failure is None:
            first_failure, deadline = failed[0], time.monotonic() + grace_seconds
        if deadline is not None and time.monotonic() > deadline:
            for child in children:
                child.kill()
        time.sleep(0.2)
    if first_failure is None:
        return 0
    code = children[first_failure].returncode
    ended = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    print(
        f"error: process {first_failure} of {count} ended with {ended} (its log: "
        f"{'above' if first_failure == 0 else logs / f'process_{first_failure}.log'}); every process has stopped; "
        "rerun the same command to resume from the newest complete checkpoint",
        file=sys.stderr,
    )
    return 128 - code if code < 0 else code
