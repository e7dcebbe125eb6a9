"""The accelerator check: one command for a lent GPU or TPU (well under 10 minutes with compilation).

  python benchmarks/accelerator.py --output accelerator.json        # on the accelerator
  python benchmarks/accelerator.py --tiny --output /tmp/tiny.json   # CPU, tiny shapes: what the test runs
  python benchmarks/accelerator.py --target gpu:h200:1               # here, no GPU: do the rows fit? (exit 1 if not)

Rows: a Llama-style LM at GPT-2 124M's shape and Llama 3.2 1B (bfloat16 compute, the backend's fused
attention: cuDNN on GPUs, splash on TPUs), trained by the trainer's own jitted step (research.steps.build)
on synthetic tokens; ResNet-50 (He et al. 2016, ImageNet shape 224x224, bfloat16) on synthetic images.
Each: step time (median of the timed steps, after compilation and warm-up), tokens or images per second,
MFU against the chip's dense bf16 peak (research/tools/targets.py; a CPU's measured float32 matmul peak),
the device's peak memory where it reports one, and the dry run's figures for the same program (compiled
once): its memory by XLA's analysis, the analytic count, and the tokens/s its roofline predicts at 40 %
MFU. One table printed, the rows as JSON. Each row runs in a process of its own, printed and saved when it
ends: a row that fails or passes `--row_timeout` is a 'failed' line (exit status 1), the others are kept.
`--target` compiles the rows for that chip and runs nothing: each program's memory against what JAX lets it use
(XLA_PYTHON_CLIENT_MEM_FRACTION of a GPU, 0.75 by default) and its attention kernel. On a lent device: the command
in docs/performance.md (benchmarks/accelerator_on_device.sh); record the table there with date and machine.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import cifar10_resnet, lm  # noqa: E402
from research import perf, sharding  # noqa: E402
from research.errors import ConfigError  # noqa: E402
from research.models import param_count  # noqa: E402
from research.models.resnet import ImageNetResNet  # noqa: E402
from research.steps import build  # noqa: E402
from research.tools import dry_run, targets  # noqa: E402

LLAMA_124M = dict(num_layers=12, width=768, num_heads=12, num_kv_heads=12, mlp_dim=2048, vocab_size=50304)
# (name, lm.py size, model overrides, batch) at full size, and the tiny ones the test runs on a CPU. The 1B trains
# on 2,048-token windows: at its 8,192 (lm.py) batch 8 needs 191 GiB of an H200's 141 (`--target gpu:h200`).
LMS = {
    False: [
        ("llama 124M", "cpu", LLAMA_124M | {"block_size": 1024}, 32),
        ("llama 3.2 1B", "llama-3.2-1b", {"block_size": 2048}, 8),
    ],
    True: [("llama tiny", "smoke", {"vocab_size": 256, "block_size": 64}, 4)],
}
LM_COMMON = dict(family="llama", dtype="bfloat16", param_dtype="float32", attention="auto", remat="none")
RESNET = {False: (ImageNetResNet(dtype=np.dtype("bfloat16")), 128, 224), True: (ImageNetResNet((1, 1, 1, 1)), 4, 64)}


def chip() -> tuple[str, float]:
    """(device, peak FLOP/s per device) for this process's first device."""
    device = jax.devices()[0]
    kind = device.device_kind.lower().replace(" ", "")
    for name, figures in targets.CHIPS.items():
        if name in kind:
            return device.device_kind, figures.peak_tflops * 1e12
    return f"{device.platform} ({device.device_kind})", perf.measure_peak_flops()


def timed(setup, batch, steps: int) -> dict:
    """The trainer's step compiled once (AOT, so its memory and cost analyses are this very program) and timed:
    median step seconds, compile seconds, and the compiled program."""
    start = time.perf_counter()
    compiled = setup.train_step.lower(setup.abstract_state, setup.batch_spec).compile()
    compile_seconds = time.perf_counter() - start
    state, batch = setup.init_state(jax.random.PRNGKey(0)), sharding.put_batch(batch, setup.mesh)
    for _ in range(3):  # warm-up: first-touch allocations, autotuning
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "compile_seconds": compile_seconds, "compiled": compiled}


