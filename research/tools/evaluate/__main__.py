"""`python -m research.tools.evaluate`: the lm-evaluation-harness on a run (research/tools/evaluate/harness.py)."""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the harness's progress bars: tqdm reads it when it is imported

from research import runtime  # noqa: E402

runtime.configure_process()  # as launch.py: XLA flags, the allocator and a quiet start, before JAX starts

with runtime.native_stderr_without(runtime.PLUGIN_NOISE):  # the harness loads libraries that log on a GPU-less machine
    try:
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401

        INSTALLED = True
    except ImportError:
        INSTALLED = False  # main() says so in one line

from research import errors  # noqa: E402
from research.errors import ConfigError  # noqa: E402
from research.inference.predict import load_run  # noqa: E402
from research.tools.evaluate import harness as evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m research.tools.evaluate", description=evaluate.__doc__.splitlines()[0]
    )
    parser.add_argument("--workdir", required=True, help="the run: trained, or imported with research.tools.hf")
    parser.add_argument("--tasks", required=True, help="harness task names, comma-separated")
    parser.add_argument("--include_path", default="", help="a directory of local task YAMLs (research.data.eval_tasks)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many examples per task")
    parser.add_argument("--num_fewshot", type=int, default=None, help="solved examples before each (task's default)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--log_samples", action="store_true", help="also write every example's requests and outputs")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    with errors.exit_on_error():
        if not INSTALLED:
            raise ConfigError('the lm-evaluation-harness is not installed: pip install -e ".[eval]"')
        evaluate.quiet_harness()
        tasks = [task for task in arguments.tasks.split(",") if task]
        manager = evaluate.task_manager(tasks, arguments.include_path)  # an unknown name stops here, before loading
        run = load_run(arguments.workdir)
        evaluate.check_language_model(run)
        print(f"lm-evaluation-harness on {run.name} step {run.step} in {arguments.workdir}: {', '.join(tasks)}")
        options = dict(num_fewshot=arguments.num_fewshot, log_samples=arguments.log_samples, limit=arguments.limit)
        options |= dict(random_seed=arguments.seed, numpy_random_seed=arguments.seed)
        directory = Path(arguments.workdir) / "evals"
        model = evaluate.RunLM(run, arguments.batch_size, arguments.seed)
        results = evaluate.evaluate(model, tasks, directory, manager, **options)
        print(results["table"] + f"results in {directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
