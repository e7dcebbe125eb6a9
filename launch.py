"""Train an experiment, or run a tool on one. Flags only: each mode is one call into research/.

  python launch.py --config experiments/digits_mlp.py --workdir runs/digits
  python launch.py --config experiments/digits_mlp.py:smoke --workdir runs/smoke --config.optimizer.learning_rate=3e-3
  python launch.py --list                                         # the experiments
  python launch.py --list_datasets [--data_dir DIR]
  python launch.py --config ... --workdir ... --local_processes 2      # 2 processes on this machine
  python launch.py --config experiments/lm.py:llama2-70b --dry_run --target tpu:v5p-512  # compile for it: fit or not
  python launch.py --config experiments/lm.py:llama3-8b --plan --target gpu:h100:2x8 --config.batch_size=32  # meshes
  python launch.py --check_optimizer path/to/my_opt.py:make     # the optimizer conformance kit
  python launch.py --bench_optimizer adamw                       # the kit, then steps/seconds to target vs baselines
  python launch.py --config experiments/mnist_mlp.py:cpu --sweep sweeps/adam_paper_mnist.py --sweep_parallel 2
  python launch.py --config experiments/lm.py --compare_optimizers adamw,muon --workdir runs/compare  # tuned, seeds
  python launch.py --reproduce shakespeare_gpt:cpu              # measured vs each reference value, PASS/FAIL

`--config path.py:arg` passes `arg` to the module's `get_config`; `--config.a.b=v` overrides a key
(a key the config lacks is an error naming the nearest, except in the open `optimizer.kwargs`).
A trained run is used (generate, classify, evaluate, export) with predict.py beside this file.
"""

import sys
from pathlib import Path

from research import runtime

runtime.configure_process()  # XLA flags and the allocator (may re-execute once), before JAX starts

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from research import errors, experiment  # noqa: E402
from research.config import keep_optimizer_settings_apart  # noqa: E402
from research.errors import fail  # noqa: E402

