"""A dry run: lower and compile the train step for the configured mesh without running it.

  python launch.py --config experiments/digits_mlp.py --workdir runs/dry --dry_run --dry_run_devices=8 \
      --config.mesh.fsdp=2

Reports the parameter count, per-device memory from XLA's compiled memory analysis, FLOPs per
step from XLA's cost analysis beside the analytic 6·N·T (Kaplan et al. 2020: forward 2·N·T,
backward 4·N·T; exact for the matrix multiplies of a transformer, which dominate), and the step
time an accelerator would need at a given MFU.
"""

import dataclasses

import jax
import ml_collections
import numpy as np

from research import perf, sharding
from research.steps import build

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (without sparsity).
PEAK_TFLOPS = {
    "h100": 989.0,  # H100 SXM
    "h200": 989.0,
    "a100": 312.0,
    "v100": 125.0,  # fp16 tensor cores
    "l4": 121.0,
    "tpu-v4": 275.0,
    "tpu-v5e": 197.0,
    "tpu-v5p": 459.0,
    "tpu-v6e": 918.0,
}


@dataclasses.dataclass
class DryRun:
    devices: int
    parameters: int
    tokens_per_step: int
    memory_bytes: dict[str, int]  # per device
    xla_flops: float  # per step, all devices
    analytic_flops: float

    def step_seconds(self, peak_tflops: float, mfu: float) -> float:
        """Step time on `devices` chips of `peak_tflops` each, running at model FLOPs utilisation `mfu`."""
        return self.analytic_flops / (self.devices * peak_tflops * 1e12 * mfu)


def tokens_in(batch: dict[str, np.ndarray]) -> int:
    """Tokens a step trains on: batch x length for integer token inputs, else one per example."""
    inputs = np.asarray(batch["inputs"])
    return int(inputs.size) if np.issubdtype(inputs.dtype, np.integer) and inputs.ndim >= 2 else int(inputs.shape[0])


def dry_run(config: ml_collections.ConfigDict, experiment, mesh=None) -> DryRun:
    """Compiles (but never runs) the train step of `experiment` under `config` on `mesh`, from abstract arrays."""
    host_batch = next(iter(experiment.make_data(config, "train")))
    abstract_batch = {
        key: jax.ShapeDtypeStruct(np.shape(value), np.asarray(value).dtype) for key, value in host_batch.items()
    }
    setup = build(config, experiment, mesh, batch=abstract_batch)
    compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
    memory = compiled.memory_analysis()
    parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(setup.abstract_state.params))
    tokens = tokens_in(host_batch)
    return DryRun(
        devices=setup.mesh.size,
        parameters=parameters,
        tokens_per_step=tokens,
        memory_bytes={
            "arguments (state + batch)": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes,
            "temporaries (activations)": memory.temp_size_in_bytes,
            "aliased (donated)": memory.alias_size_in_bytes,
        },
        xla_flops=perf.xla_flops(compiled) * setup.mesh.size,  # the SPMD program's count is per device
        analytic_flops=6.0 * parameters * tokens,
    )


def main(config: ml_collections.ConfigDict, experiment, mfu: float, peak_tflops: float = 0.0) -> None:
    """launch.py --dry_run: compile for the config's mesh and print the report."""
    mesh = sharding.make_mesh(config.mesh)
    accelerators = dict(PEAK_TFLOPS) | ({"custom": peak_tflops} if peak_tflops else {})
    print(format_report(dry_run(config, experiment, mesh), dict(mesh.shape), mfu, accelerators))


def format_report(
    result: DryRun, mesh_shape: dict[str, int], mfu: float, accelerators: dict[str, float] = PEAK_TFLOPS
) -> str:
    """The dry run as a few lines and a table of step times per accelerator."""
    lines = [
        f"mesh {mesh_shape} on {result.devices} devices; {result.parameters:,} parameters; "
        f"{result.tokens_per_step:,} tokens per step",
        "per-device memory: "
        + ", ".join(f"{name} {size / 2**20:,.1f} MiB" for name, size in result.memory_bytes.items()),
        f"FLOPs per step: XLA {result.xla_flops:.4g}, analytic 6·N·T {result.analytic_flops:.4g} "
        f"(ratio {result.xla_flops / max(result.analytic_flops, 1):.3f})",
        f"{'accelerator':12s} {'peak TFLOP/s':>13s} {'step (ms) at MFU ' + format(mfu, '.0%'):>22s}",
    ]
    for name, peak in accelerators.items():
        lines.append(f"{name:12s} {peak:13.0f} {result.step_seconds(peak, mfu) * 1e3:22.4g}")
    return "\n".join(lines)
