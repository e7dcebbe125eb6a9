"""Pipeline parallelism: a scanned stack of layers split into stages over the mesh's `stage` axis, the batch into
micro-batches that flow through them (GPipe, Huang et al. 2019), or round them several times (the circular or
interleaved schedule, Narayanan et al. 2021; as MaxText runs it under GSPMD).

The layers' parameters keep their stacked layout (L x ...), split over `stage` in contiguous blocks by the
sharding rules, so a checkpoint, a Hugging Face export and a resume on another mesh see the same tree. In the
step the stack is viewed as R x S x k (layer (r S + s) k + j: repeat r of stage s), every stage runs its k
layers at once (jax.vmap over stages, `spmd_axis_name="stage"`: each stage's devices compute their own slice),
and a buffer of S activations, one per stage, moves one stage on between iterations (jnp.roll over the stage
axis: one collective permute of a micro-batch's activations). Iteration t feeds job t (micro-batch t mod M,
repeat t // M) to stage 0 and stage s runs job t - s; the last stage's output is written back to the micro-batch's
slot of an input/output buffer, which stage 0 reads again on the next repeat. R x M + S - 1 iterations: stages
idle (compute on nothing that is kept) for a bubble of (S - 1) / (R M + S - 1) of the time. R > 1 needs M >= S
(a micro-batch is back from the last stage before stage 0 needs it); it shortens the bubble R-fold at the cost of
viewing contiguous blocks as interleaved ones (XLA moves (S - 1) / S of the stack's weights between stages in each
step, and their gradients back). A stack that does not divide into S x R blocks is padded with layers that pass
their input on. Given the stack's sharding rules, the step moves each stage's layers to its devices first (a stack
whose layer axis could not be split over `stage` is stored with `stage` on its fsdp dimension: research/sharding.py)
and can gather a stage's weights over fsdp once a step, their gradients reduce-scattered as they are made.

Activations: with `remat` the whole stage is rematerialised per iteration, so the step keeps one input per stage
and iteration ((R M + S - 1) micro-batches' residual streams per device) and recomputes a stage's k layers in the
backward pass (one more forward than per-layer remat: the fewer-activations schedule); without it the layers keep
what their own remat policy keeps, k layers of every micro-batch. Outside the stack (embedding, final norm, head,
loss) the stage axis holds copies: the batch is split over the batch axes only.

Legend: B batch, L length, D width, S stages, R repeats, M micro-batches, k layers per stage and repeat.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from research import sharding
from research.errors import ConfigError
from research.sharding import CONTEXT_AXIS, STAGE_AXIS
from research.tree import path_name


def stages() -> int:
    """The `stage` axis of the mesh in context (1 without one)."""
    return sharding.stage_shards(jax.sharding.get_abstract_mesh())


def bubble(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The fraction of a step a stage computes nothing kept: (S - 1) / (R M + S - 1)."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def microbatch_count(configured: int, stages: int) -> int:
    """The micro-batches a step is cut into: `configured`, or (0) as many as there are stages."""
    return configured or stages


def check(batch: int, microbatches: int, repeats: int, stages: int, batch_shards: int) -> None:
    """One line for a layout the pipeline cannot run."""
    if batch % microbatches or (batch // microbatches) % batch_shards:
        raise ConfigError(
            f"a batch of {batch} does not cut into model.pipeline_microbatches {microbatches} micro-batches of a "
            f"multiple of the {batch_shards} batch shards: make the batch a multiple of {microbatches * batch_shards}"
        )
    if repeats > 1 and microbatches < stages:
        raise ConfigError(
            f"model.pipeline_repeats {repeats} needs model.pipeline_microbatches >= mesh.stage {stages}, got "
            f"{microbatches}: a micro-batch must be back from the last stage before the first needs it again"
        )


def run(
    layer: Callable[[Any, jax.Array, jax.Array | None, jax.Array], jax.Array],
    params_L: Any,
    kinds_L: jax.Array,
    x_BxLxD: jax.Array,
    segment_ids_BxL: jax.Array | None,
    *,
    microbatches: int,
    repeats: int = 1,
    remat: bool = False,
    rules: tuple = (),
    gather: bool = False,
) -> jax.Array:
    """`layer(params, x_BxLxD, segment_ids_BxL, kind)` applied for each of the L stacked layers in order, as a
    pipeline over the mesh's `stage` axis; the same values as a scan over the layers. With the stack's sharding
    `rules` each stage's layers are moved to its devices first and, with `gather`, gathered over `fsdp` once per
    step rather than at every use."""
    count, (batch, length, width), layers = stages(), x_BxLxD.shape, kinds_L.shape[0]
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes, _, batch_shards, _ = sharding.activation_axes(mesh)
    check(batch, microbatches, repeats, count, batch_shards)
    per_stage = -(-layers // (count * repeats))  # a stack that does not divide is padded with layers that pass x on

    def staged_view(leaf):  # L x ... -> R x S x k x ...
        leaf = jnp.pad(leaf, [(0, per_stage * count * repeats - layers)] + [(0, 0)] * (leaf.ndim - 1))
        return leaf.reshape(repeats, count, per_stage, *leaf.shape[1:])

    params, kinds = jax.tree.map(staged_view, params_L), staged_view(kinds_L)
    live = staged_view(jnp.ones(layers, bool))
    scattered = None  # each layer's gradient laid out as its stored weight's (split over fsdp) as it is made
    if rules:  # each stage's layers moved to its devices (still split over fsdp), then gathered over fsdp
        staged_axes = (None, STAGE_AXIS, None)
        params = jax.lax.with_sharding_constraint(params, layouts(params, rules, mesh, staged_axes))
    if rules and gather:
        params = jax.lax.with_sharding_constraint(params, layouts(params, rules, mesh, staged_axes, fsdp=False))
        scattered = split_gradients(jax.tree.map(lambda leaf: leaf[0, 0, 0], params), rules, mesh)
    rows = batch // microbatches  # micro-batch m holds rows m, M + m, 2M + m, ...: each split over the batch axes
    context = CONTEXT_AXIS if sharding.context_shards(mesh) > 1 else None
    batch_axes = batch_axes or None

    def split(array):  # B x ... -> M x (B / M) x ...
        return jnp.swapaxes(array.reshape(rows, microbatches, *array.shape[1:]), 0, 1)

    def laid(array, *leading):  # leading axes, then the batch's and the positions' own
        return jax.lax.with_sharding_constraint(array, P(*leading, batch_axes, context))

    def stage(params_kxR, kinds_Rxk, live_Rxk, repeat, x, segment_ids):
        def body(x, one):
            params, kind, alive = one  # the layer's weights in every repeat: this repeat's
            params = jax.tree.map(lambda leaf: choose(leaf, repeat), params)
            params = params if scattered is None else scattered(params)
            out = layer(params, x, segment_ids, kind)
            return (out if per_stage * count * repeats == layers else jnp.where(alive, out, x)), None

        return jax.lax.scan(body, x, (params_kxR, kinds_Rxk[repeat], live_Rxk[repeat]))[0]

    def choose(leaf_R, repeat):
        if repeats == 1:
            return leaf_R[0]
        return jax.lax.dynamic_index_in_dim(leaf_R, repeat, keepdims=False)

    stage = jax.checkpoint(stage) if remat else stage
    segment_axis = None if segment_ids_BxL is None else 0
    staged = jax.vmap(stage, in_axes=(2, 1, 1, 0, 0, segment_axis), spmd_axis_name=STAGE_AXIS)
    params_kxR = jax.tree.map(lambda leaf: jnp.moveaxis(leaf, 2, 0), params)  # k x R x S x ...: scanned over k
    first_S = jnp.arange(count) == 0

    def on_stages(array):  # M x ... -> S x M x ...: each stage's own copy (only stage 0's is read and written)
        return laid(jnp.broadcast_to(array[None], (count, *array.shape)), STAGE_AXIS, None)

    def first(array_S):  # stage 0's entry, for every stage: a masked sum (an all-reduce of one entry, not a gather)
        mask = first_S.reshape(count, *[1] * (array_S.ndim - 1))
        return jnp.sum(jnp.where(mask, array_S, jnp.zeros_like(array_S)), axis=0)

    def pick(array_S, slot):  # each stage's entry `slot` of its copy: S x M x ... -> S x ...
        return jax.lax.dynamic_index_in_dim(array_S, slot, axis=1, keepdims=False)

    def iteration(carry, t):
        io_S, state = carry  # state: each stage's output of the last iteration (stage s: job t - 1 - s)
        state = jnp.roll(state, 1, axis=0)  # one permute: stage s takes stage s - 1's; stage 0 the last stage's
        slot, back = t % microbatches, (t - count) % microbatches  # job t's micro-batch; job t - S's, now back
        kept = pick(io_S, back)
        mask = (first_S & (t >= count)).reshape(count, 1, 1, 1)
        io_S = jax.lax.dynamic_update_index_in_dim(io_S, jnp.where(mask, state, kept), back, axis=1)
        state = jnp.where(first_S.reshape(count, 1, 1, 1), pick(io_S, slot), state)
        segments = None  # stage s runs micro-batch (t - s) mod M: its documents, from the stage's own copy
        if segments_S is not None:
            slot_S = (t - jnp.arange(count)) % microbatches
            segments = jax.vmap(lambda each, i: jax.lax.dynamic_index_in_dim(each, i, keepdims=False))(
                segments_S, slot_S
            )
        repeat_S = jnp.clip((t - jnp.arange(count)) // microbatches, 0, repeats - 1)
        state = laid(staged(params_kxR, kinds, live, repeat_S, laid(state, STAGE_AXIS), segments), STAGE_AXIS)
        return (laid(io_S, STAGE_AXIS, None), state), None

    segments_S = None if segment_ids_BxL is None else on_stages(split(segment_ids_BxL))
    iterations = repeats * microbatches + count - 1
    state = laid(jnp.zeros((count, rows, length, width), x_BxLxD.dtype), STAGE_AXIS)
    io_S, state = jax.lax.scan(iteration, (on_stages(split(x_BxLxD)), state), jnp.arange(iterations))[0]
    last = (repeats * microbatches - 1) % microbatches  # the last job's micro-batch, still in the last stage
    io = jax.lax.dynamic_update_index_in_dim(first(io_S), first(jnp.roll(state, 1, axis=0)), last, axis=0)
    return jnp.swapaxes(io, 0, 1).reshape(batch, length, width)


def layouts(params: Any, rules: tuple, mesh, leading: tuple = (), fsdp: bool = True) -> Any:
    """Each weight's layout by the stack's rules ("layers/NAME"), its own layer axis replaced by `leading` axes (the
    staged view's R x S x k: None, "stage", None; one layer's weights: none), split over `fsdp` (and `context`, which
    shares fsdp's weights) or whole along it."""

    def spec(path, leaf):
        _, axes = sharding.match_rule("layers/" + path_name(path), rules)
        rest = tuple(None if axis == STAGE_AXIS or (axis == "fsdp" and not fsdp) else axis for axis in axes[1:])
        return sharding.spec_for(leaf.shape, (*leading, *rest), mesh)

    return jax.tree_util.tree_map_with_path(spec, params)


def split_gradients(layer_params: Any, rules: tuple, mesh):
    """The identity on one layer's gathered weights whose gradient is laid out as the stored weight is (split over
    fsdp): each iteration's gradient is reduce-scattered into an accumulator of 1 / fsdp the size, where XLA would
    otherwise keep the whole gradient and all-reduce it at every iteration."""
    specs = layouts(layer_params, rules, mesh)

    @jax.custom_vjp
    def identity(params):
        return params

    def forward(params):
        return params, None

    def backward(_, gradients):
        return (jax.lax.with_sharding_constraint(gradients, specs),)

    identity.defvjp(forward, backward)
    return identity
