"""The mixture-of-experts layer's training throughput: research.models.moe.MoE's forward and backward against
a dense gated MLP of the same active FLOPs as the experts grow, both dispatches; then whole lm train steps.

  python benchmarks/moe.py                        # ~3 minutes on 2 cores; no torch needed
  python benchmarks/moe.py --experts=8,16 --fine= --lm= --repeats=3

Layer rows: jax.jit of value_and_grad (parameters and input) of the sum of the output, float32, 8 x 512 tokens
of width 256, every row K x F = 512 active hidden units: the dense row is the Llama's gated MLP 512 wide; the
experts rows keep top-2 and F = 256 as E grows (--experts), the fine rows grow K = E / 4 at F = 512 / K
(--fine). Dispatches: dropless (grouped matmuls) and capacity (factor 1.25, batched matmuls). GFLOP/s
counts useful work only (3 matrices x 2 x tokens x K x D x F, and the router's 2 x tokens x D x E, x3 for
forward and backward); `XLA/active` is what XLA's cost analysis says the program computes over that. MFU is
over the float32 matmul peak measured at the start (research/perf.py). The lm table: experiments/lm.py's
dense `:cpu`, `:cpu-mixtral`, it without the balancing loss and with capacity dispatch, each the trainer's
jitted step (research.steps.build) on one batch, --steps a repeat (--lm= skips it). Every row of a table is
timed interleaved (each repeat times each row in turn, who goes first rotating); medians of --repeats.
Expected on the 2-core VM (docs/performance.md, 2026-12-07): the dropless dispatch's grouped matmul (tiles of
128 rows per expert off GPUs and TPUs, research.models.moe.grouped_matmul) at ~0.5x the dense MLP's GFLOP/s at
8 experts and ~0.3x at 64 (XLA/active 1.1 to 2.0: the tiles' padding); capacity at 0.5-0.6x; `:cpu-mixtral`'s
step at ~0.5x `:cpu`'s, ~0.65x with capacity.
"""

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.timing import cpu_seconds  # noqa: E402
from experiments import lm  # noqa: E402
from research import perf, sharding  # noqa: E402
from research.models import moe  # noqa: E402
from research.models.transformer import flat_dot_general  # noqa: E402
from research.steps import build  # noqa: E402

BATCH, LENGTH, WIDTH, ACTIVE = 8, 512, 256, 512  # tokens B x L of width D; K x F, every row's active hidden width
CAPACITY_FACTOR = 1.25
LM_VARIANTS = {  # experiments/lm.py's configs and overrides, the first the reference
    "dense": ("cpu", {}),
    "mixtral": ("cpu-mixtral", {}),
    "mixtral_aux0": ("cpu-mixtral", {"model.moe_aux_weight": 0.0}),
    "mixtral_capacity": ("cpu-mixtral", {"model.moe_dispatch": "capacity"}),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: a dense gated MLP (experts 0) or a mixture of `experts`, `chosen` per token, by `dispatch`;
    `sweep` names its group (in the lm table, the config)."""

    sweep: str
    experts: int = 0
    chosen: int = 1
    dispatch: str = "dense"

    @property
    def hidden(self) -> int:  # F: an expert's width (the dense MLP's: all of ACTIVE)
        return ACTIVE // self.chosen

    def flops(self) -> float:
        """Useful training FLOPs: the active experts' (or the dense MLP's) three matmuls and the router, x3."""
        tokens = BATCH * LENGTH
        return 3.0 * (3 * 2 * tokens * self.chosen * WIDTH * self.hidden + 2 * tokens * WIDTH * self.experts)


class GatedMLP(nn.Module):
    """The dense Llama's MLP (research/models/llama.py): down(silu(gate(x)) * up(x)), each Dense on (B*L) x D."""

    hidden: int

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, use_bias=False, dot_general=flat_dot_general)
        hidden = nn.silu(dense(self.hidden, name="gate_proj")(x_BxLxD)) * dense(self.hidden, name="up_proj")(x_BxLxD)
        return dense(x_BxLxD.shape[-1], name="down_proj")(hidden)


def module_of(case: Case) -> nn.Module:
    """The layer of a row, as the Llama block builds it."""
    if not case.experts:
        return GatedMLP(case.hidden)
    routing = moe.Routing(case.experts, case.chosen, dispatch=case.dispatch, capacity_factor=CAPACITY_FACTOR)
    return moe.MoE(routing, case.hidden)


@dataclasses.dataclass
class Runner:
    """A row ready to time: `call` runs its compiled program and waits; what was measured once beside."""

    case: Case
    call: Callable[[], object]
    xla_flops: float
    dropped: float  # the share of token copies the capacity dispatch skipped (0 otherwise)
    calls: int = 1  # per timed repeat: enough for ~0.3 s


def runner_of(case: Case, x_BxLxD: jax.Array) -> Runner:
    """The row's layer on its own parameters, its gradient compiled and run twice (the second sizes `calls`)."""
    module = module_of(case)
    params = module.init(jax.random.PRNGKey(1), x_BxLxD)["params"]

    def loss(params, x_BxLxD):
        return jnp.sum(module.apply({"params": params}, x_BxLxD))

    gradient = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))  # the input's gradient too: a layer inside a model
    compiled = gradient.lower(params, x_BxLxD).compile()
    dropped = 0.0
    if case.experts:
        _, sown = module.apply({"params": params}, x_BxLxD, mutable=[moe.COLLECTION])
        dropped = float(sown[moe.COLLECTION]["dropped"])
    runner = Runner(case, lambda: jax.block_until_ready(compiled(params, x_BxLxD)), perf.xla_flops(compiled), dropped)
    runner.call()  # thread pools start, memory is touched
    start = time.perf_counter()
    runner.call()
    runner.calls = max(1, round(0.3 / (time.perf_counter() - start)))
    return runner


