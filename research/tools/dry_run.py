"""A dry run: the train step compiled for the hardware it will run on, from abstract arrays, never run.

  python launch.py --config experiments/lm.py:llama3-8b --dry_run --target gpu:h100:8 --config.batch_size=16
  python launch.py --config experiments/lm.py:llama2-70b --dry_run --target tpu:v5p-512 --token_budget 2e12
  python launch.py --config experiments/digits_mlp.py --workdir runs/dry --dry_run --target cpu:8

`--target` (research/tools/targets.py) names a TPU slice, GPU hosts or fake CPU devices; that target's own
compiler builds the program. The report: per-chip memory from the compiled program beside the analytic
count (parameters, optimizer state and gradients from the shardings; a decoder's activations by research/perf.py
from the experiment's `decoder_shape`) against the chip's memory, with a verdict (exit status 1 when it does not
fit); FLOPs per step by the compiler (TPU and CPU report them) and analytic (the experiment's
`flops_per_example`, else 6·N·T, Kaplan et al. 2020); the attention kernel each kind of layer gets there
(research/models/kernels.py's choice, with the reason where a fused kernel is not taken) and the fused kernels
the compiled program holds; every collective with its bytes per step (a mixture of experts' all-to-alls too);
the step time of a roofline: compute at an assumed MFU and collectives at the target's link bandwidth,
overlapped (the larger of the two) and not (their sum), and the MFU each implies; tokens/s per chip and days
for a token budget.
Expected: lm.py:llama2-70b does not fit a tpu:v5e-8 (exit 1) in about a minute; docs/scaling.md has runs.
"""

import dataclasses
import re
import time

import jax
import ml_collections
import numpy as np

from research import perf, sharding
from research.experiment import DecoderShape, hook
from research.models import kernels, param_count, ring
from research.models.transformer import REMAT_RECOMPUTE
from research.steps import build, with_features
from research.tools import hlo, targets

GIB = 2**30
ATTENTION_KERNELS = {"__cudnn$fmha": "cuDNN fused attention", "splash_mha": "splash attention (Pallas)"}
KERNEL_NAMES = {"splash": "splash", "cudnn": "cuDNN", "xla": "XLA", "ring": "ring over context"}


@dataclasses.dataclass(frozen=True)
class LayerAttention:
    """The attention kernel of the layers of one window (0: global) on the target, and why not a fused one."""

    window: int
    layers: int
    kernel: str  # a kernels.IMPLEMENTATIONS name other than "auto"
    reason: str = ""  # why XLA's: the fused kernel's refusal, or "asked for"; "" for a fused kernel or on a CPU

    def describe(self) -> str:
        """E.g. "52 local layers (window 1,024): splash", "10 global layers: XLA (cuDNN: scores soft-capped at 50)"."""
        layers = f"{self.layers} {'local' if self.window else 'global'} layer{'s' if self.layers != 1 else ''}"
        window = f" (window {self.window:,})" if self.window else ""
        return f"{layers}{window}: {KERNEL_NAMES[self.kernel]}" + (f" ({self.reason})" if self.reason else "")


