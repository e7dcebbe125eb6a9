"""The dry run compiles without running, for fake CPU devices and for TPU and GPU targets through their own
compilers: FLOPs agree with 6·N·T, memory is per device and matches the shardings, the fused attention
kernel is in the LM's TPU and GPU programs, and a model too large for its target is reported as such."""

import re
import subprocess
import sys
import types

import numpy as np
import optax
import pytest
from test_docs_commands import assert_quiet

from conftest import EXPERIMENTS_DIR, ROOT
from research import experiment as experiment_lib
from research import metrics, perf
from research.config import trainer_config
from research.errors import ConfigError
from research.models import gpt
from research.tools import dry_run, hlo, plan, targets

VOCAB, LENGTH = 64, 64
LM = experiment_lib.load(EXPERIMENTS_DIR / "lm.py")


def gpt_experiment(width: int, layers: int):
    def make_data(config, split):
        rng = np.random.default_rng(0)
        while True:
            yield {
                "inputs": rng.integers(0, VOCAB, (config.batch_size, LENGTH)).astype(np.int32),
                "mask": np.ones(config.batch_size, np.float32),
            }

    def loss_fn(params, batch, rng, *, model):
        logits = model.apply({"params": params}, batch["inputs"])
        return metrics.masked_mean(
            optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], batch["inputs"][:, 1:])
        ), {}

    model = gpt.GPT(vocab_size=VOCAB, block_size=LENGTH, num_layers=layers, num_heads=4, width=width)
    return types.SimpleNamespace(make_data=make_data, make_model=lambda config: model, loss_fn=loss_fn)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes", [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_gpt_flops_agree_with_the_analytic_count(mesh_axes):
    config = trainer_config()
    config.batch_size = 16
    config.mesh.update(mesh_axes)
    result = dry_run.dry_run(config, gpt_experiment(width=256, layers=2), targets.parse("cpu:8"))
    assert result.devices == 8 and result.tokens_per_step == 16 * LENGTH
    assert (
        result.parameters
        == 2 * (4 * 256 * 256 + 4 * 256 + 2 * 256 * 1024 + 1024 + 256 + 4 * 256) + (VOCAB + LENGTH) * 256 + 2 * 256
    )
    assert result.compiler_flops == pytest.approx(result.analytic_flops, rel=0.10)
    assert result.compiled_bytes["arguments (state + batch)"] > 0
    assert "6·N·T" not in dry_run.format_report(result, 0.4, 1e9)


