"""Finding and loading experiment modules, and guarding a workdir against mixing runs."""

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Iterable

import ml_collections

from research.config import ConfigError

REQUIRED = ("get_config", "make_data", "make_model", "loss_fn")
RUN_FILE = "config.json"


def name_of(path: str | Path) -> str:
    """An experiment's name is its module's name."""
    return Path(path).stem


def import_file(path: Path, module_name: str) -> ModuleType:
    """Executes a Python file as the module `module_name` (not entered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str | Path) -> ModuleType:
    """Imports an experiment module from its file and checks it exports the contract's functions."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no experiment file {str(path)!r}: pass --config experiments/NAME.py (see --list)")
    module = import_file(path, f"experiments.{name_of(path)}")
    missing = [name for name in REQUIRED if not callable(getattr(module, name, None))]
    if missing:
        raise ConfigError(f"{path} is not an experiment: it lacks {', '.join(missing)}")
    return module


def describe(directory: str | Path) -> list[tuple[str, str]]:
    """(name, first docstring line) of every experiment module in `directory`, read without importing."""
    entries = []
    for path in sorted(Path(directory).glob("*.py")):
        if path.name.startswith("_"):
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        entries.append((path.stem, docstring.strip().splitlines()[0] if docstring.strip() else ""))
    return entries


def unknown_key_message(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> str | None:
    """For the first dotted override key not in `config`, a one-line error naming the nearest valid key."""
    for key in overrides:
        node, nearest = config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                break
            if part not in node:
                part = (difflib.get_close_matches(part, list(node.keys()), n=1, cutoff=0.0) or [part])[0]
            nearest.append(part)
            node = node[part]
        if ".".join(nearest) != key:
            while isinstance(node, ml_collections.ConfigDict):  # complete a group to one of its leaves
                first = next(iter(node.keys()))
                nearest.append(first)
                node = node[first]
            return f"unknown config key {key!r}; did you mean {'.'.join(nearest)!r}?"
    return None


def claim_workdir(workdir: str | Path, experiment: str, config: ml_collections.ConfigDict) -> None:
    """Records the experiment and config in `workdir`; refuses a workdir that holds another experiment's run."""
    workdir = Path(workdir)
    run_file = workdir / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("experiment")
        if previous != experiment:
            raise ConfigError(
                f"workdir {str(workdir)!r} holds a run of experiment {previous!r}, not {experiment!r}: choose another --workdir"
            )
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"experiment": experiment, "config": json.loads(config.to_json_best_effort())}
    run_file.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
