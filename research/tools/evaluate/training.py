"""Downstream evaluation during training: `config.evals.tasks`, harness tasks run on the training state.

  python -m research.data.eval_tasks --output data/evals
  python launch.py --config experiments/lm.py:cpu --workdir runs/lm --config.evals.tasks=shakespeare_next_line \
      --config.evals.include_path=data/evals --config.evals.limit=100

Every `evals.every` steps (0: at each evaluation, `eval_every`) and at the end, the tasks run on the state being
trained (the parameters' EMA when the optimizer keeps one), on the training mesh: log-likelihood batches split over
its batch axes like evaluation's, the parameters as they are sharded; nothing is saved or reloaded, and the scoring
and generation functions compile once for the whole run. Each task's numbers are logged with the other metrics as
`eval/TASK/METRIC` (metrics.jsonl, TensorBoard, Weights & Biases), so early stopping and `checkpoint.best_metric`
can name them; the harness's results JSON goes to WORKDIR/evals/results_STEP.json. The loop imports this module only
when `evals.tasks` is set: the harness is the `eval` extra.
"""

import os
from pathlib import Path
from types import ModuleType

import jax
import ml_collections
import numpy as np

from research import runtime, sharding
from research.errors import ConfigError
from research.inference.predict import Run
from research.state import TrainState
from research.steps import Setup, with_features


def import_harness() -> None:
    """lm_eval imported without its progress bars and the plugin noise its libraries print on a GPU-less machine; a
    one-line error when it is not installed."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it when it is imported
    with runtime.native_stderr_without(runtime.PLUGIN_NOISE):
        try:
            import lm_eval.evaluator  # noqa: F401
            import lm_eval.tasks  # noqa: F401
        except ImportError:
            raise ConfigError(
                'config.evals.tasks needs the lm-evaluation-harness, which is not installed: pip install -e ".[eval]"'
            ) from None


class DuringTraining:
    """The harness's tasks on a run's training states (the module docstring)."""

    def __init__(self, config: ml_collections.ConfigDict, module: ModuleType, setup: Setup, workdir: str | Path):
        import_harness()
        from research.tools.evaluate import harness

        settings, self.harness = config.evals, harness
        harness.quiet_harness()
        self.tasks = [task for task in settings.tasks.split(",") if task]
        if settings.every < 0 or settings.limit < 0 or settings.batch_size < 1:
            raise ConfigError("config.evals: every and limit must be >= 0 (0: each evaluation, all), batch_size >= 1")
        shards = int(np.lcm(sharding.batch_divisor(setup.mesh), jax.process_count()))
        if settings.batch_size % shards:
            raise ConfigError(
                f"evals.batch_size {settings.batch_size} must be a multiple of the {shards} batch shards of mesh "
                f"{dict(setup.mesh.shape)}"
            )
        self.manager = harness.task_manager(self.tasks, settings.include_path)
        inputs = setup.batch_spec["inputs"]
        predicting = with_features(config, module, setup.mesh, training=False)  # LoRA's adapters, not a teacher
        name = getattr(module, "__name__", type(module).__name__).rpartition(".")[2]
        run = Run(name, predicting, config, setup, None, jax.ShapeDtypeStruct(inputs.shape[1:], inputs.dtype))
        self.model = harness.RunLM(run, settings.batch_size, seed=config.seed)
        self.every = settings.every or config.eval_every
        shots = settings.num_fewshot if settings.num_fewshot >= 0 else None  # -1: each task's own
        self.options = dict(limit=settings.limit or None, num_fewshot=shots)
        self.options |= dict(random_seed=config.seed, numpy_random_seed=config.seed)
        self.directory = Path(workdir) / "evals"

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def __call__(self, state: TrainState) -> dict[str, float]:
        """{"TASK/METRIC": value} of the tasks on `state`; the harness's results JSON written for its step."""
        results = self.harness.evaluate(self.model.at(state), self.tasks, self.directory, self.manager, **self.options)
        return self.harness.metrics(results)
