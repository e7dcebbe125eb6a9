"""How closely a sharded run follows the one-device run: the same config on several meshes of 8 CPU devices.

  python benchmarks/mesh_agreement.py [--steps 150] [--early 30]
Trains experiments/shakespeare_gpt.py :smoke for `--steps` steps (logging every step) on one device
and on each mesh, then prints, per mesh, the largest train-loss difference over the first `--early`
steps, over all steps, and the final test loss against the one-device run's. Sharding changes the
order of floating-point sums (all-reduces, split matmuls), so losses agree to float precision at first
and drift apart slowly as Adam amplifies the differences. About 40 seconds on a 2-core CPU.
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from research import experiment, sharding, train  # noqa: E402

MESHES = ({"data": 8}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 4, "tensor": 2})


def run(module, steps: int, mesh_axes: dict, data_dir: str) -> tuple[np.ndarray, float]:
    """(train loss per step, final test loss) of the smoke config on a mesh with `mesh_axes`."""
    config = module.get_config("smoke")
    config.update_from_flattened_dict({"num_steps": steps, "log_every": 1, "eval_every": 0})
    if data_dir:
        config.data_dir = data_dir
    size = int(np.prod(list(mesh_axes.values())))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1} | mesh_axes, jax.devices()[:size])
    with tempfile.TemporaryDirectory() as workdir:
        final = train.train_and_evaluate(config, module, workdir, mesh=mesh)
        records = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return np.array([record["train/loss"] for record in records if "train/loss" in record]), final["test/loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--early", type=int, default=30)
    parser.add_argument("--data_dir", default="", help="tfds data directory (default: the config's)")
    args = parser.parse_args()
    module = experiment.load(ROOT / "experiments" / "shakespeare_gpt.py")
    reference, reference_test = run(module, args.steps, {"data": 1}, args.data_dir)
    rows = [("1 device", 0.0, 0.0, reference_test, 0.0)]
    for mesh_axes in MESHES:
        losses, test = run(module, args.steps, mesh_axes, args.data_dir)
        difference = np.abs(losses - reference)
        name = " x ".join(f"{axis} {size}" for axis, size in mesh_axes.items())
        rows.append((name, difference[: args.early].max(), difference.max(), test, test / reference_test - 1))
    print(f"\nshakespeare_gpt :smoke, {args.steps} Adam steps, jax {jax.__version__}")
    print(f"| mesh | max |Δ train loss|, steps 1-{args.early} | max |Δ train loss|, all | test loss | Δ test loss |")
    print("| --- | --- | --- | --- | --- |")
    for name, early, overall, test, relative in rows:
        print(f"| {name} | {early:.1e} | {overall:.1e} | {test:.4f} | {relative:+.2%} |")


if __name__ == "__main__":
    main()