def peak_memory() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def estimate(config, experiment, setup, compiled, peak: float) -> dict:
    """What the dry run (research/tools/dry_run.py) says of this program on this device: the compiled memory,
    the analytic count, and the tokens/s of its roofline at 40 % MFU of `peak` (one device: no collectives)."""
    parameters = param_count(setup.abstract_state.params)
    tokens = dry_run.tokens_in(setup.batch_spec)
    recompute = dry_run.recompute_of(config, experiment)
    seconds = dry_run.model_flops(config, experiment, parameters, tokens) * recompute / (0.4 * peak)
    return {
        "dry_run_memory_gib": dry_run.compiled_bytes(compiled)["total"] / 2**30,
        "analytic_memory_gib": sum(dry_run.analytic_memory(config, experiment, setup).values()) / 2**30,
        "dry_run_tokens_per_second": tokens / seconds,
    }


def lm_case(name: str, size: str, overrides: dict, batch_size: int) -> tuple:
    """(config, experiment, a synthetic batch, the row's first columns) of one LM row."""
    config = lm.get_config(size)
    config.model.update(LM_COMMON | overrides)
    config.update_from_flattened_dict({"batch_size": batch_size, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1})
    length = config.model.block_size
    tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (batch_size, length + 1), np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": np.ones(batch_size, np.float32)}
    return config, lm, batch, dict(model=name, batch=f"{batch_size}x{length}")


def resnet_case(tiny: bool) -> tuple:
    """(config, experiment, a synthetic batch, the row's first columns) of the ResNet-50 row."""
    model, batch_size, size = RESNET[tiny]
    experiment = types.SimpleNamespace(**vars(cifar10_resnet))
    experiment.make_model = lambda config: model
    config = cifar10_resnet.get_config("smoke")
    config.update_from_flattened_dict({"batch_size": batch_size, "mesh.data": 1, "optimizer.name": "momentum"})
    rng = np.random.default_rng(0)
    batch = {
        "inputs": rng.normal(size=(batch_size, size, size, 3)).astype(np.float32),
        "labels": rng.integers(0, 1000, batch_size).astype(np.int32),
        "mask": np.ones(batch_size, np.float32),
    }
    return config, experiment, batch, dict(model=resnet_name(tiny), batch=f"{batch_size}x{size}x{size}")


def resnet_name(tiny: bool) -> str:
    return f"resnet-50{' (1 block per stage)' if tiny else ''}"


def one_device(devices=None):
    return sharding.make_mesh({"data": 1}, (devices or jax.devices())[:1])


def lm_row(model: tuple, peak: float, steps: int) -> dict:
    config, experiment, batch, row = lm_case(*model)
    setup = build(config, experiment, one_device(), batch=batch)
    run = timed(setup, batch, steps)
    batch_size, length = batch["inputs"].shape
    seconds, flops = run["seconds"], lm.flops_per_example(config) * batch_size
    row |= dict(step_seconds=seconds, compile_seconds=run["compile_seconds"])
    row |= dict(throughput=batch_size * length / seconds, unit="tokens/s", mfu=flops / seconds / peak)
    row |= dict(parameters=param_count(setup.abstract_state.params), peak_memory_gib=_gib(peak_memory()))
    return row | estimate(config, experiment, setup, run["compiled"], peak)


def resnet_row(tiny: bool, peak: float, steps: int) -> dict:
    """FLOPs by XLA's cost analysis of the step lowered for the CPU: a GPU's compiled program hands convolutions
    to cuDNN, whose custom calls its analysis counts as none."""
    config, experiment, batch, row = resnet_case(tiny)
    run = timed(build(config, experiment, one_device(), batch=batch), batch, steps)
    on_cpu = build(config, experiment, one_device(jax.devices("cpu")), batch=batch)
    seconds, flops = run["seconds"], perf.xla_flops(on_cpu.train_step.lower(on_cpu.abstract_state, on_cpu.batch_spec))
    row |= dict(step_seconds=seconds, compile_seconds=run["compile_seconds"], throughput=len(batch["labels"]) / seconds)
    return row | dict(unit="images/s", mfu=flops / seconds / peak, peak_memory_gib=_gib(peak_memory()))


def fits_on(target: targets.Target, tiny: bool) -> list[dict]:
    """Every row's step compiled for one device of `target` by the dry run (nothing run): its memory against
    `Target.pool_bytes`, and its attention kernel."""
    rows = []
    for config, experiment, batch, row in [lm_case(*model) for model in LMS[tiny]] + [resnet_case(tiny)]:
        result = dry_run.dry_run(config, experiment, target, batch=batch)
        attention = result.attention or ("XLA's" if experiment is lm else "-")
        memory = dict(compile_seconds=result.compile_seconds, memory_gib=result.needed_bytes / 2**30)
        rows.append(row | memory | dict(fits=result.fits_pool, attention=attention))
    return rows


