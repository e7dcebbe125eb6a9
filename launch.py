"""The one entry point: train and evaluate an experiment.

  python launch.py --config experiments/digits_mlp.py --workdir runs/digits
  python launch.py --config experiments/digits_mlp.py:smoke --workdir runs/smoke --config.optimizer.learning_rate=3e-3
  python launch.py --list
  python launch.py --list_datasets [--data_dir DIR]

`--config path.py:arg` passes `arg` to the module's `get_config`; `--config.a.b=v` overrides a
key. This is the only file that parses flags or sets up JAX.
"""

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment module and variant: experiments/NAME.py[:arg]")
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for config.json, metrics.jsonl, TensorBoard events and results.json")
_LIST = flags.DEFINE_boolean("list", False, "list every experiment with its description, then exit")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_boolean(
    "allow_config_change", False, "resume even though the config differs from the checkpoint's (e.g. more steps)"
)
_LIST_DATASETS = flags.DEFINE_boolean("list_datasets", False, "list every dataset: prepared or not, where, splits and sizes; then exit")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tfds data directory that --list_datasets inspects (default ~/tensorflow_datasets)")

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


def parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except Exception as error:  # config_flags raises whatever loading or overriding raised
        fail(_diagnose(argv, error))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags take the form --name=value")
    from research import experiment
    from research.config import ConfigError

    if _LIST.value:
        for name, description in experiment.describe(EXPERIMENTS_DIR):
            print(f"{name:24s} {description}")
        return
    if _LIST_DATASETS.value:
        logging.set_verbosity(logging.ERROR)  # tfds warns about every dataset not prepared yet
        from research.data import catalog

        print(catalog.format_table(catalog.describe(_DATA_DIR.value)))
        return
    if _CONFIG.value is None or _WORKDIR.value is None:
        fail("pass --config experiments/NAME.py[:arg] and --workdir DIR (or --list to see the experiments)")
    config_path = _config_argument(sys.argv).partition(":")[0]
    name = experiment.name_of(config_path)
    logging.set_verbosity(logging.WARNING)
    try:
        module = experiment.load(config_path)
        print(f"experiment {name}\n{_CONFIG.value}")
        experiment.claim_workdir(_WORKDIR.value, name, _CONFIG.value)
        from research import train

        results = train.train_and_evaluate(
            _CONFIG.value, module, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
        )
    except ConfigError as error:
        fail(str(error))
    except train.NonFiniteError as error:
        fail(str(error), code=3)
    if results:
        print("final: " + "  ".join(f"{key} {value:.4f}" for key, value in results.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
