"""The experiment contract, and finding, loading and checking experiment modules.

An experiment is a module of plain functions (experiments/NAME.py; the module's name is the
experiment's). `Experiment` lists what every one defines. `Hooks` lists what one may define:
each is read, through `hook(module, name)`, only by the code that needs it, so an experiment
leaves out what does not apply. Two hooks are data: `REFERENCES`, numbers (published, or this
repository's own earlier runs) that `--reproduce` trains and compares, and `BENCHMARK`, the
experiment as a workload of `--bench_optimizer`.
"""

import ast
import copy
import dataclasses
import difflib
import functools
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping, Protocol

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import flags

from research.config import OPEN_SECTIONS
from research.errors import ConfigError

RUN_FILE = "config.json"
Batch = Mapping[str, np.ndarray]


class Experiment(Protocol):
    """What every experiment module defines."""

    def get_config(self, arg: str | None = None) -> ml_collections.ConfigDict:
        """trainer_config() plus `data` and `model` sections; `arg` names a variant (every experiment has "smoke")."""

    def make_data(self, config: ml_collections.ConfigDict, split: str) -> Iterable[Batch]:
        """Numpy batches with a `mask`: endless and shuffled for "train", one padded pass for "validation", "test"."""

    def make_model(self, config: ml_collections.ConfigDict) -> nn.Module:
        """The configured Flax module."""

    def loss_fn(self, params, batch: Batch, rng: jax.Array | None, *, model: nn.Module) -> tuple[jax.Array, dict]:
        """(mean loss, auxiliary metrics); rng is None in evaluation (no dropout)."""


class Hooks(Protocol):
    """What an experiment module may define; the code that needs one reads it with `hook(module, name)`."""

    def eval_fn(self, params, batch: Batch, *, model: nn.Module) -> dict:
        """Metric accumulators (research.metrics) of one batch; without it, the loss_fn's values as means."""

    def init_variables(self, model: nn.Module, rng: jax.Array, batch: Batch) -> dict:
        """The model's variables ({"params": ..., other collections}); without it, model.init(rng, batch["inputs"])."""

    def flops_per_example(self, config: ml_collections.ConfigDict) -> float:
        """Training FLOPs of one example: the log then has perf/mfu."""

    def tokens_per_example(self, config: ml_collections.ConfigDict) -> int:
        """Tokens one example trains on: the log then has perf/tokens_per_second."""

    def decoder_shape(self, config: ml_collections.ConfigDict) -> "DecoderShape":
        """A decoder's shape: the dry run's activation count and remat cost, what the planner searches (--plan)."""

    def encode_text(self, config: ml_collections.ConfigDict, text: str) -> np.ndarray:
        """A language model's token ids of a prompt; with decode_tokens, predict.py generates and reports perplexity."""

    def decode_tokens(self, config: ml_collections.ConfigDict, ids) -> str:
        """A language model's text of token ids (also the vocabulary an export carries)."""

    def end_ids(self, config: ml_collections.ConfigDict) -> tuple[int, ...]:
        """Token ids that end a generated text (export writes them as generation_config.json's eos_token_id)."""

    def tokenizer_file(self, config: ml_collections.ConfigDict) -> str:
        """The tokenizer.json a language model reads its text with, "" for none (export copies it)."""

    def token_pieces(self, config: ml_collections.ConfigDict, ids) -> list[str]:
        """Each token id's text, for the pictures of a text model (without it: decode_tokens one id at a time)."""

    def class_names(self, config: ml_collections.ConfigDict) -> list[str]:
        """A classifier's class names, printed and exported instead of indices."""

    def logits_fn(self, variables: dict, inputs: jax.Array, *, model: nn.Module) -> jax.Array:
        """The prediction, when model.apply(variables, inputs) is not it."""

    def hf_layout(self, config: ml_collections.ConfigDict) -> str:
        """The Hugging Face model_type (a key of research/tools/hf/'s LAYOUTS) that export writes its model as."""

    def make_tx(self, config: ml_collections.ConfigDict) -> optax.GradientTransformation:
        """The optimizer; without it, research/optim's make_tx(config) (LoRA's trains its adapters only)."""

    def param_rules(self, config: ml_collections.ConfigDict) -> tuple:
        """The parameters' sharding rules; without it, config.param_rules (LoRA's adds its adapters')."""

    def trainable(self, params) -> Any:
        """Whether each parameter gets a gradient (a tree of bools); without it, all do (the dry run counts them)."""

    def loaded_variables(self, abstract_model_state: dict) -> dict:
        """Model-state collections loaded from elsewhere once the state is initialised, as arrays placed like
        `abstract_model_state`'s ShapeDtypeStructs (a distillation teacher's weights: research/features/distill.py)."""

    REFERENCES: tuple["Reference", ...]  # numbers that --reproduce trains and compares (see Reference.kind)
    BENCHMARK: "Workload"  # this experiment as a workload of --bench_optimizer


