"""How long the step loop waits for a checkpoint save: asynchronous against synchronous.

  python benchmarks/checkpoint_stall.py [--width 2048]
Builds the train state of digits_mlp widened to hidden layers of `--width` (Adam: three copies
of the parameters), then saves it several times with each mode through research.checkpoint.
"stall" is how long `save` blocks the caller (what the step loop loses); "total" runs until the
write is on disk. Prints one table.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import digits_mlp  # noqa: E402
from research import checkpoint  # noqa: E402
from research.steps import build  # noqa: E402

SAVES = 5


def build_state(width: int, data_dir: str):
    config = digits_mlp.get_config("smoke")
    config.data_dir = data_dir
    config.model.features = (width, width, width, 10)
    iterator = iter(digits_mlp.make_data(config, "train"))
    state = build(config, digits_mlp, batch=next(iterator)).init_state(jax.random.PRNGKey(0))
    return config, state, iterator


def time_saves(config, state, iterator, asynchronous: bool) -> dict[str, float]:
    config.checkpoint.asynchronous = asynchronous
    stalls, totals = [], []
    with tempfile.TemporaryDirectory() as workdir:
        manager = checkpoint.make_manager(workdir, config.checkpoint)
        for step in range(1, SAVES + 1):
            start = time.perf_counter()
            checkpoint.save(manager, step, state, iterator, config, force=True)
            stalls.append(time.perf_counter() - start)
            manager.wait_until_finished()
            totals.append(time.perf_counter() - start)
        manager.close()
    return {"stall": float(np.median(stalls)), "total": float(np.median(totals))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        config, state, iterator = build_state(args.width, data_dir)
        megabytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) / 2**20
        rows = {mode: time_saves(config, state, iterator, mode == "async") for mode in ("sync", "async")}
    print(
        f"train state: {megabytes:,.0f} MiB (params + Adam moments), median of {SAVES} saves, "
        f"{jax.devices()[0].platform}"
    )
    print(f"{'mode':8s} {'stall (ms)':>12s} {'total (ms)':>12s}")
    for mode, row in rows.items():
        print(f"{mode:8s} {row['stall'] * 1e3:12.1f} {row['total'] * 1e3:12.1f}")


if __name__ == "__main__":
    main()
