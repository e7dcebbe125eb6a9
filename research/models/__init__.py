"""Model families, one file each; every model is a Flax Linen module used through init/apply."""

from typing import Any

import jax
import numpy as np


def param_count(params: Any) -> int:
    """Number of scalars in a parameter tree (works on arrays and on jax.eval_shape's ShapeDtypeStructs)."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(params)))
