"""The Hugging Face converter: reads and writes config.json and safetensors, checks them, and turns tensors into
parameters and back by each family's layout (research/tools/hf/, `LAYOUTS`)."""

import json
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import flax as safetensors_jax  # reads and writes bfloat16, which numpy's cannot

from research.errors import ConfigError
from research.tools.hf import bert, gemma, gpt2, llama, mistral, moe, qwen
from research.tools.hf.layout import Layout, rolled, unrolled
from research.tree import named_leaves

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.json"
DECODERS = (llama.LAYOUT, qwen.QWEN2, qwen.QWEN3, mistral.LAYOUT, gemma.GEMMA1, gemma.GEMMA2, gemma.GEMMA3)
DECODERS += (moe.MIXTRAL, moe.QWEN3_MOE)
LAYOUTS = {layout.model_type: layout for layout in (*DECODERS, gpt2.LAYOUT, bert.LAYOUT)}
# Checkpoints of models around a decoder (text and images), read as their decoder: model_type -> (config, tensors)
DECODER_OF = {"gemma3": gemma.text_model}
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
        tensors.update(load_file(directory / name))
    if config.get("model_type") in DECODER_OF:  # Gemma3ForConditionalGeneration: its text decoder
        return DECODER_OF[config["model_type"]](config, tensors)
    return config, tensors


def load_file(path: Path) -> dict[str, np.ndarray]:
    """{name: array} of one safetensors file (a one-line error when there is none)."""
    if not Path(path).is_file():
        raise ConfigError(f"no {path} (only safetensors files are read)")
    return {key: np.asarray(value) for key, value in safetensors_jax.load_file(str(path)).items()}


def layout_of(config: Mapping[str, Any]) -> Layout:
    """The layout of the architecture a config.json describes."""
    kind = config.get("model_type")
    if kind not in LAYOUTS:
        found = (config.get("architectures") or [kind or "an unknown model"])[0]
        raise ConfigError(f"config.json describes {found}: only {', '.join(sorted(LAYOUTS))} models are converted")
    return LAYOUTS[kind]


def layout_named(model_type: str) -> Layout:
    """LAYOUTS[model_type], or a one-line error naming the layouts there are."""
    if model_type not in LAYOUTS:
        raise ConfigError(f"no Hugging Face layout {model_type!r}: the layouts are {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[model_type]


def model_from_config(config: Mapping[str, Any], **overrides):
    """The module a config.json describes (`overrides`: scan_layers, dtype, ...)."""
    layout = layout_of(config)
    try:
        return layout.from_config(dict(config), **overrides)
    except KeyError as error:
        raise ConfigError(f"config.json has no {error.args[0]!r} (a {layout.architecture}'s needs it)") from None


def config_json(model, model_type: str) -> dict:
    """The config.json of `model` as the architecture LAYOUTS[model_type]."""
    layout = layout_named(model_type)
    return {"architectures": [layout.architecture], "model_type": layout.model_type} | layout.to_config(model)


def _abstract_params(model) -> dict[str, jax.ShapeDtypeStruct]:
    """{path: shape} of the model's unrolled parameters, sized without allocating them."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return named_leaves(jax.eval_shape(lambda: unrolled(model.init(jax.random.PRNGKey(0), tokens)["params"])))


def params_from_tensors(model, tensors: Mapping[str, np.ndarray], layout: Layout) -> PyTree:
    """The model's parameter tree from a checkpoint's tensors, every one checked by name and shape."""
    abstract = _abstract_params(model)
    tensors = layout.combine(tensors)
    flat = {}
    for tensor in layout.tensors(model):
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
    return rolled(params) if getattr(model, "scan_layers", False) else params


def tensors_from_params(model, params: PyTree, layout: Layout) -> dict[str, np.ndarray]:
    """{checkpoint name: array} of the model's parameters, in the checkpoint's layout."""
    flat = named_leaves(unrolled(jax.device_get(params)))
    return layout.split(
        {
            tensor.name: np.ascontiguousarray(np.asarray(tensor.to_hf(*[flat[path] for path in tensor.paths])))
            for tensor in layout.tensors(model)
        }
    )


def from_hf(directory: str | Path, **overrides) -> tuple[Any, PyTree]:
    """(model, params) of a checkpoint that `save_pretrained` wrote (or that was downloaded) into `directory`."""
    config, tensors = read_checkpoint(directory)
    model = model_from_config(config, **overrides)
    return model, params_from_tensors(model, tensors, layout_of(config))


def parse_size(text: str) -> int:
    """Bytes of "5GB", "200MB", "10KB" or a plain number (as save_pretrained's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|B)?\s*", text.upper())
    if not match:
        raise ConfigError(f"max_shard_size {text!r}: give bytes or a size like 5GB, 200MB")
    return int(float(match[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[match[2] or "B"])


def save(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    metadata = {"format": "pt"}  # transformers reads safetensors files marked as torch's
    safetensors_jax.save_file({name: jnp.asarray(array) for name, array in tensors.items()}, str(path), metadata)


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
    if len(shards) == 1:
        save(shards[0], directory / SINGLE)
    else:
        weight_map = {}
        for number, shard in enumerate(shards, 1):
            file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            save(shard, directory / file)
            weight_map |= {name: file for name in shard}
        total = sum(array.nbytes for array in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def to_hf(model, params: PyTree, directory: str | Path, model_type: str, max_shard_bytes: int = 5 * 10**9) -> None:
    """Writes the model as the Hugging Face checkpoint of LAYOUTS[model_type] that `from_pretrained` loads."""
    config = config_json(model, model_type)
    write_checkpoint(directory, config, tensors_from_params(model, params, LAYOUTS[model_type]), max_shard_bytes)
