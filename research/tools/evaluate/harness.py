"""Downstream evaluation with EleutherAI's lm-evaluation-harness, backed by any trained or imported LM run.

  python -m research.data.eval_tasks --output data/evals                  # local tasks, offline
  python -m research.tools.evaluate --workdir runs/lm --tasks shakespeare_next_line,reverse_words \
      --include_path data/evals [--limit 100] [--num_fewshot 0] [--batch_size 16]
  python -m research.tools.evaluate --workdir runs/qwen --tasks hellaswag,arc_easy   # with internet

`RunLM` is a harness model (lm_eval.api.model.TemplateLM) over predict.py's run: `loglikelihood` scores each
continuation's tokens after its context cut from the left to the run's block size, as the harness's `hf` backend
does (tokenized as a whole, the context's tokens split off); `loglikelihood_rolling` scores a text in the harness's
disjoint windows; `generate_until` generates with the KV cache (greedy, or sampled when a task says do_sample) and
cuts the text at the first stop sequence. Requests go longest first in batches padded to one of four lengths per
power of two, so each function compiles a few times. The harness's results JSON goes to
WORKDIR/evals/results_STEP.json (per-sample outputs beside it with --log_samples) and its table to the terminal. An
unknown task, a run that is not a language model, or lm-eval missing is one line. `RunLM` runs on the run's mesh, so
training's evaluations (training.py) use it on the sharded state.
"""

import dataclasses
import functools
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from research import experiment, sharding
from research.errors import ConfigError
from research.experiment import hook
from research.inference.generate import Sampling, generator
from research.inference.predict import Run
from research.state import TrainState
from research.steps import OnMesh, folded

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the harness is the `eval` extra; main() says so in one line
    TemplateLM = object


def check_language_model(run: Run) -> None:
    if not run.is_language_model:
        raise ConfigError(
            f"{run.name} is not a language model (no encode_text/decode_tokens hooks): nothing to evaluate"
        )


class RunLM(TemplateLM):
    """A trained run as an lm-evaluation-harness model (the module docstring), on the run's mesh: batches split
    over its batch axes, the parameters as they are sharded. `at(state)` points it at another state of the same
    run (training's evaluations) without compiling again."""

    def __init__(self, run: Run, batch_size: int = 16, seed: int = 0):
        super().__init__()
        check_language_model(run)
        self.run, self.batch_size, self.seed = run, batch_size, seed
        self.max_length = int(run.example_inputs.shape[-1])
        ends = hook(run.module, "end_ids")
        self.ends = tuple(ends(run.config)) if ends else ()
        self.mesh, self.generators = run.setup.mesh, {}

        def scored(variables, tokens_BxL, targets_BxL):
            logits = experiment.logits_of(run.module, run.model, variables, tokens_BxL)
            log_probabilities = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(log_probabilities, targets_BxL[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(log_probabilities, axis=-1) == targets_BxL

        self._scored = OnMesh(jax.jit(scored, out_shardings=sharding.replicated(self.mesh)), self.mesh)
        if run.state is not None:  # training's evaluator gives each evaluation's state to `at`
            self.at(run.state)

    def at(self, state: TrainState) -> "RunLM":
        """This model with `state`'s parameters (a feature's, LoRA's adapters, folded in for generation)."""
        self.run = dataclasses.replace(self.run, state=state)
        self.generation_params = folded(self.run.config, self.run.params)[1]
        return self

    def _placed(self, rows_BxL: np.ndarray) -> jax.Array:
        """A batch every process holds whole, as one global array split over the mesh's batch axes."""
        count, index = jax.process_count(), jax.process_index()
        local = rows_BxL.reshape(count, -1, *rows_BxL.shape[1:])[index]
        return jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh), local)

    @property
    def eot_token_id(self) -> int:
        return self.ends[0] if self.ends else 0

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return [int(token) for token in self.run.module.encode_text(self.run.config, string)]

    def tok_decode(self, tokens) -> str:
        return self.run.module.decode_tokens(self.run.config, list(tokens))

    def loglikelihood(self, requests, disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # the harness tokenizes with a progress bar

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) per request. Longest first,
        each batch padded by `padded` (at most the block size): few compiles, little padding."""
        windows = [
            (list(context) + list(continuation))[-(self.max_length + 1) :] for _, context, continuation in requests
        ]
        order = sorted(range(len(requests)), key=lambda index: -len(windows[index]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = min(self.max_length, padded(len(windows[rows[0]]) - 1))
            tokens, targets = np.zeros((2, self.batch_size, length), np.int32)
            for row, index in enumerate(rows):
                whole = windows[index]
                tokens[row, : len(whole) - 1], targets[row, : len(whole) - 1] = whole[:-1], whole[1:]
            scored = self._scored(self.run.variables, self._placed(tokens), self._placed(targets))
            picked, greedy = (np.asarray(value) for value in scored)
            for row, index in enumerate(rows):
                last = len(windows[index]) - 1
                first = last - len(requests[index][2])
                results[index] = (float(picked[row, first:last].sum()), bool(greedy[row, first:last].all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        totals = []
        for (text,) in [request.args for request in requests]:
            windows = utils.get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1)
            pairs = [(None, *utils.make_disjoint_window(window)) for window in windows]
            totals.append(sum(value for value, _ in self._loglikelihood_tokens(pairs)))
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation, cut at its first stop sequence; prompts of one length and the same settings
        generate as one batch (one compile per prompt length)."""
        groups: dict[tuple, list[int]] = {}
        prompts, stops = [], []
        for index, (context, settings) in enumerate(request.args for request in requests):
            until = settings.get("until") or []
            stops.append([until] if isinstance(until, str) else list(until))
            new_tokens = int(settings.get("max_gen_toks", 256))
            sampled = settings.get("do_sample", False) and settings.get("temperature", 1.0) > 0
            temperature = float(settings.get("temperature", 1.0)) if sampled else 0.0
            prompts.append(self.tok_encode(context)[-(self.max_length - new_tokens) :])
            groups.setdefault((len(prompts[-1]), new_tokens, temperature), []).append(index)
        outputs = [""] * len(prompts)
        for (_, new_tokens, temperature), rows in groups.items():
            tokens = self._generated(np.asarray([prompts[row] for row in rows], np.int32), new_tokens, temperature)
            for row, ids in zip(rows, tokens):
                text = self.tok_decode(ids.tolist())
                outputs[row] = text[
                    : min([text.find(stop) for stop in stops[row] if stop and stop in text] or [len(text)])
                ]
        return outputs

    def _generated(self, prompts_BxP: np.ndarray, new_tokens: int, temperature: float) -> np.ndarray:
        """New tokens for prompts of one length, by a generator compiled once per shape and settings (kept for the
        evaluations to come), the prompts replicated over the mesh."""
        key = (prompts_BxP.shape, new_tokens, temperature)
        if key not in self.generators:
            sampling = Sampling(temperature, seed=self.seed)
            self.generators[key] = generator(self.run.model, prompts_BxP.shape, new_tokens, sampling)
        prompts = jax.make_array_from_process_local_data(sharding.replicated(self.mesh), prompts_BxP)
        tokens = self.generators[key](self.generation_params, prompts)
        whole = tokens.is_fully_addressable
        return np.asarray(tokens if whole else multihost_utils.process_allgather(tokens, tiled=True))