HOOKS = frozenset(name for name in vars(Hooks) if not name.startswith("_")) | frozenset(Hooks.__annotations__)


def logits_of(module: ModuleType, model: nn.Module, variables: dict, inputs: jax.Array) -> jax.Array:
    """An experiment's prediction for a batch: its `logits_fn` hook, else model.apply(variables, inputs)."""
    logits_fn = hook(module, "logits_fn")
    return logits_fn(variables, inputs, model=model) if logits_fn else model.apply(variables, inputs)


def hook(module: Any, name: str, default: Any = None) -> Any:
    """The experiment's hook `name` (one of `Hooks`), or `default` when the module does not define it."""
    if name not in HOOKS:
        raise KeyError(f"{name!r} is not an experiment hook; the hooks are {sorted(HOOKS)}")
    return getattr(module, name, default)


REFERENCE_KINDS = {
    "published": "a paper, README or leaderboard",
    "ours": "this repository's own earlier run (a regression guard)",
    "truth": "the value the data was generated with",
}


@dataclasses.dataclass(frozen=True)
class Reference:
    """A number an experiment's config should reproduce (`--reproduce`), and what kind of number it is.

    A result passes when |measured - value| <= tolerance; with better="min" (a loss)
    anything lower passes too, with better="max" (an accuracy) anything higher."""

    config: str | None  # the get_config argument: "cpu", "smoke", or None for the default config
    metric: str  # a key of the final results: "eval/loss", "test/accuracy", ...
    value: float
    tolerance: float
    source: str  # the paper, table, README or run the number comes from
    kind: str  # one of REFERENCE_KINDS: a reader must tell a paper's number from our own earlier one
    better: str = ""  # "", "min" or "max"
    overrides: tuple[tuple[str, Any], ...] = ()  # dotted config keys set on top of the config

    def __post_init__(self):
        if self.better not in ("", "min", "max") or not self.tolerance >= 0:
            raise ConfigError(f"Reference {self.metric}: better must be '', 'min' or 'max' and tolerance >= 0")
        if self.kind not in REFERENCE_KINDS:
            raise ConfigError(f"Reference {self.metric}: kind must be one of {', '.join(REFERENCE_KINDS)}")

    def passes(self, measured: float | None) -> bool:
        """Whether `measured` reproduces this reference."""
        if measured is None or not math.isfinite(measured):
            return False
        if (self.better == "min" and measured <= self.value) or (self.better == "max" and measured >= self.value):
            return True
        return abs(measured - self.value) <= self.tolerance + 1e-12