@dataclasses.dataclass
class DryRun:
    target: targets.Target
    mesh_shape: dict[str, int]
    parameters: int
    tokens_per_step: int
    analytic_bytes: dict[str, float]  # per device
    analytic_flops: float  # per step, all devices: model FLOPs
    compiled_bytes: dict[str, float] = dataclasses.field(default_factory=dict)  # per device; empty if not compiled
    compiler_flops: float = float("nan")  # per step, all devices, rematerialisation included
    collectives: list[hlo.Collective] = dataclasses.field(default_factory=list)
    attention: str = ""  # the fused kernels the compiled program holds (its HLO's markers)
    layer_attention: list[LayerAttention] = dataclasses.field(default_factory=list)  # a decoder's, by layer kind
    compile_seconds: float = 0.0
    out_of_memory: str = ""  # the compiler's own refusal (TPU), when it gave one
    device_groups: np.ndarray | None = None  # the slice or host of each device, in the program's device order
    program: str = ""  # the compiled program's HLO text
    recompute: float = 1.0  # executed over model FLOPs: the remat policy's extra forward passes, the pipeline's bubble
    pipeline: str = ""  # the pipeline's stages, micro-batches and bubble, when the mesh has stages
    has_loops: bool = False  # whether the program has loops (its cost analysis then counts their bodies once)

    @property
    def devices(self) -> int:
        return self.target.chips

    @property
    def needed_bytes(self) -> float:
        """Per-device memory the program needs: the compiler's figure, else the analytic count."""
        if self.compiled_bytes:
            return self.compiled_bytes["total"]
        found = re.findall(r"([\d.]+)([GMK])", self.out_of_memory)  # "required ... (32.00G) exceeds ... (15.75G)"
        scale = {"G": GIB, "M": 2**20, "K": 2**10}
        if found:
            return float(found[0][0]) * scale[found[0][1]]
        return sum(self.analytic_bytes.values())

    @property
    def fits(self) -> bool:
        return not self.out_of_memory and self.needed_bytes <= self.target.chip.memory_bytes

    @property
    def fits_pool(self) -> bool:
        """Whether it fits what JAX gives a program by default (`Target.pool_bytes`: 75 % of a GPU)."""
        return self.fits and self.needed_bytes <= self.target.pool_bytes()

    def collective_seconds(self) -> float:
        """Seconds per step on the links: each collective at the fast (ICI, NVLink) or slow (DCN, network)
        bandwidth per chip, by whether its groups cross slices or hosts."""
        seconds = 0.0
        for collective in self.collectives:
            bandwidth = (
                self.target.chip.slow_bandwidth if crosses(collective, self) else self.target.chip.fast_bandwidth
            )
            seconds += collective.bytes_per_step / bandwidth if bandwidth else 0.0
        return seconds

    def model_flops_utilisation(self, seconds: float) -> float:
        """Model FLOPs over what the chips could do in a step of `seconds`: the MFU a roofline step implies."""
        return self.analytic_flops / (seconds * self.devices * self.target.chip.peak_tflops * 1e12)

    def step_seconds(self, mfu: float) -> dict[str, float]:
        """The roofline: compute at `mfu` of the peak, collectives, and the step overlapped and not."""
        peak = self.target.chip.peak_tflops * 1e12
        executed = self.analytic_flops * self.recompute
        compute = executed / (self.devices * peak * mfu) if peak else float("nan")
        links = self.collective_seconds()
        return {"compute": compute, "collectives": links, "overlapped": max(compute, links), "serial": compute + links}


def crosses(collective: hlo.Collective, result: DryRun) -> bool:
    """Whether any group of the collective spans more than one slice (TPU) or host (GPU)."""
    groups = result.device_groups
    if groups is None or result.target.groups == 1:
        return False
    return any(len(set(groups[[i for i in group if i < len(groups)]])) > 1 for group in collective.groups)


def tokens_in(batch) -> int:
    """Tokens a step trains on: batch x length for integer token inputs, else one per example."""
    inputs = batch["inputs"]
    integer = np.issubdtype(np.dtype(inputs.dtype), np.integer)
    return int(np.prod(inputs.shape)) if integer and len(inputs.shape) >= 2 else int(inputs.shape[0])


def per_device_bytes(tree) -> float:
    """Bytes of one device's shard of every leaf of an abstract, sharded tree."""
    return float(
        sum(
            np.prod(leaf.sharding.shard_shape(leaf.shape), dtype=np.int64) * np.dtype(leaf.dtype).itemsize
            for leaf in jax.tree.leaves(tree)
        )
    )


def analytic_memory(config: ml_collections.ConfigDict, experiment, setup) -> dict[str, float]:
    """Per-device bytes from the shardings (exact) and the experiment's activation model (an estimate)."""
    state = setup.abstract_state
    trainable = hook(with_features(config, experiment, setup.mesh, training=False), "trainable")
    trained = jax.tree.leaves(trainable(state.params)) if trainable else [True] * len(jax.tree.leaves(state.params))
    memory = {
        "parameters": per_device_bytes(state.params),
        "optimizer state": per_device_bytes(state.opt_state),
        "gradients": per_device_bytes([leaf for leaf, yes in zip(jax.tree.leaves(state.params), trained) if yes]),
        "batch": per_device_bytes(setup.batch_spec),
    }
    decoder = perf.decoder_of(config, experiment)
    if decoder:
        mesh = dict(setup.mesh.shape)
        examples = config.batch_size / (sharding.batch_divisor(setup.mesh) * config.optimizer.accumulate_steps)
        per_example = perf.decoder_activation_bytes(decoder, mesh.get("tensor", 1), mesh.get("expert", 1))
        memory["activations"] = per_example * examples
        stages = sharding.stage_shards(setup.mesh)
        if stages > 1:
            context = mesh.get("context", 1)
            memory["activations"] = perf.pipeline_activation_bytes(decoder, per_example, examples, stages, context)
    return memory


