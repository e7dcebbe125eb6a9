"""Hugging Face checkpoints in and out: `config.json` + safetensors in the layout `transformers` loads.

  python -m research.tools.hf import HF_DIR WORKDIR [--scan_layers] [--experiment experiments/lm.py:cpu]
  python -m research.tools.hf export WORKDIR HF_DIR [--checkpoint latest] [--max_shard_size 5GB]

Architectures: LlamaForCausalLM, GPT2LMHeadModel (research/models/llama.py, gpt.py; as runs of
experiments/lm.py) and BertForMaskedLM (bert.py's post-LayerNorm encoder, BERT as published: the
functions from_hf / to_hf; bert_pretrain's pre-LayerNorm encoder has no transformers equivalent).
Each model states its own layout (`hf_config`, `hf_tensors`: research/models/exchange.py); this module
reads and writes the files and checks them: a file that does not fit (another architecture, a missing
tensor, a wrong shape, a rope scaling not implemented) is a one-line ConfigError naming the tensor.
`import` writes a step-0 run (an Orbax checkpoint of the train state and config.json, with the
checkpoint's tokenizer.json when it has one) that `init_from.workdir` fine-tunes, predict.py
generates from, and launch.py trains on. Large models are written as shards with
`model.safetensors.index.json`, as `save_pretrained` does.
"""

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

from research.config import ConfigError
from research.models import bert, exchange, gpt, llama
from research.tree import named_leaves

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.json"
FROM_HF = {"llama": llama.from_hf_config, "gpt2": gpt.from_hf_config, "bert": bert.from_hf_config}
PyTree = Any


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json as a dict, {tensor name: array}) of a Hugging Face model directory."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise ConfigError(f"{directory}: no config.json (a Hugging Face model directory has config.json + safetensors)")
    config = json.loads((directory / "config.json").read_text())
    if (directory / INDEX).exists():
        files = sorted(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    elif (directory / SINGLE).exists():
        files = [SINGLE]
    else:
        raise ConfigError(f"{directory}: no {SINGLE} or {INDEX} (only safetensors checkpoints are read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(str(directory / name)))
    return config, tensors


def model_from_config(config: Mapping[str, Any], **overrides):
    """The module a config.json describes (`overrides`: scan_layers, dtype, ...)."""
    kind = config.get("model_type")
    if kind not in FROM_HF:
        found = (config.get("architectures") or [kind or "an unknown model"])[0]
        raise ConfigError(f"config.json describes {found}: only {', '.join(sorted(FROM_HF))} models are converted")
    return FROM_HF[kind](dict(config), **overrides)


def _abstract_params(model) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: shape} of the model's unrolled parameters, sized without allocating them."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return named_leaves(jax.eval_shape(lambda: exchange.unrolled(model.init(jax.random.PRNGKey(0), tokens)["params"])))


def params_from_tensors(model, tensors: Mapping[str, np.ndarray]) -> PyTree:
    """The model's parameter tree from a checkpoint's tensors, every one checked by name and shape."""
    abstract = _abstract_params(model)
    flat = {}
    for tensor in model.hf_tensors():
        expected = jax.eval_shape(tensor.to_hf, *[abstract[path] for path in tensor.paths]).shape
        if tensor.name not in tensors:
            raise ConfigError(f"the checkpoint has no tensor {tensor.name} (a model of this config.json needs it)")
        found = tuple(tensors[tensor.name].shape)
        if found != tuple(expected):
            raise ConfigError(f"tensor {tensor.name} has shape {found}, config.json implies {tuple(expected)}")
        parts = tensor.to_ours(np.asarray(tensors[tensor.name], np.float32))
        flat |= {path: np.asarray(part, abstract[path].dtype) for path, part in zip(tensor.paths, parts)}
    missing = sorted(set(abstract) - set(flat))
    if missing:  # a layout that forgot a parameter would otherwise start it from nothing
        raise ConfigError(f"the layout sets no value for {', '.join(missing)}")
    params = traverse_util.unflatten_dict(flat, sep="/")
    return exchange.rolled(params) if getattr(model, "scan_layers", False) else params


def tensors_from_params(model, params: PyTree) -> dict[str, np.ndarray]:
    """{checkpoint name: array} of the model's parameters, in the checkpoint's layout."""
    flat = named_leaves(exchange.unrolled(jax.device_get(params)))
    return {
        tensor.name: np.ascontiguousarray(np.asarray(tensor.to_hf(*[flat[path] for path in tensor.paths])))
        for tensor in model.hf_tensors()
    }


def from_hf(directory: str | Path, **overrides) -> tuple[Any, PyTree]:
    """(model, params) of a checkpoint that `save_pretrained` wrote (or that was downloaded) into `directory`."""
    config, tensors = read_checkpoint(directory)
    model = model_from_config(config, **overrides)
    return model, params_from_tensors(model, tensors)


def parse_size(text: str) -> int:
    """Bytes of "5GB", "200MB", "10KB" or a plain number (as save_pretrained's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"max_shard_size {text!r}: give bytes or a size like 5GB, 200MB")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2] or "B"])


def write_checkpoint(directory: str | Path, config: dict, tensors: Mapping[str, np.ndarray], max_shard_bytes: int):
    """config.json and model.safetensors, or shards model-0000K-of-0000N.safetensors and their index."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers reads safetensors files marked as torch's
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata=metadata)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file), metadata=metadata)
            weight_map |= {name: file for name in shard}
        total = sum(array.nbytes for array in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def to_hf(model, params: PyTree, directory: str | Path, max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes the model as a Hugging Face checkpoint `from_pretrained` loads."""
    if not callable(getattr(model, "hf_tensors", None)):
        raise ConfigError(f"a {type(model).__name__} has no Hugging Face layout (Llama, GPT and BertForMaskedLM do)")
    write_checkpoint(directory, model.hf_config(), tensors_from_params(model, params), max_shard_bytes)


def import_run(source: str | Path, workdir: str | Path, experiment_spec: str, scan_layers: bool) -> str:
    """Writes a step-0 run of the experiment (experiments/lm.py) holding the checkpoint's parameters."""
    from research import checkpoint, sharding, steps
    from research import experiment as experiment_lib
    from research.state import TrainState

    config_json, tensors = read_checkpoint(source)
    if config_json.get("model_type") not in ("llama", "gpt2"):
        raise ConfigError("import makes runs of decoder language models (llama, gpt2); use hf.from_hf for BERT")
    model = model_from_config(
        config_json, **({"scan_layers": scan_layers} if config_json["model_type"] == "llama" else {})
    )
    params = params_from_tensors(model, tensors)
    path, _, variant = experiment_spec.partition(":")
    module = experiment_lib.load(path)
    config = module.get_config(variant or None)
    config.model.family = "llama" if config_json["model_type"] == "llama" else "gpt"
    for field in config.model.keys():  # the experiment names its model settings as the module's fields
        if hasattr(model, field) and field != "dtype":
            value = getattr(model, field)
            config.model[field] = jnp.dtype(value).name if field == "param_dtype" else value
    workdir = Path(workdir)
    if (Path(source) / TOKENIZER).exists():
        workdir.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(source) / TOKENIZER, workdir / TOKENIZER)
        config.data.tokenizer = str((workdir / TOKENIZER).absolute())
    config.init_from.workdir = ""
    experiment_lib.claim_workdir(workdir, experiment_lib.name_of(path), config)
    setup = steps.build(config, module, sharding.make_mesh({"data": 1}, jax.devices()[:1]))
    params = jax.tree.map(jnp.asarray, params)  # already in the model's param_dtype; no random init to discard
    train_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]  # as steps.initial_state splits it
    state = TrainState(jnp.zeros((), jnp.int32), params, {}, setup.tx.init(params), train_rng)
    with checkpoint.make_manager(workdir, config.checkpoint) as manager:
        checkpoint.save(manager, 0, state, None, config, force=True)
        manager.wait_until_finished()
    return f"imported {source} ({config_json['model_type']}, {len(tensors)} tensors) into {workdir} as step 0"


