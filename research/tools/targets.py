"""Hardware a dry run compiles for, without having it: TPU slices through libtpu, NVIDIA GPUs through the CUDA
PJRT plugin (an XLA GPU target config stands in for the device), and fake CPU devices.

  tpu:v5e-256  tpu:v5p-512  tpu:v6e-64  tpu:v5e-256x2   generation-chips (v5p: TensorCores, 2 per chip), x slices
  gpu:h100:8   gpu:h200:4x8                            kind:devices, or kind:hosts x devices per host
  cpu:8                                                 fake CPU devices (this machine's compiler)

The compilers come from extras: `pip install -e ".[tpu]"` (libtpu) and `".[gpu]"` (jax-cuda12-plugin and
-pjrt without the CUDA libraries); the GPU target configs in gpu_targets/ are XLA's published specs (their
PROVENANCE.md). `CHIPS` holds each chip's numbers with their source; the roofline in dry_run.py reads them.
"""

import contextlib
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np
from jax.sharding import AxisType, Mesh

from research import sharding
from research.errors import MEMORY_FRACTION_VARIABLES, ConfigError

GPU_TARGETS = Path(__file__).parent / "gpu_targets"
GB, GIB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's figures: dense bf16 peak, memory, and the bandwidths a roofline needs."""

    name: str
    platform: str  # tpu, gpu or cpu
    peak_tflops: float  # dense bfloat16, per chip
    memory_bytes: float  # HBM per chip
    memory_bandwidth: float  # HBM bytes/s
    fast_bandwidth: float  # bytes/s one way per chip inside a slice (TPU ICI) or a host (NVLink)
    slow_bandwidth: float  # bytes/s per chip between slices (TPU DCN) or hosts (InfiniBand / RoCE)
    source: str


TPU_DOCS = "cloud.google.com/tpu/docs/"
# Bandwidths one way: the data sheets' bidirectional ICI and NVLink figures halved; network figures per chip.
CHIPS = {
    "v5e": Chip("TPU v5e", "tpu", 197, 16 * GIB, 819 * GB, 1600e9 / 8 / 2, 2 * 100e9 / 8 / 8, TPU_DOCS + "v5e"),
    "v5p": Chip("TPU v5p", "tpu", 459, 95 * GIB, 2765 * GB, 1200 * GB / 2, 50e9 / 8, TPU_DOCS + "v5p"),
    "v6e": Chip("TPU v6e", "tpu", 918, 32 * GIB, 1640 * GB, 3200e9 / 8 / 2, 4 * 200e9 / 8 / 8, TPU_DOCS + "v6e"),
    "h100": Chip(
        "H100 SXM 80GB", "gpu", 989, 84_929_347_584, 3.35e12, 900 * GB / 2, 400e9 / 8, "NVIDIA H100 data sheet"
    ),
    "h200": Chip(
        "H200 SXM 141GB", "gpu", 989, 151_397_597_184, 4.8e12, 900 * GB / 2, 400e9 / 8, "NVIDIA H200 data sheet"
    ),
}
TPU_CHIP_CONFIG = {"v5e": "default", "v6e": "default", "v5p": "megacore"}  # v5p: one device per chip, 2 cores
TPU_CORES_PER_CHIP = {"v5e": 1, "v6e": 1, "v5p": 2}  # the number in a slice's name counts cores
TPU_CHIPS_PER_HOST = {"v5e": (2, 2, 1), "v6e": (2, 2, 1), "v5p": (2, 2, 1)}
TPU_2D = ("v5e", "v6e")  # 2-D tori; v5p is a 3-D torus