def recompute_of(config: ml_collections.ConfigDict, experiment, stages: int = 1) -> float:
    """Compute of a step over its model FLOPs: a decoder's remat policy's extra forward passes, else 1; over
    pipeline stages, the iterations in which a stage computes on nothing kept (the bubble) and, rematerialising
    whole stages, one more forward pass."""
    decoder = perf.decoder_of(config, experiment)
    if not decoder:
        return 1.0
    recompute = REMAT_RECOMPUTE[decoder.remat] + (1 / 3 if stages > 1 and decoder.pipeline[2] else 0.0)
    return recompute / (1 - perf.pipeline_bubble(decoder, stages))


def pipeline_of(config: ml_collections.ConfigDict, experiment, stages: int) -> str:
    """The report's line on a decoder's pipeline ("" without stages)."""
    decoder = perf.decoder_of(config, experiment)
    if not decoder or stages == 1:
        return ""
    (microbatches, repeats, _), (_, _, remat, gather) = perf.pipeline_schedule(decoder, stages), decoder.pipeline
    layers = -(-decoder.layers // (stages * repeats))
    return (
        f"pipeline: {stages} stages x {repeats} repeat(s) of {layers} layers, {microbatches} micro-batches, "
        f"bubble {perf.pipeline_bubble(decoder, stages):.1%} of the iterations"
        + ("; stages rematerialised" if remat else "")
        + ("; a stage's weights gathered once a step" if gather else "")
    )


def layer_attention(decoder: DecoderShape, mesh, batch: int, segment_ids: bool) -> list[LayerAttention]:
    """The kernel kernels.choose gives each kind of layer, asked under the target's abstract mesh (its platform and
    axes) with the abstract query and key of one micro-batch of `batch` examples (global shapes, as the model passes
    them: the choice tests their split over the mesh); `segment_ids`: whether the batch marks documents."""
    dtype = np.dtype("float32") if decoder.dtype_bytes == 4 else np.dtype(jax.numpy.bfloat16)
    query = jax.ShapeDtypeStruct((batch, decoder.length, decoder.heads, decoder.head_dim), dtype)
    key = jax.ShapeDtypeStruct((batch, decoder.length, decoder.kv_heads, decoder.head_dim), dtype)
    segments = jax.ShapeDtypeStruct((batch, decoder.length), np.int32) if segment_ids else None
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        kernel = kernels.choose(decoder.attention, query, key, segments, decoder.attention_softcap)
        platform = kernels.platform()
        refusals = {
            "gpu": lambda: "cuDNN: " + kernels.cudnn_refusal(query, segments, decoder.attention_softcap),
            "tpu": lambda: "splash: " + kernels.splash_refusal(query, key),
        }
        reason = "asked for" if decoder.attention != "auto" else refusals.get(platform, str)()
        reason = "keys and values gathered over context" if ring.shards() > 1 and kernel == "xla" else reason
    windows = decoder.layer_windows or (0,) * decoder.layers
    return [
        LayerAttention(window, windows.count(window), kernel, reason if kernel == "xla" else "")
        for window in sorted(set(windows), reverse=True)  # local layers first
    ]


def abstract_batch(config: ml_collections.ConfigDict, experiment) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes of this process's first training batch (the one batch a dry run reads)."""
    host_batch = next(iter(experiment.make_data(config, "train")))
    return {key: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype) for key, value in host_batch.items()}


def model_flops(config: ml_collections.ConfigDict, experiment, parameters: int, tokens: int) -> float:
    """Training FLOPs of one step: the experiment's `flops_per_example`, else 6·N·T."""
    flops = hook(experiment, "flops_per_example")
    return flops(config) * config.batch_size if flops else 6.0 * parameters * tokens


