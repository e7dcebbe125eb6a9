"""The one entry point: train and evaluate an experiment.

  python launch.py --config experiments/digits_mlp.py --workdir runs/digits
  python launch.py --config experiments/digits_mlp.py:smoke --workdir runs/smoke --config.optimizer.learning_rate=3e-3
  python launch.py --list
  python launch.py --list_datasets [--data_dir DIR]
  python launch.py --config ... --workdir ... --local_processes 2      # 2 processes on this machine
  python launch.py --check_optimizer path/to/my_opt.py:make     # the optimizer conformance kit
  python launch.py --bench_optimizer adamw                       # steps/seconds to target vs baselines
  python launch.py --config experiments/mnist_mlp.py:cpu --sweep sweeps/adam_paper_mnist.py --sweep_parallel 2
  python launch.py --reproduce shakespeare_gpt:cpu              # measured vs published, PASS/FAIL

A trained run is used (generate, classify, evaluate, export) with predict.py beside this file.

`--config path.py:arg` passes `arg` to the module's `get_config`; `--config.a.b=v` overrides a
key. This is the only file that parses flags or sets up JAX: with several processes (SLURM,
Open MPI, a TPU pod, or --coordinator_address/--num_processes/--process_id) it starts
`jax.distributed` first.
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from research import runtime

runtime.configure_process()  # XLA flags, then the allocator (may re-execute once), before JAX starts: research/runtime.py


def _fake_devices(argv: list[str]) -> int:
    """CPU devices to fake before JAX starts: 8 for the optimizer kit, --dry_run_devices for a dry run."""
    for index, arg in enumerate(argv):
        if arg.startswith("--dry_run_devices"):
            return int(arg.split("=", 1)[1] if "=" in arg else argv[index + 1])
    return 8 if any(arg.startswith("--check_optimizer") for arg in argv) else 0


if _fake_devices(sys.argv):  # must happen before jax is imported
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_fake_devices(sys.argv)}"

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

# Unlocked while parsing so that open sections (research.config.OPEN_SECTIONS, e.g.
# --config.optimizer.kwargs.b1=0.95) accept new keys; _check_new_keys then rejects new keys
# anywhere else and locks the config.
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiment module and variant: experiments/NAME.py[:arg]", lock_config=False, accept_new_attributes=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for config.json, metrics.jsonl, TensorBoard events and results.json")
_LIST = flags.DEFINE_boolean("list", False, "list every experiment with its description, then exit")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_boolean(
    "allow_config_change", False, "resume even though the config differs from the checkpoint's (e.g. more steps)"
)
_LIST_DATASETS = flags.DEFINE_boolean("list_datasets", False, "list every dataset: prepared or not, where, splits and sizes; then exit")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data directory that --list_datasets inspects (default ~/tensorflow_datasets)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 when this is one of several processes")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "how many processes take part (with --coordinator_address)")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1 (with --coordinator_address)")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "compile the train step for the config's mesh and report memory, FLOPs and step times; train nothing")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 0, "fake this many CPU devices for the dry run (0: the real devices)")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed by the dry run's step times")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.0, "add an accelerator of this bf16 peak to the dry run's table")
_LOCAL_PROCESSES = flags.DEFINE_integer(
    "local_processes", 0, "start this many processes on 127.0.0.1 that train together (multi-host, tried on one machine)"
)
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/research/jax_compilation_cache",
    "persistent XLA compilation cache shared by every run on this machine, so a second launch does not recompile; '' turns it off",
)
_CHECK_OPTIMIZER = flags.DEFINE_string("check_optimizer", None, "run the conformance kit on an optimizer (name, file.py:fn or module:fn)")
_BENCH_OPTIMIZER = flags.DEFINE_string("bench_optimizer", None, "benchmark an optimizer against adamw and momentum on the CPU workloads")
_SWEEP = flags.DEFINE_string("sweep", None, "sweeps/NAME.py: run --config once per override set of its get_sweep(), in WORKDIR/RUN_NAME")
_SWEEP_PARALLEL = flags.DEFINE_integer("sweep_parallel", 1, "runs of a sweep at once, each on its share of the cores (0: one per core)")
_SWEEP_EMIT = flags.DEFINE_boolean("sweep_emit", False, "print the sweep's unfinished runs, one launch.py command a line, and run nothing")
_REPRODUCE = flags.DEFINE_string(
    "reproduce", None, "EXPERIMENT[:config] (or all:smoke): train its reference configs, print measured vs published, PASS/FAIL"
)

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _config_argument(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and index + 1 < len(argv):
            return argv[index + 1]
    return None


def _diagnose(argv: list[str], error: Exception) -> str:
    """Turns a flag-parsing failure into one line that says what was wrong and what to do."""
    from research import experiment

    argument = _config_argument(argv)
    if argument is None:
        return str(error).splitlines()[0]
    path, _, variant = argument.partition(":")
    try:
        base = experiment.load(path).get_config(variant or None)
    except Exception as load_error:  # the experiment itself is the problem: say so
        return str(load_error).splitlines()[0]
    overrides = [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    return experiment.unknown_key_message(base, overrides) or str(error).splitlines()[0]


def _check_new_keys(argv: list[str]) -> None:
    """Fails on an override that added a key outside the open sections, then locks the config."""
    from research import experiment
    from research.config import OPEN_SECTIONS

    overrides = [arg[len("--config.") :].split("=", 1)[0] for arg in argv if arg.startswith("--config.")]
    closed = [key for key in overrides if not key.startswith(tuple(section + "." for section in OPEN_SECTIONS))]
    argument = _config_argument(argv)
    if argument is not None and closed:
        path, _, variant = argument.partition(":")
        message = experiment.unknown_key_message(experiment.load(path).get_config(variant or None), closed)
        if message:
            fail(message)
    if isinstance(_CONFIG.value, ml_collections.ConfigDict):  # not a file that failed to load: main reports that
        _CONFIG.value.lock()


def _cluster_detected() -> bool:
    """Whether the environment describes several processes that jax.distributed can find on its own."""
    counts = (os.environ.get("SLURM_NTASKS"), os.environ.get("OMPI_COMM_WORLD_SIZE"))
    several_tpu_hosts = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return any(count and int(count) > 1 for count in counts) or several_tpu_hosts


def use_compilation_cache(directory: str) -> None:
    """Compiled executables are kept in `directory`, keyed by program, devices and flags."""
    import jax

    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).expanduser()))
    # Every compile, not only those over a second: the train step of a small config compiles in
    # less, and a launch has a handful of programs (init, train step, eval step).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", 4 * 2**30)  # least recently used entries go first


def start_distributed() -> None:
    """Joins the other processes, explicitly (--coordinator_address) or as the cluster says."""
    import jax

    explicit = _COORDINATOR.value is not None
    if not explicit and not _cluster_detected():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    if explicit:
        if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
            fail("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(_COORDINATOR.value, num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    else:
        jax.distributed.initialize()


def run_local_processes(count: int, argv: list[str]) -> int:
    """Runs this command as `count` processes on 127.0.0.1; process 0 prints, the others log to WORKDIR."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    arguments, skip_value = [], False
    for arg in argv[1:]:
        if skip_value or arg.startswith("--local_processes="):
            skip_value = False
            continue
        skip_value = arg == "--local_processes"
        if not skip_value:
            arguments.append(arg)
    logs = Path(_WORKDIR.value or ".") / "process_logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index in range(count):
        command = [sys.executable, argv[0], *arguments, f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}", f"--process_id={index}"]
        output = None if index == 0 else open(logs / f"process_{index}.log", "w")
        children.append(subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT if output else None))
    forward = lambda number, frame: [child.send_signal(number) for child in children]
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, forward)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


