"""The wheels a lent accelerator machine needs to run benchmarks/accelerator.py: the project's dependencies
(with theirs, for its Python) that the machine's image lacks, at the versions installed here.

  python benchmarks/device_wheels.py --dest .whl     # here, with the registry: 17 wheels, 16 MB, ~10 s

The lent H200 machine has no network and its own Python 3.12 with jax 0.11.2 (CUDA 13), flax, optax, orbax and
PyTorch (IMAGE: its package list as read on 2026-11-17), but not ml-collections, grain, tensorflow-datasets and
a few more. Carried to it, they install beside its packages (never over them: a second numpy or jax would
shadow the ones its CUDA plugin was built with); docs/performance.md gives the one command that installs them
and runs the check. The host allocator (cmeel-mimalloc) stays behind: it only matters to XLA:CPU's steps.
`--list` prints the missing distributions without downloading.
"""

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# The device image's Python packages (canonical names), as the machine listed them on 2026-11-17.
IMAGE = set(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
    multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
    nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
    nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
    opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
    patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
    py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
    pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
    safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
    torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
    typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
    zipp""".split()
)
LEFT_BEHIND = {"cmeel-mimalloc", "cmeel"}  # the host allocator (research/runtime.py): XLA:CPU's, not a GPU's
DEVICE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
DEVICE |= {"platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
PLATFORMS += ["manylinux_2_24_x86_64", "manylinux1_x86_64"]


def needed(root: str = "research") -> dict[str, str]:
    """{distribution: version installed here} of `root`'s runtime dependencies, with theirs, that the device's
    Python needs (markers evaluated for it) and its image lacks."""
    found, queue = {}, [root]
    while queue:
        name = queue.pop()
        for line in importlib.metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker and not requirement.marker.evaluate(DEVICE):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency in found or dependency in IMAGE or dependency in LEFT_BEHIND:
                continue
            try:
                found[dependency] = importlib.metadata.version(dependency)
            except importlib.metadata.PackageNotFoundError:  # needed on the device's Python only: not here
                raise SystemExit(f"device_wheels.py: {dependency} (for {name}) is not installed here: pip install it")
            queue.append(dependency)
    return dict(sorted(found.items()))


def download(wheels: dict[str, str], dest: str) -> None:
    """Each wheel for the device's CPython 3.12 on x86-64 Linux, without its dependencies (`needed` has them);
    a pure-Python package published only as source (promise) is built into a wheel here."""
    platforms = [argument for platform in PLATFORMS for argument in ("--platform", platform)]
    pip = [sys.executable, "-m", "pip", "-q"]
    for name, version in wheels.items():
        binary = ["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"]
        if subprocess.run(pip + binary + platforms + ["--dest", dest, f"{name}=={version}"]).returncode == 0:
            continue
        before = set(Path(dest).glob("*.whl"))
        built = subprocess.run(pip + ["wheel", "--no-deps", "--wheel-dir", dest, f"{name}=={version}"]).returncode
        new = set(Path(dest).glob("*.whl")) - before
        if built or not all(wheel.name.endswith("-none-any.whl") for wheel in new):
            raise SystemExit(f"device_wheels.py: no wheel of {name}=={version} for CPython 3.12 on x86-64 Linux")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=".whl", help="the folder the wheels go to (git-ignored, carried)")
    parser.add_argument("--list", action="store_true", help="print what is missing; download nothing")
    arguments = parser.parse_args(argv)
    wheels = needed()
    print(" ".join(f"{name}=={version}" for name, version in wheels.items()))
    if not arguments.list:
        download(wheels, arguments.dest)


if __name__ == "__main__":
    main()
