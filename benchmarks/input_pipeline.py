"""Input pipeline throughput against train-step time, and how fast a missing dataset fails; with --corpus_gb,
corpus preparation and streaming instead.

  python benchmarks/input_pipeline.py
  python benchmarks/input_pipeline.py --corpus_gb 1 --workdir /tmp/corpus_bench     # ~8 minutes
Prints one table. The bars: the in-memory pipelines deliver batches at least 5x faster than the
train step consumes them; a missing dataset fails in under 5 s; streaming a prepared corpus delivers
>= 10x the tokens one H100 consumes at 40 % MFU on the 124M model. The corpus (JSONL shards of
Zipf-distributed words, made here, never committed) is prepared with a byte-level BPE of 8192 ids;
preparation is timed with 1 and 2 workers on the same files.
"""

import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import errors, runtime  # noqa: E402

runtime.configure_process()  # launch.py's XLA flags and allocator (research/runtime.py), before JAX starts

import jax  # noqa: E402

from experiments import digits_mlp, shakespeare_gpt  # noqa: E402
from research import sharding  # noqa: E402
from research.data import augment, pipeline, text  # noqa: E402
from research.steps import build  # noqa: E402

WARMUP, BATCHES, STEPS = 20, 1000, 1000
CHAR_BATCH, CHAR_LENGTH = 64, 256


def batches_per_second(batches, count: int = BATCHES) -> float:
    """Batches per second drawn from an iterable, after a warm-up."""
    iterator = iter(batches)
    for _ in range(WARMUP):
        next(iterator)
    start = time.perf_counter()
    for _ in range(count):
        next(iterator)
    return count / (time.perf_counter() - start)


def steps_per_second(experiment, config, batches) -> dict[str, float]:
    """An experiment's train steps per second: the jitted step alone, and with `put_batch` as the loop does."""
    host_batch = next(iter(batches))
    setup = build(config, experiment, batch=host_batch)
    mesh, train_fn, state = setup.mesh, setup.train_step, setup.init_state(jax.random.PRNGKey(0))
    batch = sharding.put_batch(host_batch, mesh)
    rates = {}
    for name, place in (
        ("step alone", lambda: batch),
        ("step + put_batch", lambda: sharding.put_batch(host_batch, mesh)),
    ):
        for _ in range(WARMUP):
            state, metrics = train_fn(state, place())
        jax.block_until_ready(state)
        start = time.perf_counter()
        for _ in range(STEPS):
            state, metrics = train_fn(state, place())
        jax.block_until_ready((state, metrics))
        rates[name] = STEPS / (time.perf_counter() - start)
    return rates


def digits_per_example_batches(config):
    """The general path for comparison: tfds records through a per-example grain map."""
    source = pipeline.tfds_source(config.data.name, config.data.splits["train"], data_dir=config.data_dir)
    preprocess = functools.partial(augment.pixels, scale=digits_mlp.MAX_PIXEL, flat=True)
    return pipeline.train_batches(source, batch_size=config.batch_size, seed=config.seed, transform=preprocess)


def char_lm_batches(data_dir: str, *, in_memory: bool):
    """Endless (64, 256) character windows of the Tiny Shakespeare training text."""
    train_text = text.split_text("tiny_shakespeare", "train", data_dir)
    tokens = text.CharTokenizer.from_text(train_text).encode(train_text)
    if in_memory:
        columns, gather = text.window_columns(tokens, CHAR_LENGTH)
        return pipeline.array_batches(columns, batch_size=CHAR_BATCH, seed=0, transform=gather)
    return pipeline.train_batches(text.WindowSource(tokens, CHAR_LENGTH), batch_size=CHAR_BATCH, seed=0)


def missing_error_seconds(data_dir: str) -> dict[str, float]:
    """Seconds until the one-line error, in this process and in a fresh one (imports included)."""
    from research.data import catalog

    timings = {}
    for name in ("cifar10", "tfds:cifar100"):
        start = time.perf_counter()
        try:
            catalog.source(name, "train", data_dir)
        except errors.MissingDataError:
            timings[f"missing {name}, in process"] = time.perf_counter() - start
    script = (
        f"from research.data import catalog\ntry:\n catalog.source('cifar10', 'train', {data_dir!r})\n"
        "except Exception as e:\n print(e)"
    )
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, check=True)
    timings["missing cifar10, fresh python"] = time.perf_counter() - start
    return timings


def make_corpus(directory: Path, gigabytes: float, files: int = 16) -> list[Path]:
    """JSONL shards of `gigabytes` in all: documents cut from a text of Zipf-distributed made-up words."""
    import numpy as np

    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    words = ["".join(rng.choice(letters, size=rng.integers(1, 10))) for _ in range(50_000)]
    ranks = np.minimum(rng.zipf(1.2, size=4_000_000), len(words)) - 1
    text = " ".join(words[rank] for rank in ranks)
    paths, per_file = [], gigabytes * 1e9 / files
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(files):
        path = directory / f"part-{index:03d}.jsonl"
        paths.append(path)
        if path.exists():
            continue
        with open(path, "w") as stream:
            written = 0
            while written < per_file:
                start, length = int(rng.integers(0, len(text) - 20_000)), int(rng.integers(500, 20_000))
                line = json.dumps({"text": text[start : start + length]}) + "\n"
                stream.write(line)
                written += len(line)
    return paths