def parse_flags(argv: list[str]) -> list[str]:
    try:
        remaining = flags.FLAGS(argv)
    except Exception as error:  # config_flags raises whatever loading or overriding raised
        fail(_diagnose(argv, error))
    _check_new_keys(argv)
    return remaining


def run_optimizer_tool() -> None:
    """--check_optimizer or --bench_optimizer: print the kit's table or the benchmark's, then exit."""
    from research.config import ConfigError
    from research.optim import benchmark, conformance

    try:
        if _CHECK_OPTIMIZER.value:
            rows = conformance.check_optimizer(_CHECK_OPTIMIZER.value)
            print(conformance.format_table(rows))
            sys.exit(0 if all(row.passed for row in rows) else 1)
        print(benchmark.format_table(benchmark.run_benchmark(_BENCH_OPTIMIZER.value)))
    except ConfigError as error:
        fail(str(error))


def run_dry(module) -> None:
    """--dry_run: compile for the config's mesh (on fake devices if asked) and print the report."""
    from research import dry_run, sharding

    mesh = sharding.make_mesh(_CONFIG.value.mesh)
    accelerators = dict(dry_run.PEAK_TFLOPS) | ({"custom": _PEAK_TFLOPS.value} if _PEAK_TFLOPS.value else {})
    result = dry_run.dry_run(_CONFIG.value, module, mesh)
    print(dry_run.format_report(result, dict(mesh.shape), _MFU.value, accelerators))