@dataclasses.dataclass(frozen=True)
class Target:
    """A named piece of hardware: `chips` devices in `groups` slices (TPU) or hosts (GPU) of a `chip`."""

    spec: str
    chip: Chip
    kind: str  # the CHIPS key, or "cpu"
    chips: int
    groups: int = 1

    @property
    def platform(self) -> str:
        return self.chip.platform

    def topology(self) -> str:
        """The topology name the compiler takes: "v5p:4x8x8" (one slice) or "1x4x8" (slices x hosts x GPUs)."""
        if self.platform == "gpu":
            return f"1x{self.groups}x{self.chips // self.groups}"
        return f"{self.kind}:{'x'.join(map(str, torus_shape(self.chips // self.groups, self.kind in TPU_2D)))}"

    def devices(self) -> list:
        """Compile-only devices of this hardware (no chip needed); the fake CPU devices for cpu:N."""
        import jax
        from jax.experimental import topologies

        if self.platform == "cpu":
            if len(jax.devices()) != self.chips:
                raise ConfigError(f"--target {self.spec}: this process has {len(jax.devices())} CPU devices")
            return jax.devices()
        require_compiler(self.platform)
        if self.platform == "tpu":
            # Compile-only: no chip to lock, so the planner's parallel compiles may each load libtpu; quiet logs.
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
            os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "3")
            os.environ.setdefault("TPU_MIN_LOG_LEVEL", "3")
            description = topologies.get_topology_desc(
                topology_name=self.topology(),
                platform="tpu",
                chip_config_name=TPU_CHIP_CONFIG[self.kind],
                chips_per_host_bounds=self.chips_per_host(),
                num_slices=self.groups,
            )
        else:
            config = (GPU_TARGETS / f"{self.kind}.txtpb").read_text(encoding="utf-8")
            description = topologies.get_topology_desc(platform="cuda", target_config=config, topology=self.topology())
        return list(description.devices)

    def pool_bytes(self) -> float:
        """The memory JAX gives one device's programs by default: on a GPU the pool its allocator preallocates
        (XLA_CLIENT_MEM_FRACTION or XLA_PYTHON_CLIENT_MEM_FRACTION, else 75 %; XLA_PYTHON_CLIENT_ALLOCATOR=platform
        allocates on demand from the whole chip), elsewhere the chip's memory. Newer JAX may grow the pool past
        75 % on its own (its "0.75+" policy); the 75 % is the figure every version keeps."""
        if self.platform != "gpu" or os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform":
            return self.chip.memory_bytes
        names = [name for name in MEMORY_FRACTION_VARIABLES if os.environ.get(name)]
        value = os.environ[names[0]] if names else "0.75"
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction <= 1:
            raise ConfigError(f"{names[0]}={value!r}: give the fraction of GPU memory JAX may take, such as 0.9")
        return self.chip.memory_bytes * fraction

    def chips_per_host(self) -> tuple[int, ...]:
        """A TPU host's chips as a box: 2x2x1, or the whole slice where it is smaller (v5e-1, v5p-4: one host)."""
        shape = torus_shape(self.chips // self.groups, self.kind in TPU_2D) + (1,)
        return tuple(min(host, size) for host, size in zip(TPU_CHIPS_PER_HOST[self.kind], shape))

    def group_of(self, device) -> int:
        """The slice (TPU) or host (GPU) a device sits in: collectives across them use the slow network."""
        return int(getattr(device, "slice_index", 0) or 0) if self.platform == "tpu" else device.process_index


def torus_shape(chips: int, two_dimensional: bool) -> tuple[int, ...]:
    """The slice shape of `chips` chips: dimensions doubled smallest first (v5e 256 -> 16x16, v5p 256 -> 4x8x8)."""
    if chips < 1 or chips & (chips - 1):
        raise ConfigError(f"a TPU slice of {chips} chips: use a power of two")
    shape = [1, 1] if two_dimensional else [1, 1, 1]
    while math.prod(shape) < chips:
        shape[shape.index(min(shape))] *= 2
    shape = sorted(shape)
    return tuple(shape[1:] + shape[:1] if shape[0] == 1 and not two_dimensional else shape)  # v5p: 2x2x1


def parse(spec: str) -> Target:
    """A Target from its name (see the module docstring); a malformed name is a one-line error."""
    usage = "use tpu:v5e-256, tpu:v5p-512, tpu:v6e-64 (x2 for two slices), gpu:h100:8, gpu:h200:4x8 or cpu:8"
    if match := re.fullmatch(r"cpu:(\d+)", spec):
        chips = int(match[1])
        return Target(
            spec, Chip("this CPU", "cpu", 0.0, host_memory() / max(chips, 1), 0, 0, 0, "measured"), "cpu", chips
        )
    if match := re.fullmatch(r"tpu:(v5e|v5p|v6e)-(\d+)(?:x(\d+))?", spec):
        kind, cores, slices = match[1], int(match[2]), int(match[3] or 1)
        if cores % TPU_CORES_PER_CHIP[kind]:
            raise ConfigError(f"--target {spec}: a {kind} slice counts {TPU_CORES_PER_CHIP[kind]} cores per chip")
        chips = cores // TPU_CORES_PER_CHIP[kind]
        torus_shape(chips, kind in TPU_2D)
        return Target(spec, CHIPS[kind], kind, chips * slices, slices)
    if match := re.fullmatch(r"gpu:(h100|h200):(?:(\d+)x)?(\d+)", spec):
        hosts, per_host = int(match[2] or 1), int(match[3])
        if not 1 <= per_host <= 8:
            raise ConfigError(f"--target {spec}: a host holds 1 to 8 GPUs (NVLink domain); write HOSTSx8")
        return Target(spec, CHIPS[match[1]], match[1], hosts * per_host, hosts)
    raise ConfigError(f"unknown --target {spec!r}: {usage}")


def local_target() -> str:
    """The target of this process's own devices: cpu:N here (a dry run on a TPU or GPU host names its target)."""
    import jax

    return f"cpu:{jax.device_count()}"


def host_memory() -> float:
    """This machine's physical memory in bytes."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def require_compiler(platform: str) -> None:
    """A one-line error naming the extra to install when the platform's compiler is missing."""
    import importlib.util

    module, extra = ("libtpu", "tpu") if platform == "tpu" else ("jax_plugins.xla_cuda12", "gpu")
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(f"no {platform.upper()} compiler installed: pip install -e '.[{extra}]' (see README)")


def cudnn_version(target: Target) -> int:
    """The cuDNN version a GPU target config declares, as cuDNN numbers it (9.7 -> 90700)."""
    text = (GPU_TARGETS / f"{target.kind}.txtpb").read_text(encoding="utf-8")
    block = re.search(r"dnn_version_info\s*{([^}]*)}", text)
    parts = dict(re.findall(r"(major|minor|patch):\s*(\d+)", block[1] if block else ""))
    return int(parts.get("major", 9)) * 10000 + int(parts.get("minor", 0)) * 100 + int(parts.get("patch", 0))


@contextlib.contextmanager
def compiling_for(target: Target):
    """The scope in which a target's program is traced and compiled. jax asks the local cuDNN library for its
    version while tracing cuDNN attention; a deviceless GPU compile has none, so the version the target
    config declares answers instead (the one place this project stands in for a jax internal)."""
    if target.platform != "gpu":
        yield
        return
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fused
    except ImportError:  # a jax without it: attention falls back to XLA's and the report says so
        yield
        return
    original = fused.check_cudnn_version
    fused.check_cudnn_version = lambda: cudnn_version(target)
    try:
        yield
    finally:
        fused.check_cudnn_version = original


def make_mesh(target: Target, axis_sizes: Mapping[str, int]) -> Mesh:
    """The config's mesh over the target's devices; over several TPU slices the data axis spans them (only
    data parallelism crosses the slow network between slices)."""
    from jax.experimental import mesh_utils

    devices = target.devices()
    if target.platform != "tpu" or target.groups == 1:
        try:
            return sharding.make_mesh(axis_sizes, devices)
        except NotImplementedError:  # a mesh axis that is no whole torus axis: let it span several
            sizes = sharding.resolve_sizes(axis_sizes, len(devices))
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
            return Mesh(grid, tuple(axis_sizes), axis_types=(AxisType.Auto,) * len(sizes))

    names, sizes = tuple(axis_sizes), sharding.resolve_sizes(axis_sizes, len(devices))
    if "data" not in names or sizes[names.index("data")] % target.groups:
        raise ConfigError(f"--target {target.spec}: mesh.data must be a multiple of its {target.groups} slices")
    across = [target.groups if name == "data" else 1 for name in names]
    within = [size // slices for size, slices in zip(sizes, across)]
    grid = mesh_utils.create_hybrid_device_mesh(within, across, devices)
    return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))


def device_groups(mesh_devices: np.ndarray, target: Target) -> np.ndarray:
    """The slice or host index of every device of a mesh, in the mesh's flat order (the program's device ids)."""
    return np.asarray([target.group_of(device) for device in mesh_devices.flat])
