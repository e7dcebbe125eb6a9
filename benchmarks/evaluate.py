"""Log-likelihood requests per second: our lm-evaluation-harness backend (research/tools/evaluate/harness.py) against
the harness's own `hf` backend (transformers, PyTorch) on the same checkpoint, on this CPU.

  python -m research.data.eval_tasks --output /tmp/evals
  python benchmarks/evaluate.py --workdir runs/lm --include_path /tmp/evals [--limit 200 --repeats 3]

The run is exported to a Hugging Face checkpoint (research/tools/hf export) for the `hf` backend; both score the
same task's requests (shakespeare_next_line: 4 choices per example) at the same batch size and maximum length, in
float32, timed interleaved (each repeat runs each backend in turn, who goes first alternating); medians.
Expected on the 2-core VM (docs/inference.md, 2026-12-07): see the table there.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TQDM_DISABLE", "1")

from research import runtime  # noqa: E402

runtime.configure_process()

import torch  # noqa: E402
from lm_eval import evaluator  # noqa: E402

from research.inference.predict import load_run  # noqa: E402
from research.tools.evaluate import harness  # noqa: E402


def timed(model, tasks, manager, limit, **options) -> tuple[float, int]:
    """(seconds, requests) of one evaluation."""
    start = time.perf_counter()
    results = evaluator.simple_evaluate(model=model, tasks=tasks, task_manager=manager, limit=limit, **options)
    requests = sum(len(sample["resps"]) for samples in results["samples"].values() for sample in samples)
    return time.perf_counter() - start, requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--include_path", required=True)
    parser.add_argument("--tasks", default="shakespeare_next_line")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    harness.quiet_harness()
    torch.set_num_threads(os.cpu_count() or 1)
    tasks = arguments.tasks.split(",")
    manager = harness.task_manager(tasks, arguments.include_path)
    run = load_run(arguments.workdir)
    ours = harness.RunLM(run, arguments.batch_size)
    with tempfile.TemporaryDirectory() as exported:
        command = [sys.executable, "-m", "research.tools.hf", "export", arguments.workdir, exported]
        subprocess.run(command, check=True, capture_output=True)
        length = run.example_inputs.shape[-1]
        theirs = f"pretrained={exported},dtype=float32,max_length={length},prefix_token_id={ours.prefix_token_id}"
        options = dict(batch_size=arguments.batch_size, log_samples=True, device="cpu")
        timed(ours, tasks, manager, arguments.limit, log_samples=True)  # every batch shape compiled: speed alone
        times = {"ours (JAX)": [], "hf (transformers)": []}
        for repeat in range(arguments.repeats):
            order = list(times) if repeat % 2 == 0 else list(times)[::-1]
            for name in order:
                if name.startswith("ours"):
                    seconds, requests = timed(ours, tasks, manager, arguments.limit, log_samples=True)
                else:
                    seconds, requests = timed("hf", tasks, manager, arguments.limit, model_args=theirs, **options)
                times[name].append(requests / seconds)
    print(f"{run.name} step {run.step}, {arguments.tasks}, {requests} requests, batch {arguments.batch_size}")
    print("| backend | log-likelihood requests/s (median) | ratio |")
    print("| --- | --- | --- |")
    base = statistics.median(times["hf (transformers)"])
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