def padded(count: int) -> int:
    """A batch's length for `count` tokens: at least 16, else the next of four lengths per power of two (16 apart
    from 64 to 128, say): at most a quarter of padding, a few compiled shapes."""
    step = 1 << max((count - 1).bit_length() - 3, 0)
    return max(16, -(-count // step) * step)


def task_manager(tasks: list[str], include_path: str = ""):
    """The harness's TaskManager over `include_path`'s tasks, and its own when `tasks` needs them (indexing them
    takes seconds); an unknown task name is a one-line error."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(task not in manager.all_tasks for task in tasks):
        manager = TaskManager(include_path=include_path or None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = include_path or "no --include_path (local task YAMLs: python -m research.data.eval_tasks)"
        raise ConfigError(f"unknown task {unknown[0]!r}: not a harness task nor one in {where}")
    return manager


def evaluate(model: RunLM, tasks: list[str], directory: str | Path, manager, **options) -> dict:
    """The harness's results of `tasks` (found by `manager`, task_manager's) on `model`, written into `directory` by
    the first process (results_STEP.json, and samples_STEP.json with log_samples); "table" holds the harness's
    table, "samples" the per-sample outputs."""
    from lm_eval import evaluator, utils

    results = evaluator.simple_evaluate(model=model, tasks=tasks, task_manager=manager, **options)
    samples = results.pop("samples", None)
    if jax.process_index() == 0:
        directory, step = Path(directory), model.run.step
        directory.mkdir(parents=True, exist_ok=True)
        as_json = lambda value: json.dumps(value, indent=2, default=utils.handle_non_serializable) + "\n"
        (directory / f"results_{step}.json").write_text(as_json(results))
        if samples is not None:
            (directory / f"samples_{step}.json").write_text(as_json(samples))
    return results | {"table": utils.make_table(results), "samples": samples}


def metrics(results: dict) -> dict[str, float]:
    """The harness's metrics as TASK/METRIC ("acc" under the filter "none", else "METRIC/FILTER"), without their
    standard errors."""
    flat = {}
    for task, values in results["results"].items():
        for key, value in values.items():
            metric, _, applied = key.partition(",")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and applied and not metric.endswith("_stderr"):  # standard errors stay in the results JSON
                flat[f"{task}/{metric}" + ("" if applied == "none" else f"/{applied}")] = float(value)
    return flat


def quiet_harness() -> None:
    """No progress bars and no INFO or WARNING lines from the harness and the datasets library on a healthy run."""
    import datasets
    import lm_eval.api.task
    import tqdm

    # The harness draws a bar while it builds each task's requests; TQDM_DISABLE cannot reach a tqdm that another
    # library imported before it was set (training's process), so the harness's own name for tqdm is bound silent.
    lm_eval.api.task.tqdm = functools.partial(tqdm.tqdm, disable=True)
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