EXPERIMENTS_DIR = Path(__file__).parent / "experiments"
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "experiments/NAME.py[:variant]", lock_config=False, accept_new_attributes=True
)
flags.FLAGS["config"].parser = experiment.ConfigFileParser()  # loads the experiment once and keeps it
_WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory: config, metrics, checkpoints, results")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_boolean("allow_config_change", False, "resume although the config changed")
_PRINT_CONFIG = flags.DEFINE_boolean("print_config", False, "print the whole config (WORKDIR/config.json has it)")
_LIST = flags.DEFINE_boolean("list", False, "list every experiment with its description")
_LIST_DATASETS = flags.DEFINE_boolean("list_datasets", False, "list every dataset: prepared or not, where, sizes")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "the tfds directory --list_datasets reads (~/tensorflow_datasets)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 of several processes")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "how many processes take part")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index, 0 .. num_processes - 1")
_LOCAL_PROCESSES = flags.DEFINE_integer("local_processes", 0, "train as this many processes on 127.0.0.1")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", "~/.cache/research/jax_compilation_cache", "'': off")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "compile the train step for --target: memory, fit, FLOPs, step time")
_PLAN = flags.DEFINE_boolean("plan", False, "search meshes, remat, micro-batches for --target; rank what fits")
_TARGET = flags.DEFINE_string("target", "", "tpu:v5p-512, tpu:v5e-256x2, gpu:h100:8, gpu:h200:4x8, cpu:8 ('': here)")
_MFU = flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation the dry run's step times assume")
_TOKEN_BUDGET = flags.DEFINE_float("token_budget", 0.0, "tokens the dry run gives days for (0: num_steps' worth)")
_PLAN_WORKERS = flags.DEFINE_integer("plan_workers", 2, "candidate compiles at once")
_CHECK_OPTIMIZER = flags.DEFINE_string("check_optimizer", None, "the conformance kit on NAME, file.py:fn or module:fn")
_BENCH_OPTIMIZER = flags.DEFINE_string("bench_optimizer", None, "steps to target against adamw and momentum")
_SWEEP = flags.DEFINE_string("sweep", None, "sweeps/NAME.py: a run of --config per override set, in WORKDIR/NAME")
_SWEEP_PARALLEL = flags.DEFINE_integer("sweep_parallel", 1, "runs at once, each on its share of the cores (0: a core)")
_SWEEP_EMIT = flags.DEFINE_boolean("sweep_emit", False, "print the unfinished runs' commands; run nothing")
_SWEEP_SLURM = flags.DEFINE_string("sweep_slurm", "", "write the unfinished runs as a SLURM job array script here")
_COMPARE = flags.DEFINE_list("compare_optimizers", None, "tune each one's rate on --config's BENCHMARK, then seeds")
_COMPARE_SEEDS = flags.DEFINE_integer("compare_seeds", 3, "seeds at each optimizer's best rate")
_REPRODUCE = flags.DEFINE_string("reproduce", None, "EXPERIMENT[:config] or all:smoke: measured vs reference values")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with every mistake in --config (file, variant, override key or value) as one line."""
    parser = flags.FLAGS["config"].parser
    try:
        remaining = flags.FLAGS(argv)
    except Exception as error:  # config_flags raises whatever loading or overriding raised
        # An override under a section the config lacks stops config_flags before it lists the overrides.
        keys = [arg.split("=", 1)[0][len("--config.") :] for arg in argv if arg.startswith("--config.")]
        unknown = parser.base_config is not None and experiment.unknown_key_message(parser.base_config, keys)
        fail(str(parser.error or unknown or error).splitlines()[0])
    if parser.error is not None:
        fail(str(parser.error).splitlines()[0])
    if parser.base_config is not None:
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        unknown = experiment.unknown_key_message(parser.base_config, overrides)
        if unknown:
            fail(unknown)
        keep_optimizer_settings_apart(parser.base_config, _CONFIG.value, overrides)
        _CONFIG.value.lock()
    return remaining


def tool_mode() -> bool:
    """The modes that need no --config and --workdir; True when one ran."""
    if _CHECK_OPTIMIZER.value:
        from research.tools import check_optimizer

        runtime.use_fake_devices(8)  # the kit checks sharding on 8 devices
        sys.exit(0 if check_optimizer.main(_CHECK_OPTIMIZER.value) else 1)
    if _BENCH_OPTIMIZER.value:
        from research.tools import bench_optimizer

        runtime.use_fake_devices(8)  # the kit checks sharding on 8 devices; the benchmark uses one
        sys.exit(0 if bench_optimizer.main(_BENCH_OPTIMIZER.value, EXPERIMENTS_DIR) else 1)
    elif _LIST.value:
        for name, description in experiment.describe(EXPERIMENTS_DIR):
            print(f"{name:24s} {description}")
    elif _LIST_DATASETS.value:
        from research.data import catalog

        logging.set_verbosity(logging.ERROR)  # tfds warns about every dataset not prepared yet
        print(catalog.format_table(catalog.describe(_DATA_DIR.value)))
    elif _REPRODUCE.value:
        from research.tools import reproduce

        sys.exit(0 if reproduce.main(_REPRODUCE.value, _WORKDIR.value, EXPERIMENTS_DIR) else 1)
    else:
        return False
    return True


def compile_only(module, config_argument: str) -> None:
    """--dry_run and --plan: compile for --target (its own compiler, on this CPU) and report; exit 1 if nothing fits."""
    if module is None:
        fail("pass --config experiments/NAME.py[:arg] with --dry_run or --plan")
    runtime.use_compile_target(_TARGET.value)
    from research.tools import dry_run, plan, targets

    target = _TARGET.value or targets.local_target()
    if _PLAN.value:
        options = dict(mfu=_MFU.value, workers=_PLAN_WORKERS.value)
        sys.exit(0 if plan.main(_CONFIG.value, module, config_argument, target, **options) else 1)
    sys.exit(0 if dry_run.main(_CONFIG.value, module, target, _MFU.value, _TOKEN_BUDGET.value) else 1)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
    logging.set_verbosity(logging.WARNING)
    with errors.exit_on_error():
        if tool_mode():
            return
        module = flags.FLAGS["config"].parser.module
        if _DRY_RUN.value or _PLAN.value:
            return compile_only(module, config_flags.get_config_filename(flags.FLAGS["config"]))
        if (
            module is None or not _WORKDIR.value and not (_SWEEP.value or _COMPARE.value)
        ):  # None, or '' (which would be the current one)
            fail("pass --config experiments/NAME.py[:arg] and --workdir DIR (or --list to see the experiments)")
        config_argument = config_flags.get_config_filename(flags.FLAGS["config"])
        overrides = config_flags.get_override_values(flags.FLAGS["config"])
        if _COMPARE.value:
            from research.tools import compare_optimizers

            options = dict(parallel=_SWEEP_PARALLEL.value, seeds=_COMPARE_SEEDS.value, launch=Path(__file__).resolve())
            workdir = _WORKDIR.value or str(
                Path("runs") / "compare" / experiment.name_of(config_argument.partition(":")[0])
            )
            passed = compare_optimizers.main(
                _CONFIG.value, module, config_argument, _COMPARE.value, workdir, overrides=overrides, **options
            )
            sys.exit(0 if passed else 1)
        if _SWEEP.value:
            from research.tools import sweep

            options = dict(
                parallel=_SWEEP_PARALLEL.value,
                emit_only=_SWEEP_EMIT.value,
                launch=Path(__file__).resolve(),
                slurm_script=_SWEEP_SLURM.value,
            )
            passed = sweep.main(
                _CONFIG.value, config_argument, _SWEEP.value, _WORKDIR.value, overrides=overrides, **options
            )
            sys.exit(0 if passed else 1)
        if _LOCAL_PROCESSES.value:
            sys.exit(runtime.run_local_processes(_LOCAL_PROCESSES.value, sys.argv, _WORKDIR.value))
        runtime.start_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
        runtime.use_compilation_cache(_COMPILATION_CACHE.value)
        from research import train

        name = experiment.name_of(config_argument.partition(":")[0])
        overrides = None if _PRINT_CONFIG.value else config_flags.get_override_values(flags.FLAGS["config"])
        options = dict(overrides=overrides, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
        train.launch(_CONFIG.value, module, name, _WORKDIR.value, **options)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