def format_fits(rows: list[dict], target: targets.Target) -> str:
    usable = target.pool_bytes() / 2**30
    lines = [f"accelerator check compiled for {target.spec} ({target.chip.name}, {usable:.1f} GiB usable), nothing run"]
    lines.append(f"{'model':22s} {'batch':>12s} {'memory GiB':>11s} {'fits':>5s}  attention")
    for row in rows:
        fits = "yes" if row["fits"] else "NO"
        lines.append(f"{row['model']:22s} {row['batch']:>12s} {row['memory_gib']:11.2f} {fits:>5s}  {row['attention']}")
    return "\n".join(lines)


def _gib(value: float | None) -> float:
    return float("nan") if value is None else value / 2**30


def row_names(tiny: bool) -> list[str]:
    return [model[0] for model in LMS[tiny]] + [resnet_name(tiny)]


def run_row(index: int, tiny: bool, steps: int) -> dict:
    """Row `index` of the check, measured in this process (a child of `main`'s, so its peak memory is its own)."""
    device, peak = chip()
    models = LMS[tiny]
    row = lm_row(models[index], peak, steps) if index < len(models) else resnet_row(tiny, peak, steps)
    return row | dict(device=device)


def format_header(device: str) -> list[str]:
    return [
        f"accelerator check on {device}, jax {jax.__version__}, {time.strftime('%Y-%m-%d')}",
        f"{'model':22s} {'batch':>12s} {'step ms':>9s} {'throughput':>22s} {'MFU':>6s} {'peak GiB':>9s} "
        f"{'dry-run GiB':>11s} {'dry-run tok/s @40%':>19s}",
    ]


def format_row(row: dict) -> str:
    if "error" in row:
        return f"{row['model']:22s} failed: {row['error']}"
    estimate_memory = row.get("dry_run_memory_gib", float("nan"))
    predicted = row.get("dry_run_tokens_per_second", float("nan"))
    return (
        f"{row['model']:22s} {row['batch']:>12s} {row['step_seconds'] * 1e3:9.1f} "
        f"{row['throughput']:14,.0f} {row['unit']:>7s} {row['mfu']:6.1%} {row['peak_memory_gib']:9.2f} "
        f"{estimate_memory:11.3f} {predicted:19,.0f}"
    )


def child(index: int, arguments: argparse.Namespace) -> dict:
    """Row `index` measured in a fresh process: an out-of-memory, a crash or a hang there (`--row_timeout`) costs
    that row alone, and each row's peak memory is its own (JAX's peak never resets within a process)."""
    command = [sys.executable, __file__, f"--row={index}", f"--steps={arguments.steps}"]
    command += ["--tiny"] if arguments.tiny else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=arguments.row_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {arguments.row_timeout:.0f} s"}
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    sys.stderr.write(done.stderr[-4000:])
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()] or [f"exit status {done.returncode}"]
    return {"error": lines[-1][:200]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU test), not the full ones")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--output", default="", help="write the rows here as JSON (after each row)")
    parser.add_argument("--target", default="", help="compile for this chip (gpu:h200:1, tpu:v5e-1), run nothing")
    parser.add_argument("--row_timeout", type=float, default=180.0, help="seconds one row may take, compiling too")
    parser.add_argument("--row", type=int, default=-1, help=argparse.SUPPRESS)  # the child's own row
    arguments = parser.parse_args(argv)
    if arguments.target:
        try:
            target = targets.parse(arguments.target)
        except ConfigError as error:
            raise SystemExit(f"accelerator.py: {error}") from None
        runtime.use_compile_target(arguments.target)  # JAX's own backend stays the CPU's
        rows = fits_on(target, arguments.tiny)
        print(format_fits(rows, target))
        if not all(row["fits"] for row in rows):
            raise SystemExit(1)
        return rows
    if arguments.row >= 0:
        print(json.dumps(run_row(arguments.row, arguments.tiny, arguments.steps)))
        return []
    rows = []  # this process never starts a backend: on a GPU it would hold the memory the children need
    for index, name in enumerate(row_names(arguments.tiny)):
        row = {"model": name} | child(index, arguments)
        if not rows:
            print("\n".join(format_header(row.get("device", "an accelerator"))), flush=True)
        rows.append(row)
        print(format_row(row), flush=True)
        if arguments.output:
            devices = {row["device"] for row in rows if "device" in row}
            Path(arguments.output).write_text(json.dumps({"device": ", ".join(devices), "rows": rows}, indent=1))
    if any("error" in row for row in rows):
        raise SystemExit(1)
    return rows


if __name__ == "__main__":
    main()