def dry_run(config: ml_collections.ConfigDict, experiment, target: targets.Target, batch=None) -> DryRun:
    """Compiles (never runs) the train step of `experiment` under `config` for `target`, from abstract arrays;
    `batch` (arrays or their shapes) stands in for the experiment's first training batch."""
    mesh = targets.make_mesh(target, config.mesh)
    setup = build(config, experiment, mesh, batch=abstract_batch(config, experiment) if batch is None else batch)
    parameters = param_count(setup.abstract_state.params)
    tokens = tokens_in(setup.batch_spec)
    result = DryRun(
        target=target,
        mesh_shape=dict(mesh.shape),
        parameters=parameters,
        tokens_per_step=tokens,
        analytic_bytes=analytic_memory(config, experiment, setup),
        analytic_flops=model_flops(config, experiment, parameters, tokens),
        recompute=recompute_of(config, experiment, sharding.stage_shards(mesh)),
        pipeline=pipeline_of(config, experiment, sharding.stage_shards(mesh)),
    )
    result.device_groups = targets.device_groups(mesh.devices, target)
    decoder = perf.decoder_of(config, experiment)
    if decoder:
        micro_batch = config.batch_size // config.optimizer.accumulate_steps
        segments = "segment_ids" in setup.batch_spec
        result.layer_attention = layer_attention(decoder, mesh, micro_batch, segments)
    start = time.perf_counter()
    try:
        with targets.compiling_for(target):
            compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        result.out_of_memory = str(error).split("RESOURCE_EXHAUSTED:")[-1].strip().splitlines()[0]
        result.compile_seconds = time.perf_counter() - start
        return result
    result.compile_seconds = time.perf_counter() - start
    result.compiled_bytes = compiled_bytes(compiled)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    result.compiler_flops = float(cost["flops"]) * target.chips if cost and "flops" in cost else float("nan")
    text = result.program = compiled.as_text()
    result.collectives = hlo.collectives(text, target.chips)
    result.attention = ", ".join(name for marker, name in ATTENTION_KERNELS.items() if marker in text)
    result.has_loops = max(hlo.execution_counts(text).values(), default=1) > 1
    return result


def compiled_bytes(compiled) -> dict[str, float]:
    """Per-device bytes of a compiled program by XLA's memory analysis: what it needs on the device."""
    memory = compiled.memory_analysis()
    parts = {
        "arguments (state + batch)": memory.argument_size_in_bytes,
        "temporaries": memory.temp_size_in_bytes,
        "outputs not aliased": memory.output_size_in_bytes - memory.alias_size_in_bytes,
    }
    return parts | {"total": sum(parts.values())}


def gib(value: float) -> str:
    """A size in GiB, or MiB below one GiB."""
    if np.isnan(value):
        return "-"
    return f"{value / GIB:,.2f} GiB" if value >= GIB else f"{value / 2**20:,.2f} MiB"