@pytest.mark.slow
def test_fsdp_divides_the_per_device_state():
    sizes = {}
    for fsdp in (1, 8):
        config = trainer_config()
        config.batch_size = 16
        config.mesh.update({"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1})
        result = dry_run.dry_run(config, gpt_experiment(width=256, layers=2), targets.parse("cpu:8"))
        sizes[fsdp] = result.compiled_bytes["arguments (state + batch)"]
        state = result.analytic_bytes["parameters"] + result.analytic_bytes["optimizer state"]
        assert sizes[fsdp] == pytest.approx(state + result.analytic_bytes["batch"], rel=1e-3)
    assert sizes[8] < 0.25 * sizes[1]


def lm_config(**overrides):
    """lm.py:smoke with what the fused kernels need: bfloat16, a window that is a multiple of 128, heads of 64."""
    config = LM.get_config("smoke")
    config.update_from_flattened_dict(
        {"model.block_size": 128, "model.dtype": "bfloat16", "model.width": 128, "batch_size": 8} | overrides
    )
    return config


@pytest.mark.parametrize(
    "spec, kernel, mesh",
    [
        ("tpu:v5e-4", "splash attention (Pallas)", {"data": 2, "fsdp": 2, "tensor": 1}),
        pytest.param(  # 13 s: with the slow ones, keeping the quick suite within its 6 minutes
            "gpu:h100:8", "cuDNN fused attention", {"data": 2, "fsdp": 2, "tensor": 2}, marks=pytest.mark.slow
        ),
    ],
)
def test_lm_compiles_for_tpu_and_gpu_with_the_fused_attention_kernel(spec, kernel, mesh):
    config = lm_config(**{f"mesh.{axis}": size for axis, size in mesh.items()})
    result = dry_run.dry_run(config, LM, targets.parse(spec))
    assert result.attention == kernel and result.fits
    assert [kind.describe() for kind in result.layer_attention] == [f"1 global layer: {kernel.split()[0]}"]
    assert result.mesh_shape == mesh | {"expert": 1, "context": 1, "stage": 1}  # lm.py's mesh has them: 1 here
    assert {collective.kind for collective in result.collectives} >= {"all-reduce"}
    state = sum(result.analytic_bytes[name] for name in ("parameters", "optimizer state", "batch"))
    plain, tiled = entry_argument_bytes(result.program)
    # The program's arguments are the shardings' shards, to the byte but for scalars: the step and the RNG key (12
    # bytes) are not in the analytic count, and the compiler drops the optimizer state's learning rate (4), which
    # its schedule overwrites every step. On a TPU each argument is stored in its layout's tiles (8 x 128 floats,
    # 128 for a vector or a scalar), and the compiler's total is exactly that.
    assert plain == state + 12 - 4
    assert result.compiled_bytes["arguments (state + batch)"] == tiled
    assert (tiled > 1.2 * plain) if spec.startswith("tpu") else tiled == plain
    assert "FITS" in dry_run.format_report(result, 0.4, 1e9)
    xla = dry_run.dry_run(lm_config(**{"model.attention": "xla"}), LM, targets.parse(spec))
    assert xla.attention == ""


LOCAL_AND_GLOBAL = {
    "model.num_layers": 3,
    "model.attention_window": 64,
    "model.global_every": 3,
}  # local, local, global
SPLIT = {"mesh.data": 2, "mesh.fsdp": -1, "mesh.tensor": 1}


@pytest.mark.parametrize(
    "spec, overrides, kernel, reason",
    [
        ("tpu:v5e-4", {}, "splash", ""),
        ("tpu:v5e-4", {"model.attention_softcap": 50.0}, "splash", ""),  # splash soft-caps
        ("tpu:v5e-4", {"mesh.tensor": 2}, "xla", "splash: heads over tensor 2"),  # 1 kv head
        ("gpu:h100:8", {"mesh.tensor": 2}, "cudnn", ""),
        ("gpu:h100:8", {"model.attention_softcap": 50.0}, "xla", "cuDNN: scores soft-capped at 50"),
        ("gpu:h100:8", {"model.dtype": "float32"}, "xla", "cuDNN: float32 compute, not half"),
        ("gpu:h100:8", {"model.attention": "xla"}, "xla", "asked for"),
        ("cpu:8", {}, "xla", ""),
    ],
)
def test_each_layer_kind_is_reported_with_the_kernel_it_gets_on_the_target(spec, overrides, kernel, reason):
    """kernels.choose asked under the target's mesh with the decoder_shape hook's shapes, nothing compiled."""
    config = lm_config(**LOCAL_AND_GLOBAL | SPLIT | overrides)
    mesh = targets.make_mesh(targets.parse(spec), config.mesh)
    found = dry_run.layer_attention(LM.decoder_shape(config), mesh, config.batch_size, segment_ids=False)
    assert found == [dry_run.LayerAttention(64, 2, kernel, reason), dry_run.LayerAttention(0, 1, kernel, reason)]
    name = dry_run.KERNEL_NAMES[kernel] + (f" ({reason})" if reason else "")
    assert "; ".join(kind.describe() for kind in found) == f"2 local layers (window 64): {name}; 1 global layer: {name}"
    if spec.startswith("gpu") and kernel == "cudnn":  # a batch that marks its documents: cuDNN takes no such mask
        masked = dry_run.layer_attention(LM.decoder_shape(config), mesh, config.batch_size, segment_ids=True)
        assert {(kind.kernel, kind.reason) for kind in masked} == {("xla", "cuDNN: document masks")}


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec, softcap, kernel, marker",
    [
        ("tpu:v5e-4", 0.0, "splash", "splash attention (Pallas)"),
        ("tpu:v5e-4", 50.0, "splash", "splash attention (Pallas)"),
        ("gpu:h100:8", 0.0, "cudnn", "cuDNN fused attention"),
        ("gpu:h100:8", 50.0, "xla", ""),
    ],
)
def test_the_compiled_program_holds_the_kernel_reported_for_local_and_global_layers(spec, softcap, kernel, marker):
    config = lm_config(**LOCAL_AND_GLOBAL | SPLIT | {"model.attention_softcap": softcap})
    result = dry_run.dry_run(config, LM, targets.parse(spec))
    assert [(kind.window, kind.layers, kind.kernel) for kind in result.layer_attention] == [
        (64, 2, kernel),
        (0, 1, kernel),
    ]
    assert result.attention == marker  # the HLO's evidence: the kernel is in the program, or no fused kernel is
    report = dry_run.format_report(result, 0.4, 1e9)
    assert f"attention: 2 local layers (window 64): {dry_run.KERNEL_NAMES[kernel]}" in report


def entry_argument_bytes(program: str) -> tuple[int, int]:
    """(bytes, bytes padded to their layouts' tiles) of a compiled program's arguments, read from its HLO text's
    entry_computation_layout: "f32[64,176]{1,0:T(8,128)}" is 64 x 176 floats, minor dimension last, in 8 x 128
    tiles (a TPU's), "f32[128]{0}" a vector without tiles (a GPU's)."""
    arguments = program.split("entry_computation_layout={(", 1)[1].split(")->", 1)[0]
    plain = tiled = 0
    for dtype, dims, minor_to_major, tile in re.findall(
        r"(\w+)\[([\d,]*)\](?:\{([\d,]*)(?::T\(([\d,]+)\))?)?", arguments
    ):
        sizes = [int(size) for size in dims.split(",") if size]
        major_to_minor = [sizes[int(axis)] for axis in reversed(minor_to_major.split(",")) if axis]
        tile_sizes = [int(size) for size in tile.split(",")] if tile else []
        major_to_minor = [1] * (len(tile_sizes) - len(major_to_minor)) + major_to_minor  # a scalar: one element
        for axis, size in enumerate(tile_sizes[::-1], 1):
            major_to_minor[-axis] = -(-major_to_minor[-axis] // size) * size
        plain += hlo.DTYPE_BYTES[dtype] * int(np.prod(sizes))
        tiled += hlo.DTYPE_BYTES[dtype] * int(np.prod(major_to_minor))
    return plain, tiled


@pytest.mark.slow  # 12 s: keeps the quick suite within its 6 minutes
def test_an_oversized_model_is_reported_as_not_fitting_with_exit_status_one():
    command = [sys.executable, "launch.py", "--config", "experiments/lm.py:llama2-70b", "--dry_run"]
    command += ["--target", "tpu:v5e-8", "--config.batch_size=8"]
    finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1, finished.stderr[-2000:]
    assert_quiet(finished.stdout + finished.stderr)
    verdict = next(line for line in finished.stdout.splitlines() if line.startswith("verdict"))
    needed, capacity, over = (float(x.replace(",", "")) for x in re.findall(r"([\d,.]+) GiB", verdict)[:3])
    assert needed > 140 and over == pytest.approx(needed - capacity, abs=0.02)  # 70B x 16 bytes / 8 chips + more


@pytest.mark.parametrize("gib, advice", [(55.0, ""), (66.1, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90"), (80.0, "")])
def test_a_gpu_program_over_jaxs_default_pool_gets_the_fraction_to_run_with(default_gpu_memory, gib, advice):
    """An H100 has 79.1 GiB; JAX preallocates 75 % (59.3 GiB) and runs out there unless told to take more. Over
    the whole chip the program does not fit at all, and no fraction helps."""
    giga = 2**30
    analytic = {"parameters": 10 * giga, "optimizer state": 20 * giga, "batch": giga, "gradients": 10 * giga}
    result = dry_run.DryRun(
        targets.parse("gpu:h100:1"), {"data": 1}, 2_500_000_000, 16_384, analytic, 2.5e14, {"total": gib * giga}
    )
    report = dry_run.format_report(result, 0.4, 1e9).splitlines()
    verdict = next(index for index, line in enumerate(report) if line.startswith("verdict"))
    assert report[verdict].startswith("verdict: FITS" if gib < 79.1 else "verdict: DOES NOT FIT")
    assert (advice in report[verdict + 1]) if advice else report[verdict + 1].startswith("FLOPs")
    default_gpu_memory.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")  # as the advice says: nothing more to advise
    assert dry_run.pool_advice(result.target, result.needed_bytes) == ""


EXPERTS_OVER_4 = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 4, "mesh.tensor": 1, "batch_size": 8}


@pytest.mark.slow  # 9 s: keeps the quick suite within its 6 minutes
def test_a_mixture_of_experts_dry_run_shows_its_all_to_alls_and_their_bytes():
    """:smoke-mixtral (one layer of 64, 8 experts, top 2, float32) on 8 CPU devices, its experts over 4 of them: each
    device's 32 tokens go to the experts in a buffer of 4 blocks of their 64 copies, 3 of which it sends: forward
    the rows and their expert ids out and the rows back, backward the rows' gradients both ways."""
    config = LM.get_config("smoke-mixtral")
    config.update_from_flattened_dict(EXPERTS_OVER_4)
    result = dry_run.dry_run(config, LM, targets.parse("cpu:8"))
    exchanges = [collective for collective in result.collectives if collective.kind == "all-to-all"]
    assert {collective.group_size for collective in exchanges} == {4} and sum(c.count for c in exchanges) == 5
    decoder = LM.decoder_shape(config)
    rows = perf.expert_exchange_bytes(decoder, 4, 32)
    assert rows == 3 * 2 * 32 * 64 * 4 and sum(c.bytes_per_step for c in exchanges) == 4 * rows + 3 * 2 * 32 * 4
    report = dry_run.format_report(result, 0.4, 1e9).splitlines()
    assert next(line for line in report if "all-to-all" in line).split() == [
        "all-to-all",
        "4",
        "fast",
        "5",
        "0.19",
        "MiB",
    ]
    # the batch splits over the expert axis too: one example per device
    assert result.analytic_bytes["activations"] == perf.decoder_activation_bytes(decoder, 1, 4)


def test_plan_candidates_respect_batch_heads_and_hosts():
    config = LM.get_config("llama3-8b")
    config.batch_size = 16
    found = plan.candidates(config, LM.decoder_shape(config), targets.parse("gpu:h100:2x8"))
    assert found and all(c.data * c.fsdp * c.tensor * c.stage == 16 and c.tensor <= 8 for c in found)
    assert all(c.data % 2 == 0 for c in found if c.stage == 1)  # without stages the data axis spans the hosts
    assert all(16 % (c.data * c.fsdp) == 0 and (16 // (c.data * c.fsdp)) % c.accumulate_steps == 0 for c in found)
    assert {c.remat for c in found} == set(plan.REMATS)


def test_the_planner_takes_the_decoder_and_its_config_keys_from_the_experiments_hook():
    """The GPT-2 family's decoder: multi-head attention, a 4 x width MLP, layers never scanned (no key to set)."""
    config = LM.get_config("gpt2-124m")
    decoder = LM.decoder_shape(config)
    shape = (decoder.layers, decoder.heads, decoder.kv_heads, decoder.head_dim, decoder.mlp_dim, decoder.vocab)
    assert shape == (12, 12, 12, 64, 3072, 50257) and (decoder.length, config.batch_size) == (1024, 512)
    found = plan.candidates(config, decoder, targets.parse("gpu:h100:8"))
    written = {tuple(candidate.overrides(decoder)) for candidate in found}
    assert written == {("mesh.data", "mesh.fsdp", "mesh.tensor", "optimizer.accumulate_steps", "model.remat")}
    assert "model.scan_layers" in found[0].overrides(LM.decoder_shape(LM.get_config("llama3-8b")))
    with pytest.raises(ConfigError, match="decoder_shape hook"):  # not a decoder: launch.py prints this one line
        plan.decoder_of(trainer_config(), gpt_experiment(width=64, layers=1))


def test_the_planner_searches_the_expert_axis_of_a_mixture_of_experts_only():
    """Mixtral 8x7B is Mistral 7B's shape with 8 experts: on 8 GPUs its candidates add expert axes 2, 4 and 8 (the
    batch split over them too) and write mesh.expert; the dense decoder's stay at 1 and write none. The compile
    queue: the dense decoder's policies take turns as before, the mixture's (policy, expert axis) pairs by diagonals."""
    target, found = targets.parse("gpu:h100:8"), {}
    for name in ("mixtral-8x7b", "mistral-7b"):
        config = LM.get_config(name)
        config.batch_size = 16
        decoder = LM.decoder_shape(config)
        found[name] = decoder, plan.candidates(config, decoder, target)
    decoder, mixture = found["mixtral-8x7b"]
    assert plan.expert_sizes(decoder, 8) == [1, 2, 4, 8] and {c.expert for c in mixture} == {1, 2, 4, 8}
    assert all(c.data * c.fsdp * c.expert * c.tensor * c.context == 8 for c in mixture)  # 32,768 tokens: context too
    assert all(16 % (c.data * c.fsdp * c.expert) == 0 for c in mixture)
    assert all(c.overrides(decoder)["mesh.expert"] == c.expert for c in mixture)
    dense_decoder, dense = found["mistral-7b"]
    assert plan.expert_sizes(dense_decoder, 8) == [1] and {c.expert for c in dense} == {1}
    assert len(dense) == len([c for c in mixture if c.expert == 1 and c.context == 1])
    assert not any("mesh.expert" in c.overrides(dense_decoder) for c in dense)
    assert [c.remat for c in plan.take_turns(dense, [1])[:3]] == list(plan.REMATS)
    turns = [(c.remat, c.expert) for c in plan.take_turns(mixture, [1, 2, 4, 8])[:5]]
    assert turns == [("full", 1), ("dots_no_batch", 2), ("none", 4), ("full", 2), ("dots_no_batch", 4)]
    header = plan.format_table([(mixture[-1], {"error": "not compiled"})], target).splitlines()[1]
    assert header.split()[:6] == ["rank", "data", "fsdp", "expert", "tensor", "context"]


def test_the_planner_splits_long_sequences_over_the_context_axis():
    """Llama 3.1 8B at 131,072 tokens on 8 GPUs: context axes 1 to 8 (each cutting the sequence into ring attention's
    2 x context chunks) are candidates and written as mesh.context; the weights split over fsdp x context and the
    tokens over context, so fsdp 8 and context 8 hold the same bytes, and at this length the step
    is compute-bound either way. A 8,192-token llama3-8b gets no context candidates."""
    config = LM.get_config("llama3.1-8b-128k")
    config.batch_size = 8
    decoder, target = LM.decoder_shape(config), targets.parse("gpu:h100:8")
    found = plan.candidates(config, decoder, target)
    assert {c.context for c in found} == {1, 2, 4, 8} and all(
        c.overrides(decoder)["mesh.context"] == c.context for c in found
    )
    assert all(c.data * c.fsdp * c.context * c.tensor == 8 for c in found)
    sizes = plan.Sizes(8_030_261_248, 8_030_261_248 * 16.0, 6 * 8_030_261_248 * 8 * 131072)
    fsdp = {
        c.context: c for c in found if c.tensor == 1 and c.remat == "full" and c.accumulate_steps == 1 and c.data == 1
    }
    (one, one_seconds), (eight, eight_seconds) = (
        plan.estimate(config, decoder, target, fsdp[n], 0.4, sizes) for n in (1, 8)
    )
    assert eight == pytest.approx(one)  # fsdp 8 or context 8: the state split 8 ways, the tokens 8 ways
    assert eight_seconds == pytest.approx(one_seconds)  # compute-bound at 131,072 tokens: the ring's bytes hide
    short = LM.get_config("llama3-8b")
    assert {c.context for c in plan.candidates(short, LM.decoder_shape(short), target)} == {0}


@pytest.mark.slow
def test_the_planner_ranks_plans_with_an_expert_axis_for_a_mixture_of_experts(tmp_path):
    config = LM.get_config("smoke-mixtral")
    config.update_from_flattened_dict({"model.block_size": 128, "model.dtype": "bfloat16", "batch_size": 8})
    target = targets.parse("tpu:v5e-4")
    ranked = plan.search(config, LM, str(EXPERIMENTS_DIR / "lm.py"), target, 0.4, 2, 4, tmp_path)
    fitting = [candidate for candidate, result in ranked if result.get("fits")]
    assert sum(candidate.expert > 1 for candidate in fitting) >= 3
    rows = plan.format_table(ranked, target).splitlines()[2:]
    assert [int(row.split()[3]) for row in rows] == [candidate.expert for candidate, _ in ranked]


@pytest.mark.slow
def test_plan_ranks_fitting_candidates_compiled_in_parallel(tmp_path):
    config = lm_config()
    ranked = plan.search(config, LM, str(EXPERIMENTS_DIR / "lm.py"), targets.parse("tpu:v5e-4"), 0.4, 2, 3, tmp_path)
    fitting = [result for _, result in ranked if result.get("fits")]
    assert len(fitting) >= 3 and len(list(tmp_path.glob("*.json"))) == len(ranked)
    assert {candidate.expert for candidate, _ in ranked} == {1}  # a dense decoder: no expert axis
    steps = [result["step_seconds"] for result in fitting]
    assert steps == sorted(steps)
    again = plan.search(config, LM, str(EXPERIMENTS_DIR / "lm.py"), targets.parse("tpu:v5e-4"), 0.4, 2, 3, tmp_path)
    assert [result for _, result in again] == [result for _, result in ranked]  # from the cache


PIPELINE_405B = {"batch_size": 128, "model.param_dtype": "bfloat16"}


def test_the_planner_searches_pipeline_stages_across_hosts():
    """Llama 3.1 405B on 64 hosts of 8 H100s: stage axes 1 to 8 (the stages span the hosts), each with micro-batches
    of at least one per stage, GPipe and circular schedules, the weights gathered once or at each use; a pipeline
    writes its mesh axis and the decoder's pipeline keys. Under 8 stages a device holds about an eighth of the state
    the same fsdp x tensor holds without them, and its step carries the bubble. One host: no stage candidates."""
    config = LM.get_config("llama3.1-405b")
    config.update_from_flattened_dict(PIPELINE_405B)
    decoder, target = LM.decoder_shape(config), targets.parse("gpu:h100:64x8")
    found = plan.candidates(config, decoder, target)
    staged = [c for c in found if c.stage > 1]
    assert {c.stage for c in found} == {1, 2, 4, 8} and {c.repeats for c in staged} == set(plan.REPEATS)
    assert all(c.microbatches >= c.stage and (128 // (c.data * c.fsdp)) % c.microbatches == 0 for c in staged)
    assert all(c.data * c.fsdp * c.tensor * c.stage == 512 for c in found)
    written = staged[0].overrides(decoder)
    assert written["mesh.stage"] == staged[0].stage and written["model.pipeline_remat"] is True
    assert {"model.pipeline_microbatches", "model.pipeline_repeats", "model.pipeline_gather"} <= set(written)
    sizes = plan.Sizes(405_853_388_800, 405_853_388_800 * 12.0, 6 * 405_853_388_800 * 128 * 8192)
    eight = next(c for c in staged if (c.stage, c.fsdp, c.tensor, c.repeats, c.gather) == (8, 8, 8, 1, False))
    flat = Candidate = plan.Candidate  # the same fsdp x tensor without stages (not a candidate: data 8 < 64 hosts)
    flat = Candidate(8, 8, 8, eight.remat, 1, True, stage=1)
    (staged_bytes, staged_seconds), (flat_bytes, flat_seconds) = (
        plan.estimate(config, decoder, target, c, 0.4, sizes) for c in (eight, flat)
    )
    assert staged_bytes < flat_bytes / 4 and staged_seconds > flat_seconds  # state over 8 stages; the bubble
    one_host = plan.candidates(
        LM.get_config("llama3-8b"), LM.decoder_shape(LM.get_config("llama3-8b")), targets.parse("gpu:h100:8")
    )
    assert {c.stage for c in one_host} == {1}


@pytest.mark.slow  # 8 s
def test_a_pipelined_dry_run_reports_its_bubble_and_counts_it_in_the_roofline():
    """:smoke with 4 scanned layers over 2 stages x data 4 of 8 CPU devices, 4 micro-batches: the report's pipeline
    line, a bubble of 1 / 5 in the roofline's recomputation, and each iteration's permute between the stages."""
    config = lm_config(**{"model.num_layers": 4, "model.scan_layers": True, "mesh.stage": 2, "mesh.data": 4})
    config.update_from_flattened_dict({"model.dtype": "float32", "model.pipeline_microbatches": 4, "batch_size": 16})
    result = dry_run.dry_run(config, LM, targets.parse("cpu:8"))
    assert result.pipeline.startswith("pipeline: 2 stages x 1 repeat(s) of 2 layers, 4 micro-batches, bubble 20.0%")
    assert result.recompute == pytest.approx(1.0 / (1 - 1 / 5)) and result.fits
    permutes = [c for c in result.collectives if c.kind == "collective-permute"]
    assert permutes and {c.group_size for c in permutes} == {2} and max(c.count for c in permutes) >= 5
    assert result.pipeline in dry_run.format_report(result, 0.4, 1e9).splitlines()


@pytest.mark.slow  # 20 s and 2 GiB of host memory: 405,853,388,800 parameters compiled for 512 GPUs
def test_llama_405b_fits_512_gpus_over_8_pipeline_stages():
    """FSDP 8 x tensor 8 x stage 8 (126 layers: 4 repeats of 4 a stage, padded to 128), 16 micro-batches of 8
    sequences of 8,192 tokens, stages rematerialised, a stage's weights gathered once a step: it fits an H100."""
    config = LM.get_config("llama3.1-405b")
    config.update_from_flattened_dict(
        PIPELINE_405B
        | {"mesh.fsdp": 8, "mesh.stage": 8, "mesh.tensor": 8, "model.remat": "dots_no_batch"}
        | {"model.pipeline_microbatches": 16, "model.pipeline_repeats": 4, "model.pipeline_remat": True}
        | {"model.pipeline_gather": True}
    )
    result = dry_run.dry_run(config, LM, targets.parse("gpu:h100:64x8"))
    assert result.fits and result.needed_bytes < 70 * 2**30, result.needed_bytes / 2**30  # measured: 62.36 GiB
    assert "bubble 9.9%" in result.pipeline and result.recompute == pytest.approx((1.05 + 1 / 3) / (1 - 7 / 71))
    permutes = sum(c.bytes_per_step for c in result.collectives if c.kind == "collective-permute")
    assert permutes < 100 * 2**30  # the micro-batches' activations moving between stages: 54 GiB a chip a step


@pytest.mark.slow  # 1 minute
def test_the_planner_ranks_pipelined_plans_for_llama_405b(tmp_path):
    config = LM.get_config("llama3.1-405b")
    config.update_from_flattened_dict(PIPELINE_405B)
    target = targets.parse("gpu:h100:64x8")
    ranked = plan.search(config, LM, str(EXPERIMENTS_DIR / "lm.py"), target, 0.4, 2, 4, tmp_path)
    fitting = [candidate for candidate, result in ranked if result.get("fits")]
    assert len(fitting) >= 3 and all(candidate.stage > 1 for candidate in fitting)
