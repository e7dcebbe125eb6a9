"""LoRA adapters as the `peft` library saves and loads them: adapter_config.json + adapter_model.safetensors.

  python -m research.tools.hf export RUN DIR --adapters          # a LoRA run's adapters (PeftModel.from_pretrained)
  python -m research.tools.hf import PEFT_DIR RUN --base BASE    # PEFT's adapters on an imported base: a LoRA run

PEFT names an adapted torch Linear `base_model.model.<module>.lora_A.weight` (rank x in) and `...lora_B.weight`
(out x rank) and scales their product by lora_alpha / r; ours (research/features/lora.py) are the module's
`lora_a` (in x rank) and `lora_b` (rank x out) beside its kernel, so each is the other transposed. Which module a
kernel is comes from the family's layout (research/tools/hf/): only projections stored as torch Linear weights
are exchanged. Nothing here touches disk.
"""

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from research.errors import ConfigError
from research.tools.hf.layout import Layout, rolled, unrolled
from research.tree import named_leaves

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
PyTree = Any


def linear_modules(model, layout: Layout, abstract: dict[str, jax.ShapeDtypeStruct]) -> dict[str, str]:
    """{our module path ("layers_0/q_proj"): the checkpoint's module ("model.layers.0.self_attn.q_proj")} for each
    kernel the layout stores as a torch Linear weight (out x in)."""
    modules = {}
    for tensor in layout.tensors(model):
        path = tensor.paths[0]
        if len(tensor.paths) != 1 or not path.endswith("/kernel") or not tensor.name.endswith(".weight"):
            continue
        shape = jax.eval_shape(tensor.to_hf, abstract[path]).shape
        if len(shape) == 2 and tuple(shape) == tuple(abstract[path].shape[::-1]):
            modules[path.removesuffix("/kernel")] = tensor.name.removesuffix(".weight")
    return modules


def adapter_tensors(model, params: PyTree, layout: Layout) -> dict[str, np.ndarray]:
    """{PEFT's name: array} of the adapters in a LoRA run's parameters."""
    flat = named_leaves(unrolled(jax.device_get(params)))
    modules = linear_modules(model, layout, flat)
    tensors = {}
    for name in sorted(flat):
        if not name.endswith("/lora_a"):
            continue
        module = name.removesuffix("/lora_a")
        if module not in modules:
            raise ConfigError(f"{module} is not a torch Linear in {layout.architecture}: PEFT cannot load its adapter")
        base = f"{PREFIX}{modules[module]}"
        tensors[f"{base}.lora_A.weight"] = np.ascontiguousarray(np.asarray(flat[name], np.float32).T)
        tensors[f"{base}.lora_B.weight"] = np.ascontiguousarray(np.asarray(flat[f"{module}/lora_b"], np.float32).T)
    return tensors


def adapter_config(settings, tensors: dict[str, np.ndarray], base_model: str) -> dict:
    """PEFT's LoraConfig as JSON: the adapted modules named by their last component (PEFT matches suffixes)."""
    names = sorted({name.removeprefix(PREFIX).rsplit(".", 2)[0].rsplit(".", 1)[-1] for name in tensors})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": int(settings.rank),
        "lora_alpha": float(settings.alpha),
        "lora_dropout": float(settings.dropout),
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def settings_from(config: dict, tensors: dict[str, np.ndarray], modules: dict[str, str]) -> dict:
    """lora.* settings of ours for PEFT's adapter_config.json and its tensors (one line where we have no such)."""
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{CONFIG}: peft_type {config.get('peft_type')!r}: only LORA adapters are imported")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(key):
            raise ConfigError(f"{CONFIG}: {key} is set; plain LoRA (W + alpha / r x B A) is what we import")
    by_checkpoint = {hf: ours.rsplit("/", 1)[-1] for ours, hf in modules.items()}
    adapted = {name.removeprefix(PREFIX).rsplit(".", 2)[0] for name in tensors}
    unknown = sorted(adapted - set(by_checkpoint))
    if unknown:
        raise ConfigError(f"the adapters are for another base model: it has no Linear {unknown[0]}")
    names = sorted({by_checkpoint[module] for module in adapted})
    targets = rf"(^|/)({'|'.join(re.escape(name) for name in names)})$"
    dropout = float(config.get("lora_dropout") or 0)
    return {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]), "dropout": dropout, "targets": targets}


def params_with_adapters(model, abstract: PyTree, base: PyTree, tensors: dict[str, np.ndarray], layout: Layout):
    """The LoRA model's parameters (`abstract`'s tree): the base run's, with the adapters from PEFT's tensors, each
    checked by shape."""
    wanted = named_leaves(jax.eval_shape(unrolled, abstract))
    flat = named_leaves(unrolled(jax.device_get(base)))
    modules = linear_modules(model, layout, wanted)
    out = {}
    for name, like in wanted.items():
        module, _, leaf = name.rpartition("/")
        if leaf not in ("lora_a", "lora_b"):
            out[name] = np.asarray(flat[name])
            continue
        key = f"{PREFIX}{modules[module]}.lora_{leaf[-1].upper()}.weight"
        if key not in tensors:
            raise ConfigError(f"the adapters have no {key} (for {module}): trained on another base model or layers?")
        array = np.asarray(tensors[key], np.float32).T
        if array.shape != tuple(like.shape):
            raise ConfigError(
                f"the adapters are for another base model: {key} is {array.shape[::-1]}, this base needs "
                f"{tuple(like.shape)[::-1]}"
            )
        out[name] = array.astype(like.dtype)
    params = jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(out, sep="/"))
    return rolled(params) if getattr(model, "scan_layers", False) else params
