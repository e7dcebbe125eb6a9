"""Eight fake CPU devices, set before anything imports jax; a compilation cache for the session; and
the fixtures and helpers shared by the tests, among them every experiment's :smoke run, trained once."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from research import runtime  # noqa: E402

runtime.import_jax_quietly()  # without the CUDA plugin's start-up lines, as launch.py imports it

import io  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS_DIR = ROOT / "experiments"

# Tests build the same programs many times (a run, its resumed half, a prediction): compiled once per
# test run, in a cache that pytest-xdist's workers share.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
_CACHE = (
    Path(tempfile.gettempdir()) / f"research_tests_jax_cache_{_RUN}"
    if _RUN
    else Path(tempfile.mkdtemp(prefix="research_tests_jax_cache_"))
)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
SHIPPED_DATASETS = (
    "optdigits",
    "mnist_subset5k",
    "tiny_shakespeare",
    "shakespeare_speakers",
    "shakespeare_acceptability",
)


def pytest_collection_modifyitems(items):
    """A test that reads the session's smoke runs (every experiment trained) is an end-to-end test: slow.
    Slow tests run first, so that pytest-xdist's workers do not end the run waiting on a long one."""
    for item in items:
        if "smoke_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def assert_trees_close(actual, expected, atol: float = 1e-6, rtol: float = 0.0) -> None:
    """Same tree structure and every leaf close."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol)


def child_environment(environment: dict | None = None) -> dict[str, str]:
    """This process's environment without the tests' XLA_FLAGS (a fresh process finds its own devices), updated by
    `environment` (None removes a variable)."""
    merged = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"} | (environment or {})
    return {key: value for key, value in merged.items() if value is not None}


def python(*args: str, timeout: float = 300, environment: dict | None = None) -> subprocess.CompletedProcess:
    """`python ARGS` from the repository's root with its output captured, in `child_environment(environment)`."""
    env = child_environment(environment)
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)


def launch(*args: str, timeout: float = 300, **environment: str) -> subprocess.CompletedProcess:
    """launch.py as a user runs it: a fresh process, output captured."""
    return python("launch.py", *args, timeout=timeout, environment=environment)


def restored_state(workdir: Path, step: int):
    """The train state a run saved at `step`, as saved (numpy leaves, no target structure)."""
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(Path(workdir) / "checkpoints") as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def read_metrics(workdir: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir: Path) -> list[float]:
    """The logged train/loss values of a run, in order."""
    return [record["train/loss"] for record in read_metrics(workdir) if "train/loss" in record]


def experiment_names() -> list[str]:
    from research import experiment

    return [name for name, _ in experiment.describe(EXPERIMENTS_DIR)]


def load_experiment(name: str):
    from research import experiment

    return experiment.load(EXPERIMENTS_DIR / f"{name}.py")


def perturbed(reference, noise: float):
    """A transformers model with seeded noise of scale `noise` on every parameter (norms away from 1, biases from
    0, experts unlike each other), in eval mode: a reference whose every weight matters."""
    import torch  # the test extra; only the Hugging Face tests ask for it

    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return reference.eval()


