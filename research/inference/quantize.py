"""Post-training int8 weight quantization: every Dense and Conv kernel becomes int8 values and one
float32 scale per output channel (symmetric, round to nearest; the "per-channel" weight-only
scheme of Jacob et al. 2018 and Krishnamoorthi 2018). Biases, norms and embeddings stay float.

The quantized tree keeps the parameter tree's structure with each kernel replaced by a
`QuantizedKernel`; `dequantize` gives float parameters back for `model.apply`, so any model runs
quantized unchanged, and an exported artifact stores only the int8 values and scales.
A Conv kernel (H x W x Cin x Cout) gets one scale per output channel like a Dense kernel
(Din x Dout): the reduction is over every axis but the last.

  python predict.py --workdir runs/mnist_cnn_cpu --evaluate test --quantize
Expected on mnist_cnn `:cpu`: 4.00x smaller kernels, test accuracy unchanged (docs/results.md).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from research.tree import path_name

PyTree = Any
INT8_MAX = 127


@flax.struct.dataclass
class QuantizedKernel:
    """kernel ~= values * scale; `scale` has the kernel's rank with size 1 except on the output axis (last)."""

    values: jax.Array  # int8
    scale: jax.Array  # float32


def _is_kernel(path, leaf) -> bool:
    return path_name(path).endswith("kernel") and np.ndim(leaf) >= 2


def quantize_kernel(kernel: jax.Array) -> QuantizedKernel:
    """int8 values with the largest magnitude of each output channel mapped to 127."""
    kernel = jnp.asarray(kernel, jnp.float32)
    largest = jnp.max(jnp.abs(kernel), axis=tuple(range(kernel.ndim - 1)), keepdims=True)
    scale = jnp.where(largest > 0, largest / INT8_MAX, 1.0)  # an all-zero channel stays exactly zero
    values = jnp.clip(jnp.round(kernel / scale), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return QuantizedKernel(values=values, scale=scale.astype(jnp.float32))


def quantize(params: PyTree) -> PyTree:
    """The parameters with every Dense/Conv kernel (a `kernel` of rank >= 2) quantized."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: quantize_kernel(leaf) if _is_kernel(path, leaf) else leaf, params
    )


def _is_quantized(node) -> bool:
    return isinstance(node, QuantizedKernel)


def dequantize(tree: PyTree, dtype=jnp.float32) -> PyTree:
    """Float parameters from a quantized tree (other leaves pass through)."""
    restore = lambda node: (node.values.astype(dtype) * node.scale).astype(dtype) if _is_quantized(node) else node
    return jax.tree.map(restore, tree, is_leaf=_is_quantized)


def kernel_bytes(tree: PyTree) -> int:
    """Bytes held by the kernels (int8 values plus scales once quantized)."""
    total = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_quantized):
        if _is_quantized(leaf):
            total += leaf.values.nbytes + leaf.scale.nbytes
        elif _is_kernel(path, leaf):
            total += np.asarray(leaf).nbytes
    return total


def total_bytes(tree: PyTree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def report(run, split: str) -> dict[str, Any]:
    """Sizes and the split's metrics before and after quantizing a `research.inference.predict.Run`."""
    from research.inference import predict  # predict imports the models and data; quantizing needs neither

    quantized = quantize(run.params)
    before = predict.evaluate(run, split)
    after = predict.evaluate(run.with_params(dequantize(quantized)), split)
    scalar = lambda results: {name: value for name, value in results.items() if np.isscalar(value)}
    return {
        "split": split,
        "kernel_bytes": (kernel_bytes(run.params), kernel_bytes(quantized)),
        "total_bytes": (total_bytes(run.params), total_bytes(quantized)),
        "metrics": {name: (value, scalar(after)[name]) for name, value in scalar(before).items()},
    }


def format_report(result: dict[str, Any]) -> str:
    """A table: sizes, then each metric float32 vs int8."""
    kernels, total = result["kernel_bytes"], result["total_bytes"]
    lines = [
        f"{'':20s} {'float32':>10s} {'int8':>10s}",
        f"{'kernel bytes':20s} {kernels[0]:>10d} {kernels[1]:>10d}   ({kernels[0] / kernels[1]:.2f}x smaller)",
        f"{'all parameter bytes':20s} {total[0]:>10d} {total[1]:>10d}   ({total[0] / total[1]:.2f}x smaller)",
    ]
    lines += [
        f"{result['split'] + '/' + name:20s} {old:>10.4f} {new:>10.4f}"
        for name, (old, new) in sorted(result["metrics"].items())
    ]
    return "\n".join(lines)
