"""Where a GPT step's CPU time goes: every matmul of its gradient timed alone, XLA:CPU against PyTorch,
and the step's own CPU-seconds: the bound on how far a better schedule could take it.

  python benchmarks/dot_shapes.py                      # gpt_large, ~2 minutes on 2 cores; needs torch (`bench`)
  python benchmarks/dot_shapes.py --model=gpt_small

Rows: each distinct `dot_general` of the training gradient's jaxpr (the model of train_speed.py, its
forward and backward, custom VJPs included) with how often the step runs it, timed alone as
`jit(lax.dot_general)` and as `torch.einsum` of the same contraction (medians of 5 x `--calls` calls),
and the cores XLA keeps busy meanwhile (CPU-seconds over wall seconds). Then the step: the minimal JAX
loop and PyTorch eager timed interleaved by train_speed.py, and JAX's CPU-seconds per step. `with no
idle core` is PyTorch's step time over JAX's CPU-seconds spread over every core: the speed-up over
PyTorch a JAX step with no idle core would reach on these kernels (run it on an idle machine: another
job's load reads as idle cores). Expected on the 2-core VM: dense products 160-215 GFLOP/s, the
attention's batched ones 55-90 on one core; with no idle core ~1.0x on gpt_large, 1.1-1.3x on
gpt_small (docs/performance.md, 2026-12-01).
"""

import argparse
import collections
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from jax import lax  # noqa: E402
from jax.extend.core import jaxprs_in_params  # noqa: E402

from benchmarks import train_speed  # noqa: E402
from benchmarks.timing import timed  # noqa: E402


def gradient_dots(name: str) -> collections.Counter:
    """(lhs shape, rhs shape, dimension numbers) -> how many times the model's gradient computes it."""
    model = train_speed.MODELS[name]
    config = train_speed.config_of(model)
    batch = train_speed.host_batches(model, config)[0]
    network = model.experiment.make_model(config)
    params = network.init(jax.random.PRNGKey(0), batch["inputs"])["params"]

    def loss(params):
        logits = network.apply({"params": params}, batch["inputs"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    dots = collections.Counter()

    def walk(jaxpr):
        for equation in jaxpr.eqns:
            if equation.primitive.name == "dot_general":
                lhs, rhs = (variable.aval.shape for variable in equation.invars)
                dots[(lhs, rhs, equation.params["dimension_numbers"])] += 1
            for inner in jaxprs_in_params(equation.params):
                walk(inner)

    walk(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    return dots


def einsum_spec(lhs_rank: int, rhs_rank: int, dimension_numbers) -> str:
    """The torch.einsum of a dot_general: batch axes, then the lhs's free axes, then the rhs's."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    lhs = [chr(ord("a") + axis) for axis in range(lhs_rank)]
    rhs = [chr(ord("n") + axis) for axis in range(rhs_rank)]
    for lhs_axis, rhs_axis in zip((*lhs_contract, *lhs_batch), (*rhs_contract, *rhs_batch)):
        rhs[rhs_axis] = lhs[lhs_axis]
    free_lhs = [letter for axis, letter in enumerate(lhs) if axis not in (*lhs_contract, *lhs_batch)]
    free_rhs = [letter for axis, letter in enumerate(rhs) if axis not in (*rhs_contract, *rhs_batch)]
    output = [lhs[axis] for axis in lhs_batch] + free_lhs + free_rhs
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(output)}"


def dot_rows(dots: collections.Counter, calls: int) -> list[dict]:
    rng, rows = np.random.default_rng(0), []
    for (lhs_shape, rhs_shape, numbers), count in sorted(dots.items(), key=lambda item: -math.prod(item[0][0])):
        lhs, rhs = (rng.standard_normal(shape, dtype=np.float32) for shape in (lhs_shape, rhs_shape))
        xla = jax.jit(lambda a, b, numbers=numbers: lax.dot_general(a, b, numbers))
        on_device = jax.device_put(lhs), jax.device_put(rhs)
        spec = einsum_spec(len(lhs_shape), len(rhs_shape), numbers)
        lhs_torch, rhs_torch = torch.from_numpy(lhs), torch.from_numpy(rhs)
        result = np.asarray(xla(*on_device))
        np.testing.assert_allclose(torch.einsum(spec, lhs_torch, rhs_torch).numpy(), result, rtol=1e-3, atol=1e-2)
        contracted = math.prod(lhs_shape[axis] for axis in numbers[0][0])
        flops = 2 * result.size * contracted
        xla_seconds, busy = timed(lambda: xla(*on_device).block_until_ready(), calls)
        torch_seconds, _ = timed(lambda: torch.einsum(spec, lhs_torch, rhs_torch), calls)
        rows.append(dict(count=count, lhs=lhs_shape, rhs=rhs_shape, spec=spec, flops=flops, xla=xla_seconds,
                         busy=busy, torch=torch_seconds))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_large", choices=("gpt_small", "gpt_large"))
    parser.add_argument("--calls", type=int, default=5, help="calls per timed repeat of each dot")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repeat of the whole step")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs, allocator {runtime.allocator_in_use()}, load average {os.getloadavg()}")  # fmt: skip
    rows = dot_rows(gradient_dots(args.model), args.calls)
    print("| count | lhs | rhs | einsum | GFLOP | XLA GFLOP/s | XLA cores busy | PyTorch GFLOP/s |")
    print("| ---: | --- | --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        xla_rate, torch_rate = row["flops"] / row["xla"] / 1e9, row["flops"] / row["torch"] / 1e9
        shapes = f"{row['count']} | {row['lhs']} | {row['rhs']} | `{row['spec']}` | {row['flops'] / 1e9:.3f}"
        print(f"| {shapes} | {xla_rate:.0f} | {row['busy']:.2f} | {torch_rate:.0f} |")
    total = sum(row["count"] * row["flops"] for row in rows)
    xla_seconds = sum(row["count"] * row["xla"] for row in rows)
    xla_cpu = sum(row["count"] * row["xla"] * row["busy"] for row in rows)
    torch_seconds = sum(row["count"] * row["torch"] for row in rows)
    print(
        f"{args.model}: {total / 1e9:.1f} GFLOP of dots per step; alone, XLA {xla_seconds * 1e3:,.0f} ms "
        f"({xla_cpu:.2f} CPU-s), PyTorch {torch_seconds * 1e3:,.0f} ms"
    )
    timed_steps = train_speed.benchmark_model(args.model, ["jax", "torch"], args.steps, 5, float("nan"))
    step = {row["impl"]: row for row in timed_steps}
    jax_ms, torch_ms, jax_cpu = step["jax"]["step_ms"], step["torch"]["step_ms"], step["jax"]["cpu_s"]
    cores = os.cpu_count()
    busy, bound = jax_cpu / (jax_ms / 1e3), torch_ms / 1e3 / (jax_cpu / cores)
    print(
        f"step: minimal JAX loop {jax_ms:,.0f} ms ({jax_cpu:.2f} CPU-s, {busy:.2f} of {cores} cores busy), "
        f"PyTorch eager {torch_ms:,.0f} ms; x PyTorch now {torch_ms / jax_ms:.2f}, with no idle core {bound:.2f}"
    )


if __name__ == "__main__":
    main()