def lm_runner(name: str, steps: int) -> Runner:
    """`steps` training steps of an lm config's jitted train step (the trainer's Setup) on one batch."""
    arg, overrides = LM_VARIANTS[name]
    config = lm.get_config(arg)
    config.update_from_flattened_dict(overrides)
    batch = next(iter(lm.make_data(config, "train")))
    setup = build(config, lm, batch=batch)
    holder = {"state": setup.init_state(jax.random.PRNGKey(0))}
    placed = sharding.put_batch(batch, setup.mesh)
    compiled = setup.train_step.lower(holder["state"], placed).compile()

    def call():
        for _ in range(steps):
            holder["state"], _ = compiled(holder["state"], placed)
        jax.block_until_ready(holder["state"])

    call()  # thread pools start, memory is touched
    return Runner(Case(name), call, perf.xla_flops(compiled), 0.0)


def lm_table(names: list[str], steps: int, repeats: int) -> str:
    """Markdown: each lm config's step time and tokens/s over interleaved repeats, against the first's."""
    runners = [lm_runner(name, steps) for name in names]
    rows = measure(runners, repeats)
    config = lm.get_config("cpu")
    tokens = config.batch_size * config.model.block_size
    print(f"experiments/lm.py train steps, {config.batch_size} x {config.model.block_size} tokens, {steps} a repeat")
    reference = rows[runners[0].case]["seconds"]
    lines = ["| config | step ms | tokens/s | x dense | cores busy |", "| --- | ---: | ---: | ---: | ---: |"]
    for runner in runners:
        seconds = rows[runner.case]["seconds"] / steps
        lines.append(
            f"| {runner.case.sweep} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} "
            f"| {reference / rows[runner.case]['seconds']:.2f} | {rows[runner.case]['busy']:.2f} |"
        )
    return "\n".join(lines)


def measure(runners: list[Runner], repeats: int) -> dict[Case, dict]:
    """Each case's median seconds per call and cores busy over interleaved repeats."""
    times = {runner.case: [] for runner in runners}
    busy = {runner.case: [] for runner in runners}
    for repeat in range(repeats):
        shift = repeat % len(runners)
        for runner in runners[shift:] + runners[:shift]:
            cpu, start = cpu_seconds(), time.perf_counter()
            for _ in range(runner.calls):
                runner.call()
            seconds = time.perf_counter() - start
            times[runner.case].append(seconds / runner.calls)
            busy[runner.case].append((cpu_seconds() - cpu) / seconds)
    return {case: dict(seconds=perf.median(times[case]), busy=perf.median(busy[case])) for case in times}


def integers(text: str) -> list[int]:
    return [int(value) for value in text.split(",") if value]


def cases_of(experts: list[int], fine: list[int]) -> list[Case]:
    """The dense row, then per dispatch the top-2 rows and the fine rows."""
    cases = [Case("dense")]
    for dispatch in moe.DISPATCHES:
        cases += [Case("experts", count, 2, dispatch) for count in experts]
        cases += [Case("fine", count, count // 4, dispatch) for count in fine]  # 8 experts: the top-2 row
    return cases


def format_table(rows: dict[Case, dict], peak: float) -> str:
    """Markdown: one line per layer row; `x dense` is its GFLOP/s over the dense MLP's."""
    lines = [
        "| sweep | dispatch | E | K | F | ms | GFLOP/s | MFU | x dense | XLA/active | dropped | cores busy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = next(case for case in rows if not case.experts)
    dense_rate = dense.flops() / rows[dense]["seconds"]
    for case, row in rows.items():
        rate = case.flops() / row["seconds"]
        lines.append(
            f"| {case.sweep} | {case.dispatch} | {case.experts or '-'} | {case.chosen} | {case.hidden} "
            f"| {row['seconds'] * 1e3:.1f} | {rate / 1e9:.1f} | {rate / peak:.0%} | {rate / dense_rate:.2f} "
            f"| {row['xla_flops'] / case.flops():.2f} | {row['dropped']:.1%} | {row['busy']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", default="8,16,32,64", help="E of the top-2 rows (F = 256)")
    parser.add_argument("--fine", default="16,32", help="E of the rows with K = E / 4, F = 512 / K ('': none)")
    parser.add_argument("--lm", default=",".join(LM_VARIANTS), help=f"of {', '.join(LM_VARIANTS)} ('': none)")
    parser.add_argument("--steps", type=int, default=20, help="lm train steps a repeat")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the tables show medians")
    args = parser.parse_args()
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, allocator "
        f"{runtime.allocator_in_use()}; load average before: {os.getloadavg()}"
    )
    peak = perf.measure_peak_flops()
    print(f"float32 matmul peak (jax, {perf.PEAK_MATMUL_SIZE}^2): {peak / 1e9:.0f} GFLOP/s")
    x_BxLxD = jax.random.normal(jax.random.PRNGKey(0), (BATCH, LENGTH, WIDTH), jnp.float32)
    runners = [runner_of(case, x_BxLxD) for case in cases_of(integers(args.experts), integers(args.fine))]
    rows = measure(runners, args.repeats)
    for runner in runners:
        rows[runner.case] |= dict(xla_flops=runner.xla_flops, dropped=runner.dropped)
    print(f"{BATCH} x {LENGTH} tokens, width {WIDTH}, active hidden width K x F = {ACTIVE}, float32")
    print(format_table(rows, peak))
    if args.lm:
        print(lm_table(args.lm.split(","), args.steps, args.repeats))
    print(f"load average after: {os.getloadavg()}; medians of {args.repeats} interleaved repeats")


if __name__ == "__main__":
    main()
