"""Pytree paths as the rest of the library names parameters: "encoder/layer_0/kernel"."""

from typing import Any, Sequence

import jax

PyTree = Any


def path_name(path: Sequence[Any]) -> str:
    """'encoder/layer_0/kernel' for a pytree key path (dict keys, attribute names and sequence indices)."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """{path name: leaf} of every leaf of `tree`."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