def run_sweep_command() -> None:
    """--sweep: check every run's overrides, then emit its commands or run them; exit 1 if one failed."""
    from research import experiment, sweep

    argument = _config_argument(sys.argv)
    path, _, variant = argument.partition(":")
    default_root = Path("runs") / Path(_SWEEP.value).stem / (experiment.name_of(path) + (f"_{variant}" if variant else ""))
    root = _WORKDIR.value or str(default_root)
    runs = sweep.load_sweep(_SWEEP.value)
    sweep.check_overrides(_CONFIG.value, runs)
    launch = Path(__file__).resolve()
    passed = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]  # the command line's own overrides
    if _SWEEP_EMIT.value:  # absolute paths: a scheduler's job may start anywhere
        absolute = str(Path(path).resolve()) + (f":{variant}" if variant else "")
        for line in sweep.emit(runs, absolute, Path(root).resolve(), launch, passed):
            print(line)
        return
    parallel = _SWEEP_PARALLEL.value or len(os.sched_getaffinity(0))
    codes = sweep.run_sweep(runs, argument, root, parallel=parallel, launch=launch, extra=passed)
    failed = sorted(name for name, code in codes.items() if code)
    print(f"sweep finished in {root}: {len(codes) - len(failed)} ran, {len(failed)} failed {failed or ''}".rstrip())
    print(f"tables and figures: python -m research.report {root}")
    sys.exit(1 if failed else 0)


def run_reproduce() -> None:
    """--reproduce: train each selected reference's config (or find it finished) and print the comparison."""
    from research import experiment, reproduce

    names = [name for name, _ in experiment.describe(EXPERIMENTS_DIR)]
    load = lambda name: experiment.load(EXPERIMENTS_DIR / f"{name}.py")
    outcomes = reproduce.reproduce(_REPRODUCE.value, _WORKDIR.value or "runs/reproduce", load=load, names=names)
    print(reproduce.format_table(outcomes))
    sys.exit(0 if all(outcome.passed for outcome in outcomes) else 1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
    from research import experiment
    from research.config import ConfigError

    logging.set_verbosity(logging.WARNING)
    if _CHECK_OPTIMIZER.value or _BENCH_OPTIMIZER.value:
        return run_optimizer_tool()
    if _LIST.value:
        for name, description in experiment.describe(EXPERIMENTS_DIR):
            print(f"{name:24s} {description}")
        return
    if _LIST_DATASETS.value:
        logging.set_verbosity(logging.ERROR)  # tfds warns about every dataset not prepared yet
        from research.data import catalog

        print(catalog.format_table(catalog.describe(_DATA_DIR.value)))
        return
    try:
        if _REPRODUCE.value:
            return run_reproduce()
        if _SWEEP.value and _CONFIG.value is not None:
            return run_sweep_command()
    except ConfigError as error:
        fail(str(error))
    if _CONFIG.value is None or _WORKDIR.value is None:
        fail("pass --config experiments/NAME.py[:arg] and --workdir DIR (or --list to see the experiments)")
    if _LOCAL_PROCESSES.value:
        sys.exit(run_local_processes(_LOCAL_PROCESSES.value, sys.argv))
    start_distributed()
    use_compilation_cache(_COMPILATION_CACHE_DIR.value)
    import jax

    from research import train

    config_path = _config_argument(sys.argv).partition(":")[0]
    name = experiment.name_of(config_path)
    try:
        module = experiment.load(config_path)
        if _DRY_RUN.value:
            return run_dry(module)
        if jax.process_index() == 0:
            print(f"experiment {name} on {jax.process_count()} process(es), {jax.device_count()} device(s), "
                  f"allocator {runtime.allocator_in_use()}\n{_CONFIG.value}")
            experiment.claim_workdir(_WORKDIR.value, name, _CONFIG.value)
        results = train.train_and_evaluate(
            _CONFIG.value, module, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
        )
    except ConfigError as error:
        fail(str(error))
    except train.NonFiniteError as error:
        fail(str(error), code=3)
    if results and jax.process_index() == 0:
        print("final: " + "  ".join(f"{key} {value:.4f}" for key, value in results.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
