"""MixtralForCausalLM and Qwen3MoeForCausalLM as research/models/llama.py's Llama with a mixture of experts for
every MLP (research/models/moe.py; Jiang et al. 2024, Qwen Team 2025).

Mixtral is Mistral with experts whose top-k router weights are always renormalised; Qwen3-MoE is Qwen3 (QK-norm,
a head width of its own) with experts moe_intermediate_size wide, renormalised where norm_topk_prob says. Their
checkpoints, on the hub and as transformers' save_pretrained writes them, hold each expert's torch Linear weights
apart (Mixtral: `block_sparse_moe.experts.E.w1/w3/w2`, gate, up and down; Qwen3-MoE:
`mlp.experts.E.gate_proj/up_proj/down_proj`) beside the router's `gate`; `combine` stacks them into one E x ...
tensor per name (`experts.*`), which becomes our E x D x F kernels, and `split` writes them apart again.
router_aux_loss_coef is the run's load-balancing weight (model.moe_aux_weight). Qwen3-MoE configs that give some
layers a dense MLP (decoder_sparse_step > 1, mlp_only_layers) are refused: every layer of ours is a mixture.
"""

import functools
import re

import numpy as np

from research.errors import ConfigError
from research.models.llama import Llama
from research.tools.hf import llama, mistral, qwen
from research.tools.hf.layout import Layout, Tensor, linear

EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")  # one expert's tensor: (its prefix, its index, its name)
STACKED = ".experts.*."  # what stands for every expert's index in a stacked tensor's name
ROUTER_AUX_LOSS_COEF = 0.001  # MixtralConfig's and Qwen3MoeConfig's default, where config.json is silent
MIXTRAL_EXPERTS = (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj"))  # theirs, ours


def combine(tensors: dict) -> dict:
    """The checkpoint's tensors with every expert's `P.experts.0.N` ... `P.experts.E-1.N` stacked (E x its shape)
    as `P.experts.*.N`."""
    experts, combined = {}, {}
    for name, array in tensors.items():
        match = EXPERT.match(name)
        if match:
            experts.setdefault(f"{match[1]}.*.{match[3]}", {})[int(match[2])] = array
        else:
            combined[name] = array
    for name, by_index in experts.items():
        last = max(by_index)
        missing = [index for index in range(last) if index not in by_index]
        if missing:
            raise ConfigError(
                f"the checkpoint has no tensor {name.replace('*', str(missing[0]))} (it holds experts up to {last})"
            )
        combined[name] = np.stack([by_index[index] for index in range(len(by_index))])
    return combined


def split(tensors: dict) -> dict:
    """`combine`'s inverse: each `P.experts.*.N` written as `P.experts.0.N`, `P.experts.1.N`, ..."""
    found = {}
    for name, array in tensors.items():
        if STACKED not in name:
            found[name] = array
            continue
        found |= {name.replace("*", str(index)): np.ascontiguousarray(array[index]) for index in range(len(array))}
    return found


def experts(name: str, path: str) -> Tensor:
    """Every expert's torch Linear weight, stacked (E x out x in), as our stacked kernels (E x in x out)."""
    return Tensor(name, (path,), lambda array: (array.swapaxes(1, 2),), lambda kernel: kernel.swapaxes(1, 2))


def mixtral_mlp(hf: str, ours: str) -> list[Tensor]:
    block = f"{hf}block_sparse_moe."
    found = [linear(f"{block}gate.weight", f"{ours}mlp/gate/kernel")]  # the router
    return found + [
        experts(f"{block}experts.*.{theirs}.weight", f"{ours}mlp/{name}") for theirs, name in MIXTRAL_EXPERTS
    ]


def qwen3_moe_mlp(hf: str, ours: str) -> list[Tensor]:
    found = [linear(f"{hf}mlp.gate.weight", f"{ours}mlp/gate/kernel")]
    return found + [experts(f"{hf}mlp.experts.*.{name}.weight", f"{ours}mlp/{name}") for name in llama.MLP]


def _mixture(config: dict) -> dict:
    """The Llama fields of config.json's experts (num_local_experts, or num_experts as Qwen3-MoE's hub files say)."""
    count = config["num_local_experts"] if "num_local_experts" in config else config["num_experts"]
    if not count:
        raise ConfigError("config.json has no experts (num_experts 0): import it as its dense family")
    aux = config.get("router_aux_loss_coef")
    return dict(
        num_experts=int(count),
        experts_per_token=int(config["num_experts_per_tok"]),
        moe_aux_weight=float(ROUTER_AUX_LOSS_COEF if aux is None else aux),
    )


def _refuse(model: Llama, architecture: str, **allowed) -> None:
    """llama.refuse, and a model without experts: a mixture's checkpoint holds no dense MLP."""
    llama.refuse(model, architecture, num_experts="any", **allowed)
    if not model.num_experts:
        raise ConfigError(f"a {architecture} has no num_experts=0: export this model as another family")


def _experts_config(model: Llama) -> dict:
    return {"num_experts_per_tok": model.experts_per_token, "router_aux_loss_coef": model.moe_aux_weight}


def mixtral_from_config(config: dict, **overrides) -> Llama:
    """The Llama a MixtralForCausalLM config.json describes."""
    return mistral.from_config(config, **_mixture(config) | dict(normalize_top_k=True) | overrides)


def mixtral_to_config(model: Llama) -> dict:
    _refuse(model, "MixtralForCausalLM", attention_window="any")  # on every layer, as Mistral's
    if not model.normalize_top_k:
        raise ConfigError("a MixtralForCausalLM has no normalize_top_k=False: export this model as another family")
    settings = {key: value for key, value in llama.decoder_config(model).items() if key != "layer_types"}
    return settings | {"num_local_experts": model.num_experts} | _experts_config(model)


def qwen3_moe_from_config(config: dict, **overrides) -> Llama:
    """The Llama a Qwen3MoeForCausalLM config.json describes: its experts moe_intermediate_size wide."""
    step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers")
    if step != 1:
        raise ConfigError(f"config.json sets decoder_sparse_step {step}: only a mixture in every layer (1) is read")
    if dense:
        raise ConfigError(f"config.json sets mlp_only_layers {dense}: dense layers among the mixtures are not read")
    mixture = _mixture(config) | dict(normalize_top_k=bool(config.get("norm_topk_prob", False)))
    return qwen.qwen3_from_config(
        config | {"intermediate_size": config["moe_intermediate_size"]}, **mixture | overrides
    )


def qwen3_moe_to_config(model: Llama) -> dict:
    _refuse(model, "Qwen3MoeForCausalLM", qk_norm=(True,), attention_bias=(False, True), attention_window="any")
    settings = {key: value for key, value in llama.decoder_config(model).items() if key != "layer_types"}
    settings |= {"attention_bias": model.attention_bias, "use_sliding_window": bool(model.attention_window)}
    experts = {"num_experts": model.num_experts, "moe_intermediate_size": model.mlp_dim}
    experts |= {"norm_topk_prob": model.normalize_top_k, "decoder_sparse_step": 1, "mlp_only_layers": []}
    return settings | experts | _experts_config(model)


MIXTRAL = Layout(
    "mixtral",
    "MixtralForCausalLM",
    mixtral_from_config,
    mixtral_to_config,
    functools.partial(llama.tensors, mlp=mixtral_mlp),
    run_family="mixtral",
    combine=combine,
    split=split,
)
QWEN3_MOE = Layout(
    "qwen3_moe",
    "Qwen3MoeForCausalLM",
    qwen3_moe_from_config,
    qwen3_moe_to_config,
    functools.partial(llama.tensors, mlp=qwen3_moe_mlp),
    run_family="qwen3_moe",
    combine=combine,
    split=split,
)