def export_run(workdir: str | Path, directory: str | Path, which: str, max_shard_bytes: int) -> str:
    """Writes a trained run's model (its evaluation parameters) as a Hugging Face checkpoint."""
    from research.inference.predict import load_run

    run = load_run(workdir, which=which)
    to_hf(run.model, run.params, directory, max_shard_bytes)
    tokenizer = Path(workdir) / TOKENIZER
    if tokenizer.exists():
        shutil.copy(tokenizer, Path(directory) / TOKENIZER)
    return f"exported {workdir} step {run.step} ({type(run.model).__name__}) to {directory}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m research.tools.hf", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    importing = commands.add_parser("import", help="a Hugging Face directory -> a step-0 run (WORKDIR)")
    importing.add_argument("source")
    importing.add_argument("workdir")
    importing.add_argument("--experiment", default="experiments/lm.py:cpu", help="the run's experiment[:config]")
    importing.add_argument("--scan_layers", action="store_true", help="stack a Llama's layers under nn.scan")
    exporting = commands.add_parser("export", help="a run (WORKDIR) -> a Hugging Face directory")
    exporting.add_argument("workdir")
    exporting.add_argument("directory")
    exporting.add_argument("--checkpoint", default="latest", help="latest, best or a step")
    exporting.add_argument("--max_shard_size", default="5GB", help="shard the safetensors above this size")
    arguments = parser.parse_args(argv)
    try:
        if arguments.command == "import":
            print(import_run(arguments.source, arguments.workdir, arguments.experiment, arguments.scan_layers))
        else:
            size = parse_size(arguments.max_shard_size)
            print(export_run(arguments.workdir, arguments.directory, arguments.checkpoint, size))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
