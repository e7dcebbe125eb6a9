"""The Llama family at scale on this CPU: compile time against depth, and generation with and without the cache.

  python benchmarks/lm_scaling.py [--parts compile,generate] [--repeats 3] [--new_tokens 512]
compile: the train step of experiments/lm.py :llama2-70b (8,192 wide, 8 x 4,096 tokens, FSDP over 8
fake CPU devices, nothing allocated) lowered and compiled with 8 and 80 layers under nn.scan, and 4, 8
and 16 unrolled: scanned, the compile time should not grow with depth. ~1 min.
generate: tokens/s of the :cpu model (0.8M parameters, block 64) continuing a 16-token prompt by
`--new_tokens` greedy tokens, far past its block: the rolling key/value cache (one position per step)
against the full pass per token; medians of interleaved repeats. ~1 min.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from research import experiment, steps  # noqa: E402
from research.inference.generate import Sampling, timed_generate  # noqa: E402

LM = experiment.load(ROOT / "experiments" / "lm.py")


def compile_row(layers: int, scan: bool) -> tuple:
    config = LM.get_config("llama2-70b")
    config.model.update({"num_layers": layers, "scan_layers": scan})
    config.batch_size = 8
    shape = (8, config.model.block_size)
    batch = {
        "inputs": jax.ShapeDtypeStruct(shape, jnp.int32),
        "targets": jax.ShapeDtypeStruct(shape, jnp.int32),
        "mask": jax.ShapeDtypeStruct((8,), jnp.float32),
    }
    setup = steps.build(config, LM, batch=batch)
    start = time.perf_counter()
    lowered = setup.train_step.lower(setup.abstract_state, setup.batch_spec)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    memory = compiled.memory_analysis()
    hlo_kb = len(lowered.as_text()) / 1e3
    return (
        layers,
        "scan" if scan else "unrolled",
        f"{LM.parameter_count(config) / 1e9:.1f}B",
        f"{lowered_at - start:.1f}",
        f"{compiled_at - lowered_at:.1f}",
        f"{hlo_kb:.0f}",
        f"{memory.argument_size_in_bytes / 2**30:.1f}",
    )


def compile_part() -> None:
    rows = [compile_row(layers, scan) for layers, scan in ((8, True), (80, True), (4, False), (8, False), (16, False))]
    print(f"\nllama2-70b shapes, train step, 8 x 4096 tokens, fsdp 8 (fake CPU devices), jax {jax.__version__}")
    print("| layers | layers as | parameters | lower s | compile s | StableHLO kB | state GiB per device |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def generate_part(repeats: int, new_tokens: int) -> None:
    config = LM.get_config("cpu")
    model = LM.make_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.model.block_size), jnp.int32))["params"]
    prompt = np.random.default_rng(0).integers(1, model.vocab_size, (1, 16))
    rates: dict[bool, list[float]] = {True: [], False: []}
    tokens = {}
    for _ in range(repeats):
        for cached in (True, False):
            tokens[cached], rate = timed_generate(model, params, prompt, new_tokens, Sampling(0.0), cached=cached)
            rates[cached].append(rate)
    same = bool(np.array_equal(tokens[True], tokens[False]))
    block = config.model.block_size
    print(f"\nlm :cpu ({LM.parameter_count(config) / 1e6:.2f}M parameters, block {block}), 16-token prompt + ")
    print(f"{new_tokens} greedy tokens, batch 1, median of {repeats} interleaved repeats; same tokens: {same}")
    print("| decoder | tokens/s | vs full pass |")
    print("| --- | --- | --- |")
    full = statistics.median(rates[False])
    for cached, name in ((True, "rolling cache"), (False, "full pass per token")):
        rate = statistics.median(rates[cached])
        print(f"| {name} | {rate:,.0f} | {rate / full:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="compile,generate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=512)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "compile" in parts:
        compile_part()
    if "generate" in parts:
        generate_part(args.repeats, args.new_tokens)


if __name__ == "__main__":
    main()
