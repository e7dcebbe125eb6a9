"""Mixture-of-experts MLP: a softmax top-k router over `num_experts` gated MLPs (Mixtral, Jiang et al. 2024;
Qwen3-MoE, Qwen Team 2025), optional shared experts every token passes through (DeepSeek-MoE, Dai et al.
2024), the load-balancing loss (Switch Transformer, Fedus et al. 2022) and the router z-loss (ST-MoE,
Zoph et al. 2022).

Each token's hidden state goes to its `experts_per_token` highest-scoring experts and their outputs are
summed with the router's weights (renormalised over the chosen ones with `normalize_top_k`). Two
dispatches compute the same function:
- dropless: the token copies sorted by expert and multiplied by a grouped matmul (`grouped_matmul`:
  `jax.lax.ragged_dot` on GPUs and TPUs, whole tiles per expert elsewhere; Gale et al. 2023's MegaBlocks);
  no token is ever dropped.
- capacity: each expert takes at most capacity_factor x its fair share of a device's tokens into fixed
  slots, multiplied by one batched matmul (GShard, Lepikhin et al. 2021); the rest skip the layer.
Under a mesh the layer runs per device (jax.shard_map): expert weights split over the `expert` axis (and
their hidden units over `tensor`), each device routes its own tokens and sends each expert's copies to the
device holding it with one all-to-all over `expert`, and gets the outputs back with another.

Legend: B batch, L length, D width, E experts, K experts per token, F an expert's hidden width,
T a device's tokens, N = T x K token copies, P expert shards, R a dispatch block's rows, C an expert's slots.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from research.errors import ConfigError
from research.models import kernels
from research.sharding import BATCH_AXES

Dtype = Any
DISPATCHES = ("dropless", "capacity")
GROUP_TILE = 128  # rows per tile of grouped_matmul off GPUs and TPUs: larger tiles pad more, smaller run slower
COLLECTION = "moe"  # what each layer sows: its router's losses, its experts' load and the copies dropped
PARAM_RULES = (  # research/sharding.py's rules for a decoder's experts: E over `expert`, D over fsdp, F over tensor
    (r"layers/mlp/(gate_proj|up_proj)$", ("stage", "expert", "fsdp", "tensor")),  # scanned: L x E x D x F
    (r"layers/mlp/down_proj$", ("stage", "expert", "tensor", "fsdp")),  # L x E x F x D
    (r"layers_\d+/mlp/(gate_proj|up_proj)$", ("expert", "fsdp", "tensor")),
    (r"layers_\d+/mlp/down_proj$", ("expert", "tensor", "fsdp")),
    (r"mlp/gate/kernel$", ()),  # the router, D x E: small, replicated
)


@dataclasses.dataclass(frozen=True)
class Routing:
    """How a mixture-of-experts layer routes: its experts, how many each token takes, how they are computed."""

    num_experts: int
    experts_per_token: int
    normalize_top_k: bool = True  # the chosen weights renormalised to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    shared_mlp_dim: int = 0  # >0: a gated MLP of this width every token passes through too
    dispatch: str = "dropless"
    capacity_factor: float = 1.25  # the capacity dispatch's slots per expert: this x N / E


class MoE(nn.Module):
    """x_BxLxD -> y_BxLxD through the experts; sows its router statistics into the "moe" collection."""

    routing: Routing
    mlp_dim: int  # each expert's hidden width
    activation: Any = nn.silu
    init_std: float = 0.02
    output_init_std: float = 0.02
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        routing = self.routing
        if routing.dispatch not in DISPATCHES:
            raise ConfigError(f"model.moe_dispatch {routing.dispatch!r}: use one of {', '.join(DISPATCHES)}")
        experts, chosen, width = routing.num_experts, routing.experts_per_token, x_BxLxD.shape[-1]
        router = nn.Dense(experts, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype, name="gate")
        logits_BxLxE = router(x_BxLxD.astype(jnp.float32))  # routed in float32 whatever the compute dtype
        probs_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
        weights_BxLxK, experts_BxLxK = jax.lax.top_k(probs_BxLxE, chosen)
        if routing.normalize_top_k:
            weights_BxLxK = weights_BxLxK / jnp.sum(weights_BxLxK, axis=-1, keepdims=True)
        init, output_init = nn.initializers.normal(self.init_std), nn.initializers.normal(self.output_init_std)
        gate_ExDxF = self.param("gate_proj", init, (experts, width, self.mlp_dim), self.param_dtype)
        up_ExDxF = self.param("up_proj", init, (experts, width, self.mlp_dim), self.param_dtype)
        down_ExFxD = self.param("down_proj", output_init, (experts, self.mlp_dim, width), self.param_dtype)
        weights = (gate_ExDxF, up_ExDxF, down_ExFxD)
        routed = functools.partial(
            _routed,
            num_experts=experts,
            activation=self.activation,
            capacity_factor=routing.capacity_factor if routing.dispatch == "capacity" else 0.0,
        )
        x_BxLxD = x_BxLxD.astype(self.dtype)
        weights = tuple(weight.astype(self.dtype) for weight in weights)
        y_BxLxD, dropped = _on_mesh(routed, x_BxLxD, experts_BxLxK, weights_BxLxK.astype(self.dtype), *weights)
        if self.is_mutable_collection(COLLECTION) and not self.is_initializing():  # asked for: by the training loss
            self._sow_statistics(logits_BxLxE, probs_BxLxE, experts_BxLxK, dropped)
        if routing.shared_mlp_dim:
            dense = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
            gate = nn.Dense(routing.shared_mlp_dim, kernel_init=init, name="shared_gate_proj", **dense)(x_BxLxD)
            up = nn.Dense(routing.shared_mlp_dim, kernel_init=init, name="shared_up_proj", **dense)(x_BxLxD)
            shared = self.activation(gate) * up
            y_BxLxD = y_BxLxD + nn.Dense(width, kernel_init=output_init, name="shared_down_proj", **dense)(shared)
        return y_BxLxD

    def _sow_statistics(self, logits_BxLxE, probs_BxLxE, experts_BxLxK, dropped) -> None:
        experts, chosen = self.routing.num_experts, self.routing.experts_per_token
        tokens = experts_BxLxK.shape[0] * experts_BxLxK.shape[1]
        counts_E = jnp.sum(jax.nn.one_hot(experts_BxLxK, experts, dtype=jnp.float32), axis=(0, 1, 2))
        # transformers' load_balancing_loss_func per layer: E x sum_e (tokens sent to e / T) x (mean probability of e)
        balance = experts * jnp.sum(counts_E / tokens * jnp.mean(probs_BxLxE, axis=(0, 1)))
        z_loss = jnp.mean(jax.nn.logsumexp(logits_BxLxE, axis=-1) ** 2)
        load_E = counts_E * experts / (tokens * chosen)  # 1 everywhere: perfectly balanced
        statistics = dict(balance=balance, z_loss=z_loss, load=load_E, dropped=dropped / (tokens * chosen))
        for name, value in statistics.items():
            self.sow(COLLECTION, name, value, init_fn=lambda: 0.0, reduce_fn=lambda _, new: new)


def _on_mesh(routed, x_BxLxD, experts_BxLxK, weights_BxLxK, gate_ExDxF, up_ExDxF, down_ExFxD):
    """(y, copies dropped) of `routed` run per device under the mesh in context (directly without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return routed(x_BxLxD, experts_BxLxK, weights_BxLxK, gate_ExDxF, up_ExDxF, down_ExFxD)
    num_experts, _, hidden = gate_ExDxF.shape

    def size(axis: str) -> int:
        return mesh.shape[axis] if axis in mesh.axis_names else 1

    if num_experts % size("expert"):
        raise ConfigError(f"model.num_experts {num_experts} does not split over mesh.expert {size('expert')}")
    batch_axes, shards = (), 1  # the batch split over every batch axis that divides it (the expert axis is one)
    for axis in BATCH_AXES:
        if size(axis) > 1 and x_BxLxD.shape[0] % (shards * size(axis)) == 0:
            batch_axes, shards = (*batch_axes, axis), shards * size(axis)
    tokens = P(batch_axes) if batch_axes else P()
    tensor = "tensor" if size("tensor") > 1 and hidden % size("tensor") == 0 else None
    expert = "expert" if size("expert") > 1 else None
    body = functools.partial(routed, peers=size("expert"), tokens_split="expert" in batch_axes, tensor_axis=tensor)

    def per_device(*operands):  # the drop count spread over the device's batch rows, so that it sums globally
        y_BxLxD, dropped = body(*operands)
        return y_BxLxD, jnp.full((y_BxLxD.shape[0],), dropped / y_BxLxD.shape[0])

    run = jax.shard_map(
        per_device,
        in_specs=(tokens, tokens, tokens, P(expert, None, tensor), P(expert, None, tensor), P(expert, tensor)),
        out_specs=(tokens, tokens),
    )
    y_BxLxD, dropped_B = run(x_BxLxD, experts_BxLxK, weights_BxLxK, gate_ExDxF, up_ExDxF, down_ExFxD)
    return y_BxLxD, jnp.sum(dropped_B)


def _routed(
    x_BxLxD,
    experts_BxLxK,
    weights_BxLxK,
    gate_ExDxF,
    up_ExDxF,
    down_ExFxD,
    *,
    num_experts: int,
    activation,
    capacity_factor: float,
    peers: int = 1,
    tokens_split: bool = False,
    tensor_axis: str | None = None,
):
    """(y_BxLxD, copies dropped) of this device's tokens through the experts; `gate_ExDxF` holds this device's
    E / peers experts. Tokens split over the expert axis go to their experts' devices by all-to-all; tokens
    every expert shard holds (a batch the axis does not divide) are computed by each shard for its own
    experts and the outputs summed over the axis."""
    batch, length, width = x_BxLxD.shape
    chosen = experts_BxLxK.shape[-1]
    local = num_experts // peers  # this device's experts
    x_TxD, flat_N = x_BxLxD.reshape(-1, width), experts_BxLxK.reshape(-1)
    copies = flat_N.shape[0]
    order_N = jnp.argsort(flat_N, stable=True)
    sorted_N = flat_N[order_N]
    rows_NxD = x_TxD[order_N // chosen]
    counts_E = jnp.bincount(flat_N, length=num_experts)
    rank_N = jnp.arange(copies) - (jnp.cumsum(counts_E) - counts_E)[sorted_N]  # each copy's place in its expert
    me = jax.lax.axis_index("expert") if peers > 1 else 0
    experts = functools.partial(_experts, gate_ExDxF, up_ExDxF, down_ExFxD, activation=activation, tensor=tensor_axis)

    def exchange(buffer):  # row block p to expert shard p; what arrives is indexed by its sender
        if peers == 1:
            return buffer
        return jax.lax.all_to_all(buffer, "expert", 0, 0) if tokens_split else buffer[me][None]

    def returned(buffer):  # exchange's inverse
        if peers == 1 or tokens_split:
            return exchange(buffer)
        return jnp.zeros((peers, *buffer.shape[1:]), buffer.dtype).at[me].set(buffer[0])

    if capacity_factor:  # fixed slots per expert, the overflow dropped
        slots = max(1, math.ceil(capacity_factor * copies / num_experts))
        kept_N = rank_N < slots
        slot_N = jnp.where(kept_N, sorted_N * slots + rank_N, num_experts * slots)
        buffer = jnp.zeros((num_experts * slots, width), x_TxD.dtype).at[slot_N].set(rows_NxD, mode="drop")
        received = exchange(buffer.reshape(peers, local, slots, width))  # senders x E/P x C x D
        senders = received.shape[0]
        inputs = received.transpose(1, 0, 2, 3).reshape(local, senders * slots, width)
        outputs = experts(inputs).reshape(local, senders, slots, width).transpose(1, 0, 2, 3)
        back = returned(outputs).reshape(num_experts * slots, width)
        out_NxD = jnp.where(kept_N[:, None], back[jnp.minimum(slot_N, num_experts * slots - 1)], 0)
        dropped = copies - jnp.sum(kept_N)
    else:  # each peer's copies in a block as large as they could be (all of them its), none dropped
        per_peer = counts_E.reshape(peers, local).sum(axis=1)
        column = jnp.arange(batch * length * min(local, chosen))  # a token's copies go to distinct experts
        valid_PxR = column < per_peer[:, None]
        source_PxR = jnp.where(valid_PxR, (jnp.cumsum(per_peer) - per_peer)[:, None] + column, copies)
        gather_PxR = jnp.minimum(source_PxR, copies - 1)
        buffer = jnp.where(valid_PxR[..., None], rows_NxD[gather_PxR], 0)
        ids_PxR = jnp.where(valid_PxR, sorted_N[gather_PxR] - (jnp.arange(peers) * local)[:, None], local)
        received, ids = exchange(buffer), exchange(ids_PxR)
        outputs = experts(received.reshape(-1, width), ids.reshape(-1))
        back = returned(outputs.reshape(received.shape)).reshape(-1, width)
        out_NxD = jnp.zeros((copies, width), back.dtype).at[source_PxR.reshape(-1)].set(back, mode="drop")
        dropped = jnp.zeros((), jnp.int32)
    copies_NxD = jnp.zeros((copies, width), out_NxD.dtype).at[order_N].set(out_NxD)
    weighted = copies_NxD.reshape(-1, chosen, width) * weights_BxLxK.reshape(-1, chosen, 1)
    y_TxD = jnp.sum(weighted, axis=1)
    if peers > 1 and not tokens_split:
        y_TxD = jax.lax.psum(y_TxD, "expert")
    return y_TxD.reshape(batch, length, width), dropped.astype(jnp.float32)


def _experts(gate_ExDxF, up_ExDxF, down_ExFxD, inputs, ids=None, *, activation, tensor: str | None):
    """The local experts' gated MLPs: on E x R x D slots (batched matmuls), or with `ids` (each row's expert,
    E for none) on rows in any order (sorted by expert for grouped matmuls, and back). Hidden units split over
    `tensor` leave partial sums, added over it."""
    if ids is None:
        gate, up = (jnp.einsum("erd,edf->erf", inputs, weight) for weight in (gate_ExDxF, up_ExDxF))
        hidden = activation(gate) * up
        outputs = jnp.einsum("erf,efd->erd", hidden, down_ExFxD)
    else:
        local = gate_ExDxF.shape[0]
        order = jnp.argsort(ids, stable=True)
        sizes = jnp.bincount(ids, length=local + 1)[:local].astype(jnp.int32)  # rows past their sum come out 0
        rows = inputs[order]
        hidden = activation(grouped_matmul(rows, gate_ExDxF, sizes)) * grouped_matmul(rows, up_ExDxF, sizes)
        outputs = jnp.zeros_like(rows).at[order].set(grouped_matmul(hidden, down_ExFxD, sizes))
    return jax.lax.psum(outputs, tensor) if tensor else outputs


def grouped_matmul(rows_MxD: jax.Array, weights_ExDxF: jax.Array, sizes_E: jax.Array) -> jax.Array:
    """rows_MxD, sorted by group with sizes_E rows each, times their group's weights (rows past the groups: 0).
    GPUs and TPUs run jax.lax.ragged_dot's kernels. Elsewhere jax computes ragged_dot as every row times every
    group's weights, masked (E times the work), so here each group is padded to whole tiles of GROUP_TILE rows and
    each tile multiplied by its group's weights in one batched matmul: at most M / tile + E tiles (the block-sparse
    form of MegaBlocks, Gale et al. 2023)."""
    if kernels.platform() in ("gpu", "tpu"):
        return jax.lax.ragged_dot(rows_MxD, weights_ExDxF, sizes_E)
    (rows, width), groups = rows_MxD.shape, weights_ExDxF.shape[0]
    tiles = -(-rows // GROUP_TILE) + groups
    padded_E = -(-sizes_E // GROUP_TILE) * GROUP_TILE
    ends_E = jnp.cumsum(padded_E)
    slot = jnp.arange(tiles * GROUP_TILE)  # each tile's rows in the padded layout
    group = jnp.minimum(jnp.searchsorted(ends_E, slot, side="right"), groups - 1)
    offset = slot - (ends_E - padded_E)[group]
    valid = (offset < sizes_E[group]) & (slot < ends_E[-1])
    source = jnp.where(valid, (jnp.cumsum(sizes_E) - sizes_E)[group] + offset, rows)  # rows: a zero row
    padded_rows = jnp.concatenate([rows_MxD, jnp.zeros((1, width), rows_MxD.dtype)])[source]
    tile_groups = group[::GROUP_TILE]
    products = jnp.einsum("ntd,ndf->ntf", padded_rows.reshape(tiles, GROUP_TILE, width), weights_ExDxF[tile_groups])
    out = jnp.zeros((rows, products.shape[-1]), products.dtype)
    return out.at[source].set(products.reshape(tiles * GROUP_TILE, -1), mode="drop")


def router_terms(sown: dict, model) -> tuple[jax.Array | float, dict]:
    """(the training loss's router term, metrics) from what an apply sowed ({} without experts): each statistic
    averaged over the layers, weighted by the model's moe_aux_weight and moe_z_weight; load_max and load_min
    are the busiest and idlest expert's share over a fair one."""
    if COLLECTION not in sown:
        return 0.0, {}
    layers: dict[str, list] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(sown[COLLECTION]):
        per_expert = path[-1].key == "load"  # E per layer; the rest one number per layer
        layers.setdefault(path[-1].key, []).append(leaf.reshape(-1, leaf.shape[-1]) if per_expert else leaf.reshape(-1))
    layers = {name: jnp.concatenate(values) for name, values in layers.items()}
    balance, z_loss, load = jnp.mean(layers["balance"]), jnp.mean(layers["z_loss"]), layers["load"]
    metrics = {"moe/balance": balance, "moe/z_loss": z_loss, "moe/dropped": jnp.mean(layers["dropped"])}
    metrics |= {"moe/load_max": jnp.mean(jnp.max(load, -1)), "moe/load_min": jnp.mean(jnp.min(load, -1))}
    return model.moe_aux_weight * balance + model.moe_z_weight * z_loss, metrics


def dispatch_rows(experts: int, experts_per_token: int, expert_shards: int, capacity_factor: float = 0.0) -> float:
    """Rows per token of the dispatch's buffer over `expert_shards`. Dropless (`capacity_factor` 0): a block per
    shard, each as large as a device's copies bound for that shard could be (each token sends a shard min(its
    experts, k) copies at most); capacity: capacity_factor x k, whatever the shards."""
    if capacity_factor:
        return capacity_factor * experts_per_token
    return expert_shards * min(experts // expert_shards, experts_per_token)


def inactive_parameters(layers: int, experts: int, experts_per_token: int, width: int, mlp_dim: int) -> int:
    """Parameters a token does not use: the experts it is not routed to (3 matrices of width x mlp_dim each); 0 for
    a dense decoder (no experts)."""
    return layers * max(experts - experts_per_token, 0) * 3 * width * mlp_dim
