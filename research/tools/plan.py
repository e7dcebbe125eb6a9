"""The planner: the fastest way to train a config on a target, found by compiling the candidates that may fit.

  python launch.py --config experiments/lm.py:llama3-8b --plan --target tpu:v5p-64 --config.batch_size=64

Candidates are mesh factorisations (data x fsdp x expert x context x tensor; tensor within a host or slice and
dividing the heads, expert dividing a mixture of experts' count and the chips (1 for a dense decoder), context
from 16,384 tokens a sequence (ring attention's chunks), data a multiple of the slices or hosts),
rematerialisation policies, micro-batches (optimizer.accumulate_steps) and, for the best of them, layers unrolled
instead of scanned. The decoder, and the config keys of its remat policy and scanning, come from the
experiment's `decoder_shape` hook. Each candidate is first sized analytically (state from the parameter count,
activations by research/perf.py) and timed by a roofline (compute at the assumed MFU, rematerialisation's extra
forward pass, FSDP's gathers and reductions, tensor parallelism's all-reduces, the experts' all-to-alls, the
ring's keys and values).
The policies (and expert axes) take turns in that order; `top` at a time are compiled by the target's compiler in
parallel processes (research/tools/dry_run.py; results cached by config and target) until 3 fit (3 with an
expert axis too, for a mixture of experts), those that do not fit are dropped and the rest ranked by the compiled
program's roofline. Prints a table and the winning `--config.` overrides.
Expected: 3 or more fitting plans for lm.py:llama3-8b on tpu:v5p-64 in a few minutes; for lm.py:mixtral-8x7b on
gpu:h100:8 (8 x 4,096 tokens, bfloat16 parameters) 3 with an expert axis in 4 minutes (docs/scaling.md).
"""

import concurrent.futures
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
from pathlib import Path

import jax
import ml_collections

from research import perf
from research.errors import ConfigError
from research.experiment import DecoderShape
from research.models import param_count
from research.models.transformer import REMAT_RECOMPUTE
from research.tools import targets

REMATS = ("full", "dots_no_batch", "none")
ACCUMULATE = (1, 2, 4)
REPEATS = (1, 2, 4)  # the pipeline schedules tried: GPipe, circular with 2 and 4 blocks of layers a stage
LONG_CONTEXT = 16384  # tokens per sequence from which the planner tries context parallelism
CACHE = Path("~/.cache/research/plans").expanduser()


@dataclasses.dataclass(frozen=True)
class Candidate:
    data: int
    fsdp: int
    tensor: int
    remat: str
    accumulate_steps: int
    scan_layers: bool
    expert: int = 1  # the mesh's expert axis: > 1 only for a mixture of experts
    context: int = 0  # the mesh's context axis (each sequence split over it); 0: the config has none
    stage: int = 0  # the mesh's stage axis (pipeline stages); 0: the config has none
    microbatches: int = 0  # the pipeline's micro-batches (its stages rematerialised)
    gather: bool = False  # the pipeline's stage weights gathered over fsdp once a step, not at every use
    repeats: int = 1  # > 1: the circular schedule, each stage holding this many blocks of layers

    def overrides(self, decoder: DecoderShape) -> dict:
        """The candidate as config overrides: the trainer's mesh (its expert axis for a mixture of experts) and
        micro-batches, the decoder's own keys."""
        found = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        found |= {"mesh.expert": self.expert} if decoder.experts else {}
        found |= {"mesh.context": self.context} if self.context else {}
        found |= {"mesh.stage": self.stage} if self.stage else {}
        if self.stage > 1:
            settings = {
                "microbatches": self.microbatches,
                "repeats": self.repeats,
                "remat": True,
                "gather": self.gather,
            }
            found |= {f"{decoder.pipeline_key}_{name}": value for name, value in settings.items()}
        found |= {"optimizer.accumulate_steps": self.accumulate_steps}
        found |= {decoder.remat_key: self.remat} if decoder.remat_key else {}
        return found | ({decoder.scan_layers_key: self.scan_layers} if decoder.scan_layers_key else {})


def decoder_of(config: ml_collections.ConfigDict, experiment) -> DecoderShape:
    """The decoder the planner searches (the experiment's `decoder_shape` hook); a one-line error without one."""
    decoder = perf.decoder_of(config, experiment)
    if decoder is None:
        raise ConfigError("--plan searches decoders (experiments with a decoder_shape hook, as lm.py): use --dry_run")
    return decoder


