"""Training speed: our trainer against a minimal hand-written JAX loop and PyTorch eager, one table.

  python benchmarks/train_speed.py                                  # every model, ~5 minutes on 2 cores
  python benchmarks/train_speed.py --models=gpt_small --repeats=5   # one model
  python benchmarks/train_speed.py --impls=trainer,jax --steps=5

For each model (the char-GPT at two sizes, the MNIST CNN, ResNet-20) three implementations of the
same training step (same architecture, parameter count, batch and optimizer) run in one process:
  trainer  the Setup's jitted step (research.steps.build), fed as the training loop feeds it
           (put_batch, metrics one step late)
  jax      the same Flax model and optax optimizer in a minimal jax.jit loop (no framework)
  torch    a plain PyTorch eager reference (benchmarks/torch_models.py: nanoGPT's GPT, torchvision-style CNNs)
  torch_compile  the GPT reference under torch.compile (inductor; GPTs only)
They alternate: each repeat times `steps` steps of each in turn (who goes first rotates), and the table shows medians
over repeats, so the ratios stay fair on a machine shared with other jobs. MFU is the analytic
training FLOPs (research/perf.py, checked here against XLA's cost analysis) per second over the
float32 matmul peak measured by the same JAX at the start of every run. Needs torch (the `bench`
extra); findings are in docs/performance.md.
"""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from benchmarks import torch_models  # noqa: E402
from benchmarks.timing import cpu_seconds  # noqa: E402
from experiments import cifar10_resnet, mnist_cnn, shakespeare_gpt  # noqa: E402
from research import perf, sharding  # noqa: E402
from research.logger import TrainMetrics  # noqa: E402
from research.steps import build  # noqa: E402
from research.train import DispatchWindow  # noqa: E402

IMPLS = ("trainer", "jax", "torch", "torch_compile")
HOST_BATCHES = 4  # distinct synthetic batches, cycled


@dataclasses.dataclass(frozen=True)
class Model:
    """One benchmarked model: its experiment, config overrides, and the shape of a batch."""

    experiment: object
    overrides: dict
    steps: int  # timed steps per repeat (default)
    tokens_per_example: int = 1  # > 1: throughput is in tokens/s


def gpt_overrides(layers: int, heads: int, width: int, length: int, batch: int) -> dict:
    return {
        "model.num_layers": layers,
        "model.num_heads": heads,
        "model.width": width,
        "data.block_size": length,
        "batch_size": batch,
        "model.dropout_rate": 0.0,
    }


MODELS = {
    "gpt_small": Model(shakespeare_gpt, gpt_overrides(4, 4, 128, 128, 32), steps=6, tokens_per_example=128),
    "gpt_large": Model(shakespeare_gpt, gpt_overrides(6, 6, 384, 256, 16), steps=2, tokens_per_example=256),
    "cnn": Model(mnist_cnn, {"batch_size": 128}, steps=6),
    "resnet20": Model(cifar10_resnet, {"batch_size": 128, "model.depth": 20, "data.name": "synthetic"}, steps=2),
}


def config_of(model: Model):
    config = model.experiment.get_config()
    config.update_from_flattened_dict(model.overrides)
    return config


