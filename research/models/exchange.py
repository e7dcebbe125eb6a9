"""The Hugging Face layout of a model's parameters: which tensor of a `transformers` checkpoint holds
which of ours, and how to turn one into the other.

A model that can be exchanged (llama.Llama, gpt.GPT, bert.BertForMaskedLM) defines `hf_config()`,
its config.json, and `hf_tensors()`, a list of `Tensor`s over its unrolled parameters (one subtree
per layer: `unrolled`/`rolled` convert a scanned stack). Each builder in `FROM_HF` makes the model a
config.json describes. research/tools/hf.py reads and writes the files; nothing here touches disk.
The conversions are written with jax.numpy so that `jax.eval_shape` sizes a checkpoint without data.

Hugging Face keeps a linear layer's weight as out x in (torch.nn.Linear) or, in GPT-2's Conv1D, in x
out; a flax kernel is in x out, and an attention kernel is split into heads (D x H x Dh).
"""

import dataclasses
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp

from research.config import ConfigError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor and the parameters of ours it holds (usually one; GPT-2's c_attn holds three)."""

    name: str  # its name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"
    paths: tuple[str, ...]  # our parameters, "layers_0/q_proj/kernel"
    to_ours: Callable[[jax.Array], tuple[jax.Array, ...]]
    to_hf: Callable[..., jax.Array]


def same(name: str, path: str) -> Tensor:
    """Stored the same way (embeddings, norms, biases, Conv1D kernels)."""
    return Tensor(name, (path,), lambda array: (array,), lambda array: array)


def linear(name: str, path: str) -> Tensor:
    """A torch.nn.Linear weight (out x in) as a Dense kernel (in x out)."""
    return Tensor(name, (path,), lambda array: (array.T,), lambda kernel: kernel.T)


def reshaped(name: str, path: str, shape: tuple[int, ...], flat: tuple[int, ...], *, transpose: bool = False) -> Tensor:
    """A checkpoint tensor of shape `flat` (transposed when `transpose`, a torch Linear) as ours of `shape`:
    attention kernels split into heads, D x H x Dh or H x Dh x D, and biases H x Dh."""
    turn = (lambda array: array.T) if transpose else (lambda array: array)
    return Tensor(name, (path,), lambda array: (turn(array).reshape(shape),), lambda ours: turn(ours.reshape(flat)))


def unrolled(params: PyTree, stack: str = "layers") -> PyTree:
    """A scanned model's parameters with the stacked subtree `stack` split into `stack_0`, `stack_1`, ..."""
    if stack not in params:
        return params
    count = jax.tree.leaves(params[stack])[0].shape[0]
    rest = {key: value for key, value in params.items() if key != stack}
    return rest | {f"{stack}_{index}": jax.tree.map(lambda leaf: leaf[index], params[stack]) for index in range(count)}


def rolled(params: PyTree, stack: str = "layers") -> PyTree:
    """The inverse of `unrolled`: `stack_0`, `stack_1`, ... stacked into one subtree `stack`."""
    pattern = re.compile(rf"^{stack}_(\d+)$")
    layers = sorted((int(pattern.match(key)[1]), key) for key in params if pattern.match(key))
    rest = {key: value for key, value in params.items() if not pattern.match(key)}
    return rest | {stack: jax.tree.map(lambda *leaves: jnp.stack(leaves), *[params[key] for _, key in layers])}


def require(config: dict, model_type: str, architecture: str) -> None:
    """A one-line error unless config.json describes `model_type`."""
    if config.get("model_type") != model_type:
        found = (config.get("architectures") or [config.get("model_type", "an unknown model")])[0]
        raise ConfigError(f"config.json describes {found}, not a {architecture}")
