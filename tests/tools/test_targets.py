"""Target names, slice shapes, and the collectives read from a compiled program's text."""

import numpy as np
import pytest

from research.errors import ConfigError
from research.tools import hlo, targets


@pytest.mark.parametrize(
    "spec, chips, groups, topology",
    [
        ("tpu:v5e-256", 256, 1, "v5e:16x16"),
        ("tpu:v5e-8", 8, 1, "v5e:2x4"),
        ("tpu:v5p-512", 256, 1, "v5p:4x8x8"),  # v5p names count TensorCores, two per chip
        ("tpu:v5p-8", 4, 1, "v5p:2x2x1"),
        ("tpu:v6e-64x2", 128, 2, "v6e:8x8"),
        ("gpu:h100:8", 8, 1, "1x1x8"),
        ("gpu:h200:4x8", 32, 4, "1x4x8"),
    ],
)
def test_targets_parse_to_published_slice_shapes(spec, chips, groups, topology):
    target = targets.parse(spec)
    assert (target.chips, target.groups, target.topology()) == (chips, groups, topology)


@pytest.mark.parametrize(
    "spec, host, devices",
    [
        ("tpu:v5e-1", (1, 1, 1), 1),
        ("tpu:v6e-1", (1, 1, 1), 1),
        ("tpu:v5p-4", (1, 2, 1), 2),
        ("tpu:v5e-8", (2, 2, 1), 8),
    ],
)
def test_slices_smaller_than_a_host_have_compile_only_devices(spec, host, devices):
    """libtpu refuses a host box larger than the slice ("v5e:1x1" is not divisible by 2x2x1): one host, its size."""
    target = targets.parse(spec)
    assert target.chips_per_host() == host and len(target.devices()) == devices


@pytest.mark.parametrize("spec", ["tpu:v4-8", "gpu:h100:16", "tpu:v5p-6", "tpu:v5e-24", "h100"])
def test_malformed_targets_are_one_line_errors(spec):
    with pytest.raises(ConfigError) as error:
        targets.parse(spec)
    assert "\n" not in str(error.value)


def test_chip_table_has_the_data_sheet_numbers():
    assert targets.CHIPS["v5p"].peak_tflops == 459 and targets.CHIPS["v5p"].memory_bytes == 95 * 2**30
    assert targets.CHIPS["h100"].memory_bytes == 84_929_347_584  # XLA's H100 target config
    assert targets.cudnn_version(targets.parse("gpu:h100:8")) == 90700


@pytest.mark.parametrize(
    "spec, environment, fraction",
    [
        ("gpu:h200:1", {}, 0.75),  # JAX's default preallocation
        ("gpu:h200:1", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, 0.9),
        ("gpu:h100:8", {"XLA_CLIENT_MEM_FRACTION": "0.5", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, 0.5),
        ("gpu:h100:8", {"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}, 1.0),  # on demand, from the whole chip
        ("tpu:v5e-4", {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, 1.0),  # a TPU's programs get all its memory
    ],
)
def test_gpu_pool_is_the_fraction_jax_preallocates(default_gpu_memory, spec, environment, fraction):
    for name, value in environment.items():
        default_gpu_memory.setenv(name, value)
    target = targets.parse(spec)
    assert target.pool_bytes() == pytest.approx(fraction * target.chip.memory_bytes, rel=1e-12)


@pytest.mark.parametrize("value", ["most", "0", "1.5"])
def test_a_bad_memory_fraction_is_a_one_line_error(default_gpu_memory, value):
    default_gpu_memory.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", value)
    with pytest.raises(ConfigError, match="XLA_PYTHON_CLIENT_MEM_FRACTION") as error:
        targets.parse("gpu:h200:1").pool_bytes()
    assert "\n" not in str(error.value)


PROGRAM = "\n".join(
    [
        "%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {",
        "  %ag = f32[32,128]{1,0} all-gather(f32[8,128]{1,0} %x), channel_id=1, replica_groups=[2,4]<=[8], "
        "dimensions={0}",
        "  %ar = bf16[1024]{0} all-reduce(bf16[1024]{0} %y), channel_id=2, "
        "replica_groups={{0,4},{1,5},{2,6},{3,7}}, to_apply=%add",
        "  ROOT %t = (s32[], f32[8,128]) tuple(%i, %x)",
        "}",
        "",
        "%cond (p: (s32[], f32[8,128])) -> pred[] {",
        "  %c = s32[] constant(80)",
        "  ROOT %lt = pred[] compare(%i, %c), direction=LT",
        "}",
        "",
        "ENTRY %main (a: f32[8,128]) -> f32[8,128] {",
        "  %w = (s32[], f32[8,128]) while(%init), condition=%cond, body=%body",
        "  %rs = ((f32[64,16]{1,0}), (f32[8,16]{1,0})) reduce-scatter-start(%g), "
        "replica_groups=mesh['axis_0'=8,'axis_1'=1] {'axis_0'}, dimensions={0}",
        "  ROOT %r = f32[8,128] get-tuple-element(%w), index=1",
        "}",
        "",
    ]
)


def test_collectives_count_loop_iterations_and_ring_bytes():
    found = {collective.kind: collective for collective in hlo.collectives(PROGRAM, 8)}
    gather, reduce, scatter = found["all-gather"], found["all-reduce"], found["reduce-scatter"]
    assert (gather.count, gather.group_size, gather.array_bytes) == (80, 4, 32 * 128 * 4)
    assert gather.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert gather.bytes_per_step == pytest.approx(80 * 32 * 128 * 4 * 3 / 4)
    assert reduce.groups[0] == [0, 4] and reduce.bytes_per_step == pytest.approx(80 * 2048 * 2 * 1 / 2)
    assert (scatter.count, scatter.group_size, scatter.array_bytes) == (1, 8, 64 * 16 * 4)
    assert np.isclose(scatter.bytes_per_step, 64 * 16 * 4 * 7 / 8)