def host_batches(model: Model, config, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Synthetic numpy batches in the experiment's format: inputs, targets and mask (GPT), inputs, labels and
    mask (classifiers)."""
    rng, batch = np.random.default_rng(seed), config.batch_size
    batches = []
    for _ in range(HOST_BATCHES):
        if model.experiment is shakespeare_gpt:
            tokens = rng.integers(
                0, shakespeare_gpt.vocab_size(config), size=(batch, config.data.block_size + 1), dtype=np.int32
            )
            example = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        else:
            shape = (28, 28, 1) if model.experiment is mnist_cnn else (32, 32, 3)
            example = {
                "inputs": rng.normal(size=(batch, *shape)).astype(np.float32),
                "labels": rng.integers(0, 10, batch).astype(np.int32),
            }
        batches.append(example | {"mask": np.ones(batch, np.float32)})
    return batches


class _SilentLogger:
    """Takes TrainMetrics' records without writing them anywhere."""

    def write(self, step, values):
        self.last = values

    def advance(self, step, examples_per_second=None):
        """No progress bar: the benchmark prints its own table."""


@dataclasses.dataclass
class Runner:
    """An implementation ready to time: step(i) dispatches step i, sync() waits for it."""

    step: Callable[[int], None]
    sync: Callable[[], None]
    compile_seconds: float = float("nan")
    xla_flops: float = float("nan")
    parameters: int = 0


def trainer_runner(model: Model, config, batches) -> Runner:
    """The Setup's train step, fed as the training loop (research/train.py) feeds it."""
    setup = build(config, model.experiment, batch=batches[0])
    mesh, state = setup.mesh, setup.init_state(jax.random.PRNGKey(0))
    batch = sharding.put_batch(batches[0], mesh)
    start = time.perf_counter()
    compiled = setup.train_step.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    window = TrainMetrics(_SilentLogger(), config.batch_size, 0, skip_nonfinite=False)
    holder, dispatched = {"state": state}, DispatchWindow()

    def step(index: int) -> None:
        placed = sharding.put_batch(batches[index % len(batches)], mesh)
        holder["state"], metrics = compiled(holder["state"], placed)
        dispatched.add(metrics)
        window.flush()
        window.add(metrics)
        if (index + 1) % config.log_every == 0:
            window.finish_window(index + 1)

    parameters = sum(leaf.size for leaf in jax.tree.leaves(state.params))
    return Runner(
        step, lambda: jax.block_until_ready(holder["state"]), compile_seconds, perf.xla_flops(compiled), parameters
    )


def minimal_jax_runner(model: Model, config, batches) -> Runner:
    """The same Flax model and optimizer in the shortest correct jax.jit loop."""
    flax_model = model.experiment.make_model(config)
    gpt = model.experiment is shakespeare_gpt
    variables = dict(
        flax_model.init(
            jax.random.PRNGKey(0),
            batches[0]["inputs"],
            **({} if gpt or model.experiment is mnist_cnn else {"train": False}),
        )
    )
    params = variables.pop("params")
    if gpt:
        tx = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 100, 5000), b2=0.99, weight_decay=0.1),
        )
    else:
        decay = optax.add_decayed_weights(1e-4) if model.experiment is cifar10_resnet else optax.identity()
        tx = optax.chain(decay, optax.sgd(0.1, momentum=0.9))

    def loss_fn(params, model_state, batch):
        if model_state:
            logits, updated = flax_model.apply(
                {"params": params, **model_state}, batch["inputs"], train=True, mutable=["batch_stats"]
            )
        else:
            logits, updated = flax_model.apply({"params": params}, batch["inputs"]), model_state
        labels = batch["targets"] if gpt else batch["labels"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updated

    def train_step(params, model_state, opt_state, batch):
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss

    step_fn = jax.jit(train_step, donate_argnums=(0, 1, 2))
    state = [params, variables, tx.init(params)]
    start = time.perf_counter()
    compiled = step_fn.lower(*state, jax.device_put(batches[0])).compile()
    compile_seconds = time.perf_counter() - start

    def step(index: int) -> None:
        *state[:], _ = compiled(*state, jax.device_put(batches[index % len(batches)]))

    parameters = sum(leaf.size for leaf in jax.tree.leaves(params))
    return Runner(step, lambda: jax.block_until_ready(state), compile_seconds, perf.xla_flops(compiled), parameters)


def torch_runner(model: Model, config, batches, compile: bool = False) -> Runner:
    """benchmarks/torch_models.py's reference, eager (or the GPT under torch.compile)."""
    torch.manual_seed(0)
    if model.experiment is shakespeare_gpt:
        module, step_fn = torch_models.make_gpt(
            shakespeare_gpt.vocab_size(config),
            config.data.block_size,
            config.model.num_layers,
            config.model.num_heads,
            config.model.width,
            bias=config.model.use_bias,
            compile=compile,
        )
        tensors = [
            {"inputs": torch.from_numpy(b["inputs"]).long(), "targets": torch.from_numpy(b["targets"]).long()}
            for b in batches
        ]
    else:
        if model.experiment is mnist_cnn:
            network = torch_models.CNN(1, tuple(config.model.conv_features), config.model.dense_features)
            module, step_fn = torch_models.make_classifier(network)
        else:
            module, step_fn = torch_models.make_classifier(
                torch_models.CifarResNet(config.model.depth, config.model.width), weight_decay=1e-4
            )
        tensors = [
            {
                "inputs": torch.from_numpy(b["inputs"]).permute(0, 3, 1, 2).contiguous(),
                "targets": torch.from_numpy(b["labels"]).long(),
            }
            for b in batches
        ]
    module.train()
    return Runner(
        lambda index: step_fn(tensors[index % len(tensors)]),
        lambda: None,
        parameters=torch_models.parameter_count(module),
    )


RUNNERS = {
    "trainer": trainer_runner,
    "jax": minimal_jax_runner,
    "torch": torch_runner,
    "torch_compile": lambda model, config, batches: torch_runner(model, config, batches, compile=True),
}


def time_steps(runner: Runner, first: int, steps: int) -> float:
    """Seconds per step over `steps` steps, synchronised at the end."""
    start = time.perf_counter()
    for index in range(first, first + steps):
        runner.step(index)
    runner.sync()
    return (time.perf_counter() - start) / steps


def warm_up(runner: Runner) -> None:
    """Steps 0-3 untimed: thread pools start, and memory is touched for the first time."""
    time_steps(runner, 0, 2)  # two steps in flight, as the timed repeats run them
    time_steps(runner, 2, 1)  # then single steps: the first that runs alone touches ~1 GB more (gpt_large),
    time_steps(runner, 3, 1)  # seconds of kernel time on this VM that would otherwise land in a repeat


def benchmark_model(name: str, impls: list[str], steps: int, repeats: int, peak: float) -> list[dict]:
    """Rows of the table for one model: each implementation's median step time (and CPU-seconds per step)
    over interleaved repeats."""
    model = MODELS[name]
    config = config_of(model)
    batches = host_batches(model, config)
    analytic = model.experiment.flops_per_example(config) * config.batch_size
    impls = [impl for impl in impls if impl != "torch_compile" or model.experiment is shakespeare_gpt]
    runners = {impl: RUNNERS[impl](model, config, batches) for impl in impls}
    for runner in runners.values():
        warm_up(runner)
    times, cpu = {impl: [] for impl in impls}, {impl: [] for impl in impls}
    for repeat in range(repeats):
        order = impls[repeat % len(impls) :] + impls[: repeat % len(impls)]  # each goes first in turn
        for impl in order:
            before = cpu_seconds()
            times[impl].append(time_steps(runners[impl], 2 + repeat * steps, steps))
            cpu[impl].append((cpu_seconds() - before) / steps)
    rows = []
    for impl, runner in runners.items():
        seconds = perf.median(times[impl])
        rows.append(
            {
                "model": name,
                "impl": impl,
                "parameters": runner.parameters,
                "step_ms": seconds * 1e3,
                "throughput": config.batch_size * model.tokens_per_example / seconds,
                "unit": "tok/s" if model.tokens_per_example > 1 else "ex/s",
                "mfu": analytic / seconds / peak,
                "compile_s": runner.compile_seconds,
                "xla_over_analytic": runner.xla_flops / analytic,
                "spread": (max(times[impl]) - min(times[impl])) / seconds,
                "cpu_s": perf.median(cpu[impl]),  # CPU-seconds per step (PyTorch's count its threads' spinning)
            }
        )
    by_impl = {row["impl"]: row for row in rows}
    for row in rows:
        row["vs_torch"] = by_impl["torch"]["step_ms"] / row["step_ms"] if "torch" in by_impl else float("nan")
        row["vs_jax"] = by_impl["jax"]["step_ms"] / row["step_ms"] if "jax" in by_impl else float("nan")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per (model, implementation); ratios are throughput over torch's / minimal JAX's."""
    lines = [
        "| model | impl | params | step ms | throughput | MFU | compile s | x torch | x jax "
        "| XLA/analytic FLOPs | spread |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['impl']} | {row['parameters']:,} | {row['step_ms']:.1f} "
            f"| {row['throughput']:,.0f} {row['unit']} | "
            f"{row['mfu']:.0%} | {row['compile_s']:.1f} | {row['vs_torch']:.2f} | {row['vs_jax']:.2f} | "
            f"{row['xla_over_analytic']:.3f} | {row['spread']:.0%} |"
        )
    return "\n".join(lines).replace("| nan |", "| - |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {', '.join(IMPLS)}")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per repeat (0: each model's default)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the table shows medians")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    impls = args.impls.split(",")
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} CPUs, allocator {runtime.allocator_in_use()}; "
        f"load average before: {os.getloadavg()}"
    )
    peak = perf.measure_peak_flops()
    print(f"float32 matmul peak (jax, {perf.PEAK_MATMUL_SIZE}^2): {peak / 1e9:.0f} GFLOP/s")
    rows = []
    for name in args.models.split(","):
        rows += benchmark_model(name, impls, args.steps or MODELS[name].steps, args.repeats, peak)
        print("\n".join(format_table(rows).splitlines()[-len(impls) :]), flush=True)
    print(format_table(rows))
    print(f"load average after: {os.getloadavg()}; spread = (max - min) / median of the repeats' step times")


if __name__ == "__main__":
    main()