def powers_of_two(limit: int) -> list[int]:
    return [2**k for k in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def expert_sizes(decoder: DecoderShape, chips: int) -> list[int]:
    """The expert axes a decoder may take: the divisors its expert count and the chips share (1 when dense)."""
    common = math.gcd(decoder.experts, chips) if decoder.experts else 1
    return [size for size in range(1, common + 1) if common % size == 0]


def context_sizes(config: ml_collections.ConfigDict, decoder: DecoderShape, chips: int) -> list[int]:
    """The context axes a config may take: 0 (no override) without the axis in its mesh or for a short sequence
    not split; from LONG_CONTEXT tokens, the powers of two that cut a sequence into ring attention's 2 x context
    chunks."""
    if "context" not in config.mesh or decoder.length < LONG_CONTEXT and config.mesh.context == 1:
        return [0]  # left as it is
    if decoder.length < LONG_CONTEXT:
        return [1]
    return [size for size in powers_of_two(chips) if decoder.length % (2 * size) == 0]


def stage_sizes(config: ml_collections.ConfigDict, decoder: DecoderShape, target: targets.Target) -> list[int]:
    """The stage axes a config may take: 0 (no override) without the axis in its mesh or a pipeline's settings; else
    1 and, for a scanned decoder on several hosts or slices, the powers of two up to 8 that leave a layer a stage."""
    if "stage" not in config.mesh or not decoder.pipeline_key:
        return [0]
    if target.groups == 1 or not decoder.scan_layers:
        return [1]
    return [size for size in powers_of_two(min(8, target.groups, decoder.layers))]


def microbatches_for(batch_rows: int, stages: int) -> int:
    """A pipeline's micro-batches: the most, up to 4 per stage, that split a device group's rows evenly (0: fewer
    than one per stage, not a plan)."""
    found = max((size for size in powers_of_two(min(batch_rows, 4 * stages)) if batch_rows % size == 0), default=0)
    return found if found >= stages else 0


def candidates(config: ml_collections.ConfigDict, decoder: DecoderShape, target: targets.Target) -> list[Candidate]:
    """Every mesh, remat and micro-batch combination the batch, the decoder and the hardware allow."""
    per_group = target.chips // target.groups
    remats = REMATS if decoder.remat_key else (decoder.remat,)
    found = []
    axes = (
        powers_of_two(min(per_group, 8)),
        expert_sizes(decoder, target.chips),
        context_sizes(config, decoder, target.chips),
        stage_sizes(config, decoder, target),
    )
    for tensor, expert, context, stage in itertools.product(*axes):
        split = tensor * expert * max(context, 1) * max(stage, 1)
        if decoder.heads % tensor or target.chips % split:
            continue
        for data in powers_of_two(target.chips // split):
            fsdp = target.chips // (split * data)
            shards = data * fsdp * expert  # the batch axes (research/sharding.py)
            if (stage <= 1 and data % target.groups) or config.batch_size % shards:  # stages span the hosts
                continue
            microbatches = microbatches_for(config.batch_size // shards, stage) if stage > 1 else 0
            if stage > 1 and not microbatches:
                continue
            for remat, accumulate in itertools.product(remats, (1,) if stage > 1 else ACCUMULATE):
                if (config.batch_size // shards) % accumulate == 0:
                    schedules = itertools.product((True, False), REPEATS) if stage > 1 else [(False, 1)]
                    for gather, repeats in schedules:
                        axes = (expert, context, stage, microbatches, gather, repeats)
                        found.append(Candidate(data, fsdp, tensor, remat, accumulate, decoder.scan_layers, *axes))
    return found


@dataclasses.dataclass(frozen=True)
class Sizes:
    parameters: int
    state_bytes: float  # parameters, optimizer state and gradients, all devices together
    flops: float  # model FLOPs of one step


def sizes_of(config: ml_collections.ConfigDict, experiment) -> Sizes:
    """The parameter count and state bytes of the config's train state (abstract: nothing allocated)."""
    from research import sharding
    from research.steps import build
    from research.tools.dry_run import abstract_batch, model_flops, per_device_bytes, tokens_in

    one = sharding.make_mesh({name: 1 for name in config.mesh}, jax.devices()[:1])
    trial = copy.deepcopy(config)
    trial.unlock()
    trial.optimizer.accumulate_steps = 1
    setup = build(trial, experiment, one, batch=abstract_batch(config, experiment))
    state, parameters = setup.abstract_state, param_count(setup.abstract_state.params)
    flops = model_flops(config, experiment, parameters, tokens_in(setup.batch_spec))
    return Sizes(parameters, per_device_bytes(state.params) * 2 + per_device_bytes(state.opt_state), flops)


def estimate(
    config: ml_collections.ConfigDict,
    decoder: DecoderShape,
    target: targets.Target,
    candidate: Candidate,
    mfu: float,
    sizes: Sizes,
):
    """(per-device bytes, step seconds) by the analytic model: the pre-screen before compiling."""
    # Each device holds 1 / expert of the experts' parameters and all of the rest (both split over fsdp x tensor).
    held = 1 - perf.expert_parameters(decoder) / sizes.parameters * (1 - 1 / candidate.expert)
    parameters, context = sizes.parameters * held, max(candidate.context, 1)
    shards = candidate.fsdp * context  # weights split over fsdp x context (research/sharding.py spec_for)
    state = sizes.state_bytes * held / (shards * candidate.tensor)
    examples = config.batch_size / (candidate.data * candidate.fsdp * candidate.expert)
    shape = dataclasses.replace(decoder, remat=candidate.remat)
    per_example = perf.decoder_activation_bytes(shape, candidate.tensor, candidate.expert)
    activations = per_example * examples / candidate.accumulate_steps / context  # a device holds L / context
    chip = target.chip
    recompute = REMAT_RECOMPUTE[candidate.remat]
    # FSDP: each micro-batch gathers the (bf16) weights twice and reduce-scatters the float32 gradients once.
    fsdp_bytes = 0.0 if shards == 1 else candidate.accumulate_steps * parameters / candidate.tensor * (2 * 2 + 4)
    stage_bytes, layers = 0.0, decoder.layers
    if candidate.stage > 1:  # research/models/pipeline.py, stages rematerialised
        stages, microbatches = candidate.stage, candidate.microbatches
        staged = dataclasses.replace(shape, pipeline=(microbatches, candidate.repeats, True, candidate.gather))
        iterations, rows = perf.pipeline_schedule(staged, stages)[2], examples / microbatches
        stream = rows * decoder.length / context * decoder.width * decoder.dtype_bytes
        stage_weights = parameters / (stages * candidate.tensor)  # a device's share of its stage's layers, whole
        state = state / stages + (stage_weights * 2 if candidate.gather else 0.0)  # the gathered bf16 weights
        activations = per_example * rows / stages + iterations * stream  # a stage's k x R layers: the compiled
        # programs hold more than the schedule's count (pipeline buffers, gathered weights), so the screen keeps R
        recompute = (recompute + 1 / 3) / (1 - perf.pipeline_bubble(staged, stages))  # forward again; the bubble
        # As the compiled programs do: the weights a repeat uses (gathered once, else at each of the 3 forward
        # passes) and their gradients reduce-scattered every iteration.
        used = stage_weights / candidate.repeats * 2 * iterations
        fsdp_bytes = stage_weights * 2 + used if candidate.gather else 4 * used
        fsdp_bytes = 0.0 if shards == 1 else fsdp_bytes
        stage_bytes, layers = 2 * iterations * stream, layers * iterations / (candidate.repeats * microbatches * stages)
    compute = sizes.flops * recompute / (target.chips * chip.peak_tflops * 1e12 * mfu)
    tensor_bytes = 0.0
    if candidate.tensor > 1:  # two all-reduces per layer forward, two backward, of the local activations
        tensor_bytes = 4 * 2 * examples * decoder.length / context * decoder.width * decoder.dtype_bytes * layers
    # Ring attention: each device's keys and values go round the ring once forward, and once with their gradients
    # backward (research/models/ring.py).
    kv_bytes = examples * decoder.length / context * 2 * decoder.kv_heads * decoder.head_dim * decoder.dtype_bytes
    ring_bytes = 3 * decoder.layers * (context - 1) * kv_bytes / max(candidate.tensor, 1)
    # Experts: an all-to-all to them and one back per layer, forward and backward, and again where the forward is
    # recomputed (any policy but none: the grouped matmuls are not kept).
    exchanges = decoder.layers * (4 if candidate.remat == "none" else 6)
    expert_bytes = exchanges * perf.expert_exchange_bytes(decoder, candidate.expert, examples * decoder.length)
    bandwidth = (
        chip.fast_bandwidth if target.groups == 1 or shards <= target.chips // target.groups else (chip.slow_bandwidth)
    )
    links = (fsdp_bytes + tensor_bytes + expert_bytes + ring_bytes + stage_bytes) / bandwidth
    return state + activations, max(compute, links)


def _with(config: ml_collections.ConfigDict, candidate: Candidate, decoder: DecoderShape) -> ml_collections.ConfigDict:
    trial = copy.deepcopy(config)
    trial.unlock()
    trial.update_from_flattened_dict(candidate.overrides(decoder))
    return trial


def compile_candidate(config: ml_collections.ConfigDict, experiment_path: str, target_spec: str, mfu: float) -> dict:
    """In a fresh process: the dry run of one candidate, summarised (or its one-line error)."""
    jax.config.update("jax_platforms", "cpu")
    from research import experiment as experiment_lib
    from research.tools import dry_run

    try:
        result = dry_run.dry_run(config, experiment_lib.load(experiment_path), targets.parse(target_spec))
    except ConfigError as error:
        return {"error": str(error).splitlines()[0]}
    except Exception as error:  # a candidate the compiler or the mesh refuses is a row of the table, not the end
        return {"error": f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:160]}"}
    times = result.step_seconds(mfu)
    return {
        "fits": result.fits,
        "needed_bytes": result.needed_bytes,
        "capacity": result.target.chip.memory_bytes,
        "step_seconds": times["overlapped"],
        "serial_seconds": times["serial"],
        "collective_seconds": times["collectives"],
        "tokens_per_chip": result.tokens_per_step / times["overlapped"] / result.devices,
        "compile_seconds": result.compile_seconds,
        "attention": result.attention,
    }


def cache_key(config: ml_collections.ConfigDict, target: str, mfu: float) -> str:
    text = config.to_json_best_effort(sort_keys=True) + target + str(mfu) + jax.__version__
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def search(
    config,
    experiment,
    experiment_path: str,
    target: targets.Target,
    mfu: float,
    workers: int,
    top: int,
    cache: Path,
    want: int = 3,
    rounds: int = 3,
) -> list[tuple[Candidate, dict]]:
    """The compiled candidates with their results, best first. The analytic pre-screen orders the candidates;
    they are compiled `top` at a time (the first round also tries the best one unrolled) until `want` fit (for a
    mixture of experts, `want` with an expert axis too) or `rounds` rounds have run."""
    capacity, decoder = target.chip.memory_bytes, decoder_of(config, experiment)
    screened, sizes, every = [], sizes_of(config, experiment), candidates(config, decoder, target)
    for candidate in every:
        needed, seconds = estimate(config, decoder, target, candidate, mfu, sizes)
        if needed <= 1.2 * capacity:  # the analytic count is an estimate: keep the borderline ones
            screened.append((seconds, needed, candidate))
    screened.sort(key=lambda item: (item[0], item[1]))
    queue = take_turns([candidate for _, _, candidate in screened], expert_sizes(decoder, target.chips))
    results: dict[Candidate, dict] = {}
    cached = 0
    for round_index in range(rounds):
        chosen, queue = queue[:top], queue[top:]
        if round_index == 0 and chosen and decoder.scan_layers and decoder.scan_layers_key and chosen[0].stage <= 1:
            chosen.append(dataclasses.replace(chosen[0], scan_layers=False))
        cached += _compile_all(chosen, config, decoder, experiment_path, target, mfu, workers, cache, results)
        fitting = [candidate for candidate, result in results.items() if result.get("fits")]
        experts_tried = len(expert_sizes(decoder, target.chips)) == 1 or sum(c.expert > 1 for c in fitting) >= want
        if not queue or (len(fitting) >= want and experts_tried):
            break
    print(
        f"{len(every)} candidates, {len(screened)} within the memory bound by the analytic "
        f"count, {len(results)} compiled ({cached} from the cache)"
    )
    return sorted(results.items(), key=_order)


def take_turns(ordered: list[Candidate], experts: list[int]) -> list[Candidate]:
    """`ordered` (best first) with the remat policies and the expert axes taking turns: a policy that saves more
    memory runs slower, and the analytic count, only an estimate, may have let through candidates of the fastest one
    that do not fit; its roofline, compute-bound, seldom tells the expert axes apart. The (policy, expert axis) pairs
    go by wrapped diagonals, so that consecutive turns differ in both (one expert axis: the policies in turn)."""
    pairs = sorted(
        itertools.product(range(len(REMATS)), range(len(experts))),
        key=lambda pair: ((pair[1] - pair[0]) % len(experts), pair[0]),
    )
    groups = [
        [candidate for candidate in ordered if (candidate.remat, candidate.expert) == (REMATS[policy], experts[axis])]
        for policy, axis in pairs
    ]
    return [candidate for turn in itertools.zip_longest(*groups) for candidate in turn if candidate]


def _order(item) -> tuple:
    """Fitting first; then the estimated step, the step without overlap, the memory."""
    result = item[1]
    keys = ("step_seconds", "serial_seconds", "needed_bytes")
    return (not result.get("fits"), *(result.get(key, 1e30) for key in keys))


def _compile_all(chosen, config, decoder, experiment_path, target, mfu, workers, cache: Path, results: dict) -> int:
    """Compiles `chosen` in `workers` fresh processes into `results` (cached by config and target); how many
    came from the cache."""
    cache.mkdir(parents=True, exist_ok=True)
    pending = {}
    for candidate in chosen:
        trial = _with(config, candidate, decoder)
        path = cache / f"{cache_key(trial, target.spec, mfu)}.json"
        if path.exists():
            results[candidate] = json.loads(path.read_text())
        else:
            pending[candidate] = (trial, path)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {
            pool.submit(compile_candidate, trial, experiment_path, target.spec, mfu): (candidate, path)
            for candidate, (trial, path) in pending.items()
        }
        for future in concurrent.futures.as_completed(futures):
            candidate, path = futures[future]
            results[candidate] = future.result()
            path.write_text(json.dumps(results[candidate]))
    return len(chosen) - len(pending)


def format_table(ranked: list[tuple[Candidate, dict]], target: targets.Target) -> str:
    header = f"{'rank':>4s} {'data':>5s} {'fsdp':>5s} {'expert':>6s} {'tensor':>6s} {'context':>7s} {'stage':>5s} "
    header += f"{'gather':>6s} {'rep':>3s} "
    header += f"{'remat':>13s} {'micro':>5s} "
    header += f"{'scan':>5s} "
    header += f"{'GiB/chip':>9s} {'fits':>5s} {'step s':>8s} {'serial s':>9s} {'tok/s/chip':>11s} {'compile s':>9s}"
    lines = [
        f"plans for {target.spec} ({target.chips} x {target.chip.name}, {target.chip.memory_bytes / 2**30:.1f} GiB)",
        header,
    ]
    for rank, (candidate, result) in enumerate(ranked, 1):
        head = (
            f"{rank:4d} {candidate.data:5d} {candidate.fsdp:5d} {candidate.expert:6d} {candidate.tensor:6d} "
            f"{max(candidate.context, 1):7d} {max(candidate.stage, 1):5d} "
            f"{('once' if candidate.gather else 'each') if candidate.stage > 1 else '':>6s} {candidate.repeats:3d} "
            f"{candidate.remat:>13s} "
            f"{candidate.microbatches or candidate.accumulate_steps:5d} {str(candidate.scan_layers):>5s} "
        )
        if "error" in result:
            lines.append(head + f"error: {result['error']}")
            continue
        lines.append(
            head + f"{result['needed_bytes'] / 2**30:9.2f} {'yes' if result['fits'] else 'no':>5s} "
            f"{result['step_seconds']:8.3g} {result['serial_seconds']:9.3g} {result['tokens_per_chip']:11,.0f} "
            f"{result['compile_seconds']:9.0f}"
        )
    return "\n".join(lines)


def main(config, experiment, config_argument: str, target: str, *, mfu: float, workers: int, top: int = 4) -> bool:
    """launch.py --plan: search, print the table and the best plan's overrides (on top of the command's own);
    whether any plan fits."""
    decoder = decoder_of(config, experiment)
    parsed = targets.parse(target)
    cache = Path(os.environ.get("RESEARCH_PLAN_CACHE", CACHE))
    ranked = search(config, experiment, config_argument.partition(":")[0], parsed, mfu, workers, top, cache)
    print(format_table(ranked, parsed))
    fitting = [(candidate, result) for candidate, result in ranked if result.get("fits")]
    if not fitting:
        print("no candidate fits: a larger target, a smaller batch, or bfloat16 parameters (model.param_dtype)")
        return False
    from research.tools.dry_run import pool_advice

    best, result = fitting[0]
    flags = " ".join(f"--config.{key}={value}" for key, value in best.overrides(decoder).items())
    print(f"best of {len(fitting)} fitting plans: {flags}")
    if advice := pool_advice(parsed, result["needed_bytes"]):
        print(advice)
    return True