def format_report(result: DryRun, mfu: float, token_budget: float) -> str:
    """The dry run as a few tables: memory and verdict, FLOPs, collectives, roofline."""
    chip, analytic, compiled = result.target.chip, result.analytic_bytes, result.compiled_bytes
    held = "none" if compiled else "not compiled"  # the program's fused kernels, when there is a program
    lines = [
        f"target {result.target.spec}: {result.devices} x {chip.name} ({gib(chip.memory_bytes)} each), mesh "
        f"{result.mesh_shape}; compiled in {result.compile_seconds:.0f} s",
        f"{result.parameters:,} parameters; {result.tokens_per_step:,} tokens per step"
        + (f"; fused attention: {result.attention or held}" if result.target.platform != "cpu" else ""),
    ]
    if result.layer_attention:
        lines.append("attention: " + "; ".join(choice.describe() for choice in result.layer_attention))
    lines.append(f"{'memory per chip':40s} {'compiled':>12s} {'analytic':>12s}")
    state = analytic["parameters"] + analytic["optimizer state"] + analytic["batch"]
    transient = analytic["gradients"] + analytic.get("activations", 0.0)
    rows = [
        ("parameters", None, analytic["parameters"]),
        ("optimizer state", None, analytic["optimizer state"]),
        ("batch", None, analytic["batch"]),
        ("arguments (state + batch)", compiled.get("arguments (state + batch)", np.nan), state),
        ("  gradients", None, analytic["gradients"]),
        ("  activations", None, analytic.get("activations", np.nan)),
        ("temporaries (gradients, activations)", compiled.get("temporaries", np.nan), transient),
        ("outputs not donated", compiled.get("outputs not aliased", np.nan), None),
    ]
    for name, compiled_value, analytic_value in rows:
        left = "" if compiled_value is None else gib(compiled_value)
        right = "" if analytic_value is None else gib(analytic_value)
        lines.append(f"  {name:38s} {left:>12s} {right:>12s}")
    needed, capacity = result.needed_bytes, chip.memory_bytes
    if result.fits:
        verdict = (
            f"FITS: {gib(needed)} of {gib(capacity)}, {gib(capacity - needed)} spare ({1 - needed / capacity:.0%})"
        )
    else:
        source = f" (compiler: {result.out_of_memory})" if result.out_of_memory else ""
        verdict = f"DOES NOT FIT: needs {gib(needed)} of {gib(capacity)}, over by {gib(needed - capacity)}{source}"
    advice = pool_advice(result.target, needed)
    lines += [f"verdict: {verdict}"] + ([advice] if advice else [])
    lines += [
        f"FLOPs per step: analytic {result.analytic_flops:.4g} (model FLOPs); compiler {result.compiler_flops:.4g} "
        + ("(none reported)" if np.isnan(result.compiler_flops) else "(recomputation included)")
        + (
            "; the compiler counts each loop body once: its figure is low"
            if result.has_loops and not np.isnan(result.compiler_flops)
            else ""
        ),
    ]
    lines += ([result.pipeline] if result.pipeline else []) + format_collectives(result)
    if chip.peak_tflops:
        times = result.step_seconds(mfu)
        tokens_per_chip = result.tokens_per_step / times["overlapped"] / result.devices
        lines += [
            f"roofline: model FLOPs x {result.recompute:.3g} (remat's recomputation"
            + (", the bubble" if result.pipeline else "")
            + f") at {mfu:.0%} of "
            f"{chip.peak_tflops:g} TFLOP/s (MFU {mfu / result.recompute:.0%}), "
            f"links {chip.fast_bandwidth / 1e9:g} GB/s (slow network {chip.slow_bandwidth / 1e9:g} GB/s) per chip "
            f"one way: compute {times['compute']:.3g} s, collectives {times['collectives']:.3g} s",
            f"step {times['overlapped']:.3g} s overlapped ({times['serial']:.3g} s if not), MFU "
            f"{result.model_flops_utilisation(times['overlapped']):.1%} "
            f"({result.model_flops_utilisation(times['serial']):.1%}); {tokens_per_chip:,.0f} "
            f"tokens/s per chip; {token_budget:.3g} tokens in "
            f"{token_budget / (tokens_per_chip * result.devices) / 86400:,.1f} days",
        ]
    return "\n".join(lines)


def pool_advice(target: targets.Target, needed: float) -> str:
    """What to set when a program fits a GPU but not the pool JAX preallocates on it (`Target.pool_bytes`)."""
    pool, capacity = target.pool_bytes(), target.chip.memory_bytes
    if target.platform != "gpu" or needed <= pool or needed > capacity:
        return ""
    fraction = min(0.99, np.ceil(needed / capacity * 20 + 1) / 20)  # the next 5 % step, with 5 % to spare
    return (
        f"GPU memory pool: {gib(needed)} is over the {gib(pool)} ({pool / capacity:.0%}) JAX takes of the GPU (75 % "
        f"unless XLA_PYTHON_CLIENT_MEM_FRACTION says); run with XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}"
    )


def format_collectives(result: DryRun) -> list[str]:
    """One line per kind of collective, group size and network: how many per step and their bytes per chip."""
    rows: dict[tuple, list] = {}
    for collective in result.collectives:
        key = (collective.kind, collective.group_size, "slow" if crosses(collective, result) else "fast")
        row = rows.setdefault(key, [0, 0.0])
        row[0] += collective.count
        row[1] += collective.bytes_per_step
    if not rows:
        return ["collectives: none" if result.compiled_bytes else "collectives: not compiled"]
    lines = [f"{'collectives per step':22s} {'group':>6s} {'link':>5s} {'count':>7s} {'sent per chip':>14s}"]
    for (kind, size, link), (count, sent) in sorted(rows.items(), key=lambda item: -item[1][1]):
        lines.append(f"  {kind:20s} {size:6d} {link:>5s} {count:7d} {gib(sent):>14s}")
    return lines


def main(config: ml_collections.ConfigDict, experiment, target: str, mfu: float, token_budget: float = 0.0) -> bool:
    """launch.py --dry_run: compile for the target and print the report; whether the program fits."""
    result = dry_run(config, experiment, targets.parse(target))
    budget = token_budget or result.tokens_per_step * config.num_steps
    print(format_report(result, mfu, budget))
    return result.fits