@dataclasses.dataclass(frozen=True)
class Workload:
    """The experiment's default config as an optimizer-benchmark workload: steps until a validation target."""

    metric: str  # an evaluation metric, e.g. "accuracy"
    target: float
    mode: str  # "min" or "max": the side of the target that counts as reached
    eval_every: int
    budget: int  # steps before the run counts as not reaching the target
    baseline_learning_rates: tuple[tuple[str, float], ...]  # (baseline optimizer, its learning rate on this workload)


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """A decoder's shape, the `decoder_shape` hook's answer: what research/perf.py's activation count, the dry
    run's remat cost and the planner read, so that no tool reads a config's layout. The two keys name the config
    settings the planner varies (its `--config.` overrides); "" where the experiment has none."""

    layers: int
    width: int  # the residual stream
    heads: int
    kv_heads: int  # key/value heads: fewer than `heads` under grouped-query attention
    head_dim: int
    mlp_dim: int  # the MLP's hidden units (SwiGLU: each of its two input projections)
    vocab: int
    length: int  # tokens of one training example
    remat: str  # a policy of research/models/transformer.py's REMAT_POLICIES
    scan_layers: bool  # the layers under nn.scan: one compiled block whatever the depth
    dtype_bytes: int  # one activation in the compute dtype
    fused_attention: bool  # a fused kernel keeps softmax statistics, not the L x L weights
    loss_chunk: int = 0  # positions the loss's head takes at a time; 0: the whole window
    attention: str = "auto"  # the attention implementation asked for (research/models/kernels.py)
    layer_windows: tuple[int, ...] = ()  # each layer's attention window (0: every earlier position); (): all 0
    attention_softcap: float = 0.0  # > 0: scores soft-capped (kernels that cannot, cuDNN's, are not chosen)
    experts: int = 0  # > 0: each MLP a mixture of this many experts of mlp_dim each (research/models/moe.py)
    experts_per_token: int = 0  # the experts each token is routed to
    capacity_factor: float = 0.0  # > 0: the capacity dispatch's slots per expert over a fair share; 0: dropless
    remat_key: str = ""  # the dotted config key of `remat`
    scan_layers_key: str = ""  # the dotted config key of `scan_layers`
    pipeline: tuple = (0, 1, False, False)  # under a `stage` axis: micro-batches (0: one per stage), repeats, remat
    # of a whole stage, weights gathered once a step (research/models/pipeline.py)
    pipeline_key: str = ""  # the prefix of those settings' config keys (PREFIX_microbatches, ...)


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
    """Imports an experiment module from its file and checks that it defines the contract's functions."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no experiment file {str(path)!r}: pass --config experiments/NAME.py (see --list)")
    module = import_file(path, f"experiments.{name_of(path)}")
    missing = [
        name
        for name in ("get_config", "make_data", "make_model", "loss_fn")
        if not callable(getattr(module, name, None))
    ]
    if missing:
        raise ConfigError(f"{path} is not an experiment: it lacks {', '.join(missing)}")
    return module


def describe(directory: str | Path) -> list[tuple[str, str]]:
    """(name, first docstring line) of every experiment module in `directory`, read without importing."""
    entries = []
    for path in sorted(Path(directory).glob("[!_]*.py")):
        docstring = (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").strip()
        entries.append((path.stem, docstring.splitlines()[0] if docstring else ""))
    return entries


def unknown_key_message(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> str | None:
    """For the first dotted key of `overrides` that `config` lacks (open sections excepted), a
    one-line error naming the nearest valid key."""
    for key in overrides:
        if key.startswith(tuple(section + "." for section in OPEN_SECTIONS)):
            continue
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


class ConfigFileParser(flags.ArgumentParser):
    """The parser behind launch.py's `config_flags.DEFINE_config_file` flag: loads the experiment module
    once (with our one-line errors) and keeps it, its unmodified config (to check override keys
    against) and any error, which launch.py reports once parsing ends."""

    def __init__(self):
        self.module = self.base_config = self.error = None

    def flag_type(self) -> str:
        return "config object"

    def parse(self, argument: str) -> ml_collections.ConfigDict:
        path, _, variant = argument.partition(":")
        try:
            self.module = load(path)
            config = self.module.get_config(variant or None)
        except Exception as error:  # reported in one line once parsing ends (launch.py)
            self.error = error
            return ml_collections.ConfigDict()
        self.base_config = copy.deepcopy(config)
        return config


def claim_workdir(
    workdir: str | Path, experiment: str, config: ml_collections.ConfigDict, overwrite: bool = True
) -> None:
    """Records the experiment and config in `workdir`; refuses a workdir that holds another experiment's run.
    With `overwrite` False an existing record is kept (a resume whose config the checkpoint may yet refuse)."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {str(workdir)!r} is a file: give a directory (a new one, or a run's)")
    run_file = workdir / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8")).get("experiment")
        if previous != experiment:
            raise ConfigError(
                f"workdir {str(workdir)!r} holds a run of experiment {previous!r}, not {experiment!r}: "
                "choose another --workdir"
            )
        if not overwrite:
            return
    workdir.mkdir(parents=True, exist_ok=True)
    record = {"experiment": experiment, "config": json.loads(config.to_json_best_effort())}
    written = run_file.with_name(run_file.name + ".tmp")
    written.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    written.replace(run_file)  # a reader never sees half a file


def saved_run(workdir: str | Path, experiments_dir: str | Path) -> tuple[str, ModuleType, ml_collections.ConfigDict]:
    """A trained run's (experiment name, module, config): the saved config over the module's current defaults,
    so a key added since the run (pruning, say) has its default, which is what the run ran with."""
    run_file = Path(workdir) / RUN_FILE
    if not run_file.is_file():
        raise ConfigError(f"no {RUN_FILE} in {workdir}: pass the --workdir of a run started with launch.py")
    record = json.loads(run_file.read_text(encoding="utf-8"))
    module = load(Path(experiments_dir) / f"{record['experiment']}.py")
    merged = module.get_config().to_dict()

    def overlay(target: dict, source: dict) -> None:
        for key, value in source.items():
            if isinstance(value, dict) and isinstance(target.get(key), dict):
                overlay(target[key], value)
            else:
                target[key] = value

    overlay(merged, record["config"])
    return record["experiment"], module, ml_collections.ConfigDict(merged)


def settings_of(workdir: str | Path, experiment_file: str | Path, keys: Iterable[str]) -> dict[str, Any]:
    """Another run's values of the dotted config `keys` (lists as tuples), for a run of the same experiment
    (`experiment_file`) that continues from it, such as a fine-tune taking its model's settings."""
    if not (Path(workdir) / RUN_FILE).is_file():
        raise ConfigError(f"{workdir}: no {RUN_FILE}, so not a run to continue from: give a run's workdir")
    name, _, config = saved_run(workdir, Path(experiment_file).parent)
    if name != name_of(experiment_file):
        raise ConfigError(f"{workdir} holds a run of experiment {name!r}, not of {name_of(experiment_file)!r}")
    values = {}
    for key in keys:
        try:
            values[key] = functools.reduce(lambda node, part: node[part], key.split("."), config)
        except KeyError:  # a setting newer than that run: its default is what the run had
            continue
    return {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
