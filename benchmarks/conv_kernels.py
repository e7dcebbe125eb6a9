"""Where the CNNs' time goes: one convolution's forward, input gradient and weight gradient,
XLA:CPU (through JAX) against PyTorch (oneDNN), on the shapes of ResNet-20 and the MNIST CNN.

  python benchmarks/conv_kernels.py              # ~1 minute on 2 cores; needs torch (the `bench` extra)
  python benchmarks/conv_kernels.py --batch=64

Each row is one 3x3 'SAME' convolution, stride 1, float32, timed alone (best of 3 repeats of 10
calls, after a warm-up). JAX's convolutions run on the kernels launch.py trains with: XLA's own
(research/runtime.py takes them away from YNNPACK); to time YNNPACK's instead, run with
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
JAX runs NHWC (Flax's layout) with HWIO kernels; PyTorch runs NCHW, its
default, and the forward also channels-last. `dw via matmuls` is the weight gradient written as
nine shifted (B*H*W x C)^T (B*H*W x O) matmuls, the formulation a custom VJP could use instead
of XLA's. Findings are in benchmarks/README.md.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from jax import lax  # noqa: E402

SHAPES = (  # (height = width, input channels, output channels, where)
    (32, 16, 16, "ResNet-20 stage 1"),
    (16, 32, 32, "ResNet-20 stage 2"),
    (8, 64, 64, "ResNet-20 stage 3"),
    (14, 64, 128, "MNIST CNN conv 2"),
)


def best_milliseconds(
    call: Callable[[], object], sync: Callable[[object], object], calls: int = 10, repeats: int = 3
) -> float:
    """The fastest of `repeats` runs of `calls` calls, per call, after one warm-up call."""
    sync(call())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            out = call()
        sync(out)
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def conv_NHWC(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def weight_grad_by_matmuls(x_BxHxWxC, dy_BxHxWxO):
    """dL/dw of a 3x3 'SAME' convolution as nine shifted matmuls over every position."""
    B, H, W, C = x_BxHxWxC.shape
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy = dy_BxHxWxO.reshape(B * H * W, -1)
    return jnp.stack(
        [jnp.stack([padded[:, i : i + H, j : j + W].reshape(B * H * W, C).T @ dy for j in range(3)]) for i in range(3)]
    )


def jax_row(batch: int, size: int, cin: int, cout: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, cin, cout)) * 0.1, jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, size, size, cout)), jnp.float32)
    forward = jax.jit(conv_NHWC)
    input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv_NHWC(x, w), x)[1](dy)[0])
    weight_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv_NHWC(x, w), w)[1](dy)[0])
    by_matmuls = jax.jit(weight_grad_by_matmuls)
    np.testing.assert_allclose(by_matmuls(x, dy), weight_grad(x, w, dy), rtol=1e-4, atol=1e-2)
    sync = jax.block_until_ready
    return {
        "fwd": best_milliseconds(lambda: forward(x, w), sync),
        "dx": best_milliseconds(lambda: input_grad(x, w, dy), sync),
        "dw": best_milliseconds(lambda: weight_grad(x, w, dy), sync),
        "dw_matmuls": best_milliseconds(lambda: by_matmuls(x, dy), sync),
    }


def torch_row(batch: int, size: int, cin: int, cout: int) -> dict[str, float]:
    x, dy = torch.randn(batch, cin, size, size), torch.randn(batch, cout, size, size)
    w = torch.randn(cout, cin, 3, 3)
    x_last = x.contiguous(memory_format=torch.channels_last)
    conv = torch.nn.functional.conv2d
    return {
        "fwd": best_milliseconds(lambda: conv(x, w, padding=1), lambda out: out),
        "fwd_last": best_milliseconds(lambda: conv(x_last, w, padding=1), lambda out: out),
        "dx": best_milliseconds(lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1), lambda out: out),
        "dw": best_milliseconds(lambda: torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=1), lambda out: out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    print(
        f"batch {args.batch}, float32, {torch.get_num_threads()} PyTorch threads; "
        "milliseconds per call (best of 3 x 10)"
    )
    print(
        "| convolution | where | fwd JAX | fwd torch (NCHW / NHWC) | dx JAX | dx torch | dw JAX | dw torch "
        "| dw via matmuls (JAX) | fwd+dx+dw JAX / torch |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size, cin, cout, where in SHAPES:
        ours, theirs = jax_row(args.batch, size, cin, cout), torch_row(args.batch, size, cin, cout)
        total = (ours["fwd"] + ours["dx"] + ours["dw"]) / (
            min(theirs["fwd"], theirs["fwd_last"]) + theirs["dx"] + theirs["dw"]
        )
        print(
            f"| {size}x{size}x{cin} -> {cout} | {where} | {ours['fwd']:.1f} "
            f"| {theirs['fwd']:.1f} / {theirs['fwd_last']:.1f} | {ours['dx']:.1f} | {theirs['dx']:.1f} "
            f"| {ours['dw']:.1f} | {theirs['dw']:.1f} | {ours['dw_matmuls']:.1f} | {total:.2f}x |"
        )


if __name__ == "__main__":
    main()
