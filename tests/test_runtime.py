"""Process set-up before JAX starts: the allocator a process re-executes with, and our XLA:CPU flags."""

import os
import sys
from pathlib import Path

import pytest

from conftest import launch, python
from research import runtime


def test_allocator_environment_for_each_choice():
    applied, environment = runtime.APPLIED, runtime.allocator_environment
    both = {"mimalloc": "/site-packages/cmeel.prefix/lib/libmimalloc.so", "tcmalloc": "libtcmalloc_minimal.so.4"}
    auto = environment({"LD_PRELOAD": "libother.so"}, "linux", libraries=both)
    first = runtime.AUTO_ORDER[0]
    assert auto["LD_PRELOAD"] == f"{both[first]}:libother.so" and auto[applied] == first
    tcmalloc = environment({"RESEARCH_ALLOCATOR": "tcmalloc"}, "linux", libraries=both)
    assert tcmalloc["LD_PRELOAD"] == "libtcmalloc_minimal.so.4" and tcmalloc[applied] == "tcmalloc"
    only_tcmalloc = environment({}, "linux", libraries={"tcmalloc": both["tcmalloc"]})
    assert only_tcmalloc[applied] == "tcmalloc" and "MIMALLOC_PURGE_DELAY" not in only_tcmalloc
    mimalloc = environment({"RESEARCH_ALLOCATOR": "mimalloc"}, "linux", libraries=both)
    assert mimalloc[applied] == "mimalloc" and mimalloc["MIMALLOC_PURGE_DELAY"] == "-1"  # freed pages kept
    asked_purge = environment({"RESEARCH_ALLOCATOR": "mimalloc", "MIMALLOC_PURGE_DELAY": "50"}, "linux", both)
    assert asked_purge["MIMALLOC_PURGE_DELAY"] == "50"  # the user's setting wins
    assert environment({}, "linux", libraries={}) is None  # auto with neither: glibc as it is
    asked = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0:glibc.cpu.x=1", "RESEARCH_ALLOCATOR": "hugepages"}
    huge = environment(asked, "linux", libraries=both)
    assert huge["GLIBC_TUNABLES"] == "glibc.cpu.x=1:glibc.malloc.hugetlb=1" and huge[applied] == "hugepages"
    assert environment({"RESEARCH_ALLOCATOR": "system"}, "linux", libraries=both) is None
    assert environment({applied: "mimalloc"}, "linux", libraries=both) is None  # re-executed once only
    assert environment({}, "darwin", libraries={}) is None
    with pytest.raises(ValueError, match="no tcmalloc library is installed: install libtcmalloc-minimal4"):
        environment({"RESEARCH_ALLOCATOR": "tcmalloc"}, "linux", libraries={"mimalloc": both["mimalloc"]})
    with pytest.raises(ValueError, match="no mimalloc library is installed: pip install cmeel-mimalloc"):
        environment({"RESEARCH_ALLOCATOR": "mimalloc"}, "linux", libraries={})


def test_a_fresh_install_finds_mimalloc_from_its_wheel():
    library = runtime.find_mimalloc()
    if not sys.platform.startswith("linux"):  # the cmeel-mimalloc dependency is for Linux only
        assert library is None
        return
    assert library is not None and library.endswith("libmimalloc.so") and Path(library).is_file()


def test_xla_flags_add_ours_unless_set_or_unmeasured():
    ours = "--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    devices = "--xla_force_host_platform_device_count=8"
    assert runtime.xla_flags(devices, "0.10.2") == f"{devices} {ours}"
    assert runtime.xla_flags("", "0.10.0") == ours
    own = "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    assert runtime.xla_flags(own, "0.10.2") == own  # the user's setting wins
    # A jaxlib we have not measured: its XLA may not know the flag.
    assert runtime.xla_flags(devices, "0.11.0") == devices
    assert runtime.xla_flags(devices, None) == devices