def mesh_losses(module, config, mesh_axes: dict, steps_count: int = 4) -> np.ndarray:
    """Per-step training losses of `config` on a mesh of `mesh_axes` over the first devices, from a fresh state."""
    from research import sharding, steps

    config.mesh.update(mesh_axes)
    mesh = sharding.make_mesh(mesh_axes, jax.devices()[: int(np.prod(list(mesh_axes.values())))])
    batches = iter(module.make_data(config, "train"))
    setup = steps.build(config, module, mesh)
    state, losses = setup.init_state(), []
    for _ in range(steps_count):
        state, metrics = setup.train_step(state, sharding.put_batch(next(batches), mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses)


def resumed_losses(module, config, directory: Path, stop_at: int) -> list[float]:
    """Trains `config` straight through and, beside it, stopped after `stop_at` steps and resumed; asserts the final
    train states bitwise equal and the logged losses the same; returns those losses."""
    from research import experiment, train

    for name in ("straight", "resumed"):
        experiment.claim_workdir(directory / name, experiment.name_of(module.__file__), config)
    train.train_and_evaluate(config, module, directory / "straight")
    train.train_and_evaluate(config, module, directory / "resumed", stop_at_step=stop_at)
    train.train_and_evaluate(config, module, directory / "resumed")
    final = config.num_steps
    assert_trees_close(restored_state(directory / "resumed", final), restored_state(directory / "straight", final), 0.0)
    losses = train_losses(directory / "resumed")
    assert losses == train_losses(directory / "straight"), losses
    return losses


def smoke_config(name: str, data_dir: str, **overrides):
    """(module, config): experiments/NAME.py's :smoke config on the session's data, with `overrides`."""
    module = load_experiment(name)
    config = module.get_config("smoke")
    config.data_dir = data_dir
    config.update_from_flattened_dict(overrides)
    return module, config


def shared_directory(tmp_path_factory, name: str) -> Path:
    """A directory that every pytest-xdist worker of this run shares (the session's own without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


def once(directory: Path, make) -> None:
    """Runs `make(directory)` unless another worker of this run has; workers wait for each other."""
    from filelock import FileLock

    with FileLock(str(directory) + ".lock"):
        if not (directory / ".done").exists():
            directory.mkdir(parents=True, exist_ok=True)
            make(directory)
            (directory / ".done").touch()


def prepare_shipped_datasets(directory: Path) -> None:
    from research.data import catalog

    for name in SHIPPED_DATASETS:
        catalog.source(name, "test" if name != "tiny_shakespeare" else "train", str(directory))


@pytest.fixture
def default_gpu_memory(monkeypatch):
    """This process's environment without the variables that change how much of a GPU JAX takes (its default:
    75 %); the monkeypatch, to set them."""
    from research.errors import MEMORY_FRACTION_VARIABLES

    for name in (*MEMORY_FRACTION_VARIABLES, "XLA_PYTHON_CLIENT_ALLOCATOR"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One tfds data directory for the whole test run, the shipped datasets prepared in it once."""
    directory = shared_directory(tmp_path_factory, "tensorflow_datasets")
    once(directory, prepare_shipped_datasets)
    return str(directory)


def train_as_launch(name: str, data_dir: str, workdir, overrides: dict) -> dict:
    """Trains experiments/NAME.py :smoke with `overrides` into `workdir` as launch.py would (the
    workdir claimed); returns the final metrics."""
    from research import experiment, train

    module, config = smoke_config(name, data_dir, **overrides)
    experiment.claim_workdir(workdir, name, config)
    return train.train_and_evaluate(config, module, workdir)


@pytest.fixture(scope="session")
def smoke_runs(data_dir, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """{experiment: (workdir, final metrics)} of every experiment's :smoke config, trained once per
    test run as launch.py would, into ROOT/NAME_smoke: the layout --reproduce reads."""
    from filelock import FileLock

    root = shared_directory(tmp_path_factory, "smoke_runs")
    root.mkdir(parents=True, exist_ok=True)
    names = experiment_names()
    # Two workers take the list from opposite ends and meet in the middle, each waiting only for
    # the run the other is training.
    for name in reversed(names) if int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]) % 2 else names:
        with FileLock(str(root / f"{name}.lock")):
            if not (root / f"{name}_smoke" / "results.json").exists():
                train_as_launch(name, data_dir, root / f"{name}_smoke", {})
    final = lambda workdir: {
        key: value
        for key, value in json.loads((workdir / "results.json").read_text()).items()
        if key not in ("step", "stopped_early")
    }
    return {name: (root / f"{name}_smoke", final(root / f"{name}_smoke")) for name in names}


def write_cifar_archive(path, sizes: dict[str, int], seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny CIFAR-10 archive in the official binary layout; returns the images (NxHxWxC) and labels per member."""
    from research.data import cifar10

    rng = np.random.default_rng(seed)
    written = {}
    with tarfile.open(path, "w:gz") as archive:
        for member, size in sizes.items():
            planes = rng.integers(0, 256, size=(size, 3, 32, 32), dtype=np.uint8)
            labels = rng.integers(0, 10, size=size, dtype=np.uint8)
            data = np.concatenate([labels[:, None], planes.reshape(size, -1)], axis=1).tobytes()
            info = tarfile.TarInfo(cifar10.PREFIX + member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
            written[member] = (planes.transpose(0, 2, 3, 1), labels.astype(np.int64))
    return written
