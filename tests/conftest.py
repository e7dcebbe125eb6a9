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
