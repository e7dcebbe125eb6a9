"""What a family's Hugging Face layout says: which `transformers` architecture it is, how its config.json
maps to our module and back, and which checkpoint tensor holds which of our parameters and how to turn
one into the other.

Each family's file beside this one (llama.py, gpt2.py, bert.py) defines a `Layout`; research/tools/hf/
__init__.py lists them by model_type in `LAYOUTS` and reads and writes the files: nothing here touches
disk. Tensors name our parameters unrolled (one subtree per layer: `unrolled`/`rolled` convert a
scanned stack). The conversions are written with jax.numpy so that `jax.eval_shape` sizes a checkpoint
without data.

Hugging Face keeps a linear layer's weight as out x in (torch.nn.Linear) or, in GPT-2's Conv1D, in x
out; a flax kernel is in x out, and an attention kernel is split into heads (D x H x Dh).
"""

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor and the parameters of ours it holds (usually one; GPT-2's c_attn holds three)."""

    name: str  # its name in the checkpoint, e.g. "model.layers.0.self_attn.q_proj.weight"
    paths: tuple[str, ...]  # our parameters, "layers_0/q_proj/kernel"
    to_ours: Callable[[jax.Array], tuple[jax.Array, ...]]
    to_hf: Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Layout:
    """One `transformers` architecture and the module of ours that computes the same function."""

    model_type: str  # config.json's model_type, "llama": its key in LAYOUTS
    architecture: str  # config.json's architectures[0], "LlamaForCausalLM"
    from_config: Callable[..., nn.Module]  # (config.json as a dict, **overrides: scan_layers, dtype, ...) -> ours
    to_config: Callable[[nn.Module], dict]  # ours -> config.json but the two above (a ConfigError where it has none)
    tensors: Callable[[nn.Module], list[Tensor]]  # every checkpoint tensor of ours, over unrolled parameters
    run_family: str = ""  # model.family of the experiments/lm.py run `import` makes; "": it makes none (encoders)
    # The checkpoint's tensors as `tensors` names them, and back (mixtures: each expert's stacked into one)
    combine: Callable[[dict], dict] = lambda tensors: tensors
    split: Callable[[dict], dict] = lambda tensors: tensors


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


def untied_head(tied: bool, name: str, path: str) -> list[Tensor]:
    """An output head's own weight (a torch Linear); none where the head is the token embedding transposed."""
    return [] if tied else [linear(name, path)]


def layer_norm(name: str, path: str) -> list[Tensor]:
    """A LayerNorm's weight and bias (`name`.weight, `name`.bias) as ours (`path`/scale, `path`/bias)."""
    return [same(f"{name}.weight", f"{path}/scale"), same(f"{name}.bias", f"{path}/bias")]


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