def prepare_seconds(paths: list[Path], output: Path, workers: int, tokenizer: str, one_core: bool = False) -> float:
    """Seconds to prepare `paths` (the BPE trained first on 20 MB: included); one_core: no tokenizer threads."""
    import os
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    command = [sys.executable, "-m", "research.data.prepare", "--output", str(output), "--workers", str(workers)]
    command += ["--tokenizer", tokenizer, "--bpe_sample_mb=20"] + [f"--input={path}" for path in paths]
    threads = {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"} if one_core else {}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=dict(os.environ, **threads))
    return time.perf_counter() - start


def h100_tokens_per_second(size: str) -> float:
    """What one H100 (989 dense bf16 TFLOP/s) consumes at 40 % MFU training `size` (the analytic FLOPs per token)."""
    from experiments import lm

    config = lm.get_config(size)
    return 0.4 * 989e12 / (lm.flops_per_example(config) / config.model.block_size)


def corpus_rows(gigabytes: float, workdir: Path) -> list[tuple[str, float, str]]:
    from experiments import lm
    from research.data import stream

    paths = make_corpus(workdir / "raw", gigabytes)
    sample = paths[:4]
    megabytes = sum(path.stat().st_size for path in sample) / 1e6
    rows = []
    runs = ((1, True, "1 worker, 1 core"), (2, True, "2 workers"), (1, False, "1 process, tokenizer threads"))
    for workers, one_core, what in runs:
        seconds = prepare_seconds(sample, workdir / f"sample_{workers}_{one_core}", workers, "bpe:8192", one_core)
        rows.append((f"prepare {megabytes:.0f} MB of JSONL, BPE 8192, {what}", megabytes / seconds, "MB/s"))
    prepared = workdir / "prepared"
    if not (prepared / "manifest.json").exists():
        start = time.perf_counter()
        prepare_seconds(paths, prepared, 2, "bpe:8192")
        rows.append((f"prepare the whole {gigabytes:g} GB, 2 workers", time.perf_counter() - start, "s"))
    tokens = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["tokens"]
    rows.append(("prepared corpus, train tokens", tokens / 1e6, "M tokens"))
    for size, batch in (("gpt2-124m", 32), ("llama-3.2-1b", 8)):
        length = lm.get_config(size).model.block_size
        for segment_ids in (False, True):
            batches = stream.train_batches(
                str(prepared), length=length, batch_size=batch, seed=0, segment_ids=segment_ids
            )
            rate = batches_per_second(batches, 200) * batch * length
            rows.append((f"stream {batch}x{length} windows, segment_ids={segment_ids}", rate / 1e6, "M tokens/s"))
        consumed = h100_tokens_per_second(size)
        rows.append((f"one H100 at 40% MFU consumes ({size})", consumed / 1e6, "M tokens/s"))
    return rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus_gb", type=float, default=0.0, help="> 0: the corpus benchmark instead")
    parser.add_argument("--workdir", default=tempfile.gettempdir() + "/corpus_benchmark")
    arguments = parser.parse_args()
    if arguments.corpus_gb:
        print(f"{'measure':66s} {'value':>10s}")
        for name, value, unit in corpus_rows(arguments.corpus_gb, Path(arguments.workdir)):
            print(f"{name:66s} {value:10.2f} {unit}")
        return
    data_dir = tempfile.mkdtemp(prefix="tfds_benchmark_")
    config = digits_mlp.get_config()
    config.data_dir = data_dir
    digits = digits_mlp.make_data(config, "train")
    steps = steps_per_second(digits_mlp, config, digits)
    gpt_config = shakespeare_gpt.get_config("cpu")
    gpt_config.data_dir = data_dir
    gpt_data = shakespeare_gpt.make_data(gpt_config, "train")
    gpt_steps = steps_per_second(shakespeare_gpt, gpt_config, gpt_data)
    rows = [
        (
            f"digits pipeline, in memory (digits_mlp; batch {config.batch_size})",
            batches_per_second(digits, 10 * BATCHES),
            "batches/s",
        ),
        (
            f"digits pipeline, per-example tfds records (batch {config.batch_size})",
            batches_per_second(digits_per_example_batches(config), 200),
            "batches/s",
        ),
        (
            f"char-LM pipeline, window gather ({CHAR_BATCH}x{CHAR_LENGTH})",
            batches_per_second(char_lm_batches(data_dir, in_memory=True), 10 * BATCHES),
            "batches/s",
        ),
        (
            f"char-LM pipeline, per-example windows ({CHAR_BATCH}x{CHAR_LENGTH})",
            batches_per_second(char_lm_batches(data_dir, in_memory=False)),
            "batches/s",
        ),
    ]
    rows += [(f"digits_mlp {name} ({jax.device_count()} device(s))", rate, "steps/s") for name, rate in steps.items()]
    gpt_pipeline = batches_per_second(gpt_data, 10 * BATCHES)
    rows.append(
        (
            f"shakespeare_gpt :cpu pipeline (batch {gpt_config.batch_size}x{gpt_config.data.block_size})",
            gpt_pipeline,
            "batches/s",
        )
    )
    rows += [(f"shakespeare_gpt :cpu {name}", rate, "steps/s") for name, rate in gpt_steps.items()]
    rows += [(name, seconds, "s") for name, seconds in missing_error_seconds(data_dir).items()]
    print(f"{'measure':66s} {'value':>10s}")
    for name, value, unit in rows:
        print(f"{name:66s} {value:10.3f} {unit}" if unit == "s" else f"{name:66s} {value:10.0f} {unit}")
    for name, rate in steps.items():
        print(f"in-memory digits pipeline / digits_mlp {name}: {rows[0][1] / rate:.1f}x (bar: 5x)")
    for name, rate in gpt_steps.items():
        print(f"shakespeare_gpt pipeline / its {name}: {gpt_pipeline / rate:.0f}x (bar: 5x)")


if __name__ == "__main__":
    main()
