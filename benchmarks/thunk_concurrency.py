"""When XLA:CPU runs independent operations of one program at the same time: a table of wall time and
cores busy for N independent copies of one operation in one jitted program.

  python benchmarks/thunk_concurrency.py              # ~1 minute on 2 cores; no torch needed

XLA:CPU's thunk executor runs a program's operations as a dataflow graph on its thread pool, except a
program of at most 8 thunks, which it runs one after the other on one thread (`ThunkExecutor`'s
`execute_sequential_num_thunks_threshold`, xla/backends/cpu/runtime/thunk_executor.h). So a probe of two
or four independent operations measures them serial whatever the operation; ten show what a training
step, with hundreds of thunks, can overlap. Operations: a sort (single-threaded in XLA:CPU) and the
GPT attention's batched product (24 x 64 x 64 by 24 x 256 x 64, one of YNNPACK's batched dots, each on
one core). Expected on the 2-core VM (docs/performance.md, 2026-12-01): 1 and 4 copies ~1.0 core busy,
4 taking ~4x one; 10 copies ~1.8-1.9 cores busy, taking ~5-6x one.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import timed  # noqa: E402

COPIES = (1, 4, 10)


def main() -> None:
    rng = np.random.default_rng(0)
    operations = {
        "sort of 262,144 floats": (jnp.sort, lambda: (rng.standard_normal(1 << 18, np.float32),), 4),
        "batched dot 24x64x64 . 24x256x64": (
            lambda q, k: jnp.einsum("bqd,bkd->bqk", q, k),
            lambda: (rng.standard_normal((24, 64, 64), np.float32), rng.standard_normal((24, 256, 64), np.float32)),
            100,
        ),
    }
    load = os.getloadavg()[0]
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, allocator {runtime.allocator_in_use()}, load {load:.1f}")
    print("| operation | copies | ms per call | x one copy | cores busy |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (operation, make, calls) in operations.items():
        single = None
        for copies in COPIES:
            inputs = [tuple(jnp.asarray(array) for array in make()) for _ in range(copies)]

            def program(*groups, arity=len(inputs[0])):
                return tuple(operation(*groups[i : i + arity]) for i in range(0, len(groups), arity))

            jitted, arrays = jax.jit(program), [array for group in inputs for array in group]
            seconds, busy = timed(lambda: jax.block_until_ready(jitted(*arrays)), calls)
            single = single or seconds
            print(f"| {name} | {copies} | {seconds * 1e3:.3f} | {seconds / single:.2f} | {busy:.2f} |", flush=True)


if __name__ == "__main__":
    main()