_CONVOLUTION_BACKEND = """
import os
from research import runtime
runtime.configure_process()
import jax, jax.numpy as jnp
convolve = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
program = jax.jit(convolve).lower(jnp.ones((8, 14, 14, 64)), jnp.ones((3, 3, 64, 128))).compile().as_text()
lines = program.splitlines()
print(sum("__ynn_fusion" in line for line in lines), sum(" convolution(" in line for line in lines))
print(os.environ["XLA_FLAGS"])
"""
_JAXLIB = runtime.installed_jaxlib()


@pytest.mark.skipif(
    not (_JAXLIB or "").startswith(runtime.XLA_CPU_FLAGS_MEASURED_ON),
    reason=f"jaxlib {_JAXLIB} is outside XLA_CPU_FLAGS_MEASURED_ON: runtime adds no XLA flag there (as "
    "test_xla_flags_add_ours_unless_set_or_unmeasured checks), so the convolution backend is its XLA's own choice",
)
def test_configured_process_runs_convolutions_on_xla_not_ynnpack():
    """The flag does what runtime says on the installed jaxlib: the MNIST CNN's second convolution
    compiles to XLA's own convolution, and to a YNNPACK fusion when XLA_FLAGS asks for that."""
    ours = " ".join(f"--{name}={value}" for name, value in runtime.XLA_CPU_FLAGS.items())
    ynnpack = "--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    seen = {}
    for name, flags in (("ours", ""), ("ynnpack", ynnpack)):
        result = python(
            "-c", _CONVOLUTION_BACKEND, timeout=120, environment={"XLA_FLAGS": flags, "RESEARCH_ALLOCATOR": "system"}
        )
        assert result.returncode == 0, result.stderr[-1500:]
        counts, flags_in_process = result.stdout.splitlines()[-2:]
        seen[name] = (tuple(map(int, counts.split())), flags_in_process)
    # (YNNPACK fusions, convolutions: inside the fusion for YNNPACK), and the XLA_FLAGS the process compiled under:
    # runtime's flag where the user set none, so XLA's own convolution is runtime's doing, not XLA's default.
    assert seen == {"ours": ((0, 1), ours), "ynnpack": ((1, 1), ynnpack)}


def test_unknown_allocator_fails_in_one_line():
    result = launch("--list", timeout=60, RESEARCH_ALLOCATOR="jemalloc")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == "error: RESEARCH_ALLOCATOR='jemalloc' is not an allocator: use one of auto, mimalloc, tcmalloc, hugepages, "
        "system"
    )


_FAULTS_PER_CALL = """
import resource
from research import runtime
runtime.use_fast_allocator()
import jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)
x = jnp.ones((16 * 1024 * 1024,))  # a fresh 64 MiB result every call, as a train step's temporaries
for _ in range(3):  # warm-up: compilation, and the allocator's pool reaching its steady size
    jax.block_until_ready(step(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    jax.block_until_ready(step(x))
print(runtime.allocator_in_use(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.slow
def test_fast_allocator_stops_refaulting_memory_every_call():
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux")
    faults = {}
    for choice in ("system", *runtime.find_allocators()):
        environment = {key: None for key in os.environ if key.startswith("RESEARCH_ALLOCATOR")}
        result = python("-c", _FAULTS_PER_CALL, timeout=120, environment=environment | {"RESEARCH_ALLOCATOR": choice})
        assert result.returncode == 0, result.stderr
        name, count = result.stdout.split()
        faults[name] = float(count)
    assert faults["system"] > 8_000  # 64 MiB faulted back in, 4 KiB pages: 16,384 a call
    assert "mimalloc" in faults  # a dependency: every Linux install has it
    for name in set(faults) - {"system"}:
        assert faults[name] < faults["system"] / 10, faults


def test_training_never_imports_torch():
    """tensorboardX imports PyTorch when it is installed (2 s per process, and the test extra installs it);
    the logger keeps it out."""
    import torch  # noqa: F401  (installed, or this test would prove nothing)

    result = python("-c", "import sys, research.train, research.logger; print('torch' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
