"""Eight fake CPU devices, set before anything imports jax, and helpers shared by the tests."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def assert_trees_close(actual, expected, atol: float = 1e-6, rtol: float = 0.0) -> None:
    """Same tree structure and every leaf close."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """One tfds data directory for the whole session, so each builder prepares once."""
    return str(tmp_path_factory.mktemp("tensorflow_datasets"))


def train_as_launch(name: str, data_dir: str, workdir, overrides: dict) -> dict:
    """Trains experiments/NAME.py :smoke with `overrides` into `workdir` as launch.py would (the
    workdir claimed, checkpoints written synchronously); returns the final metrics."""
    from research import experiment, train

    module = experiment.load(f"experiments/{name}.py")
    config = module.get_config("smoke")
    config.data_dir = data_dir
    config.update_from_flattened_dict(overrides | {"checkpoint.asynchronous": False})
    experiment.claim_workdir(workdir, name, config)
    return train.train_and_evaluate(config, module, workdir)
