"""Downstream evaluation with EleutherAI's lm-evaluation-harness, backed by any trained or imported LM run.

  python -m research.data.eval_tasks --output data/evals                  # local tasks, offline
  python -m research.tools.evaluate --workdir runs/lm --tasks shakespeare_next_line,reverse_words \
      --include_path data/evals [--limit 100] [--num_fewshot 0] [--batch_size 16]
  python -m research.tools.evaluate --workdir runs/qwen --tasks hellaswag,arc_easy   # with internet

`RunLM` is a harness model (lm_eval.api.model.TemplateLM) over predict.py's run: `loglikelihood` scores each
continuation's tokens after its context cut from the left to the run's block size, as the harness's `hf` backend
does (tokenized as a whole, the context's tokens split off); `loglikelihood_rolling` scores a text in the harness's
disjoint windows; `generate_until` generates with the KV cache (greedy, or sampled when a task says do_sample) and
cuts the text at the first stop sequence. Requests go longest first in batches padded to a power of two, so each
function compiles a few times. The harness's results JSON goes to WORKDIR/evals/results_STEP.json (per-sample
outputs beside it with --log_samples) and its table to the terminal. An unknown task, a run that is not a language
model, or lm-eval missing is one line.
"""

import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from research.errors import ConfigError
from research.experiment import hook
from research.inference.generate import Sampling, generate
from research.inference.predict import Run

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
    """A trained run as an lm-evaluation-harness model (the module docstring)."""

    def __init__(self, run: Run, batch_size: int = 16, seed: int = 0):
        super().__init__()
        check_language_model(run)
        self.run, self.batch_size, self.seed = run, batch_size, seed
        self.max_length = int(run.example_inputs.shape[-1])
        ends = hook(run.module, "end_ids")
        self.ends = tuple(ends(run.config)) if ends else ()

        def scored(tokens_BxL, targets_BxL):
            log_probabilities = jax.nn.log_softmax(run.logits(tokens_BxL).astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(log_probabilities, targets_BxL[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(log_probabilities, axis=-1) == targets_BxL

        self._scored = jax.jit(scored)

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
        each batch padded to a power of two (at least 16, at most the block size): few compiles, little padding."""
        windows = [
            (list(context) + list(continuation))[-(self.max_length + 1) :] for _, context, continuation in requests
        ]
        order = sorted(range(len(requests)), key=lambda index: -len(windows[index]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = min(self.max_length, max(16, 1 << (len(windows[rows[0]]) - 2).bit_length()))
            tokens, targets = np.zeros((2, self.batch_size, length), np.int32)
            for row, index in enumerate(rows):
                whole = windows[index]
                tokens[row, : len(whole) - 1], targets[row, : len(whole) - 1] = whole[:-1], whole[1:]
            picked, greedy = (np.asarray(value) for value in self._scored(tokens, targets))
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
            batch = np.asarray([prompts[row] for row in rows], np.int32)
            sampling = Sampling(temperature, seed=self.seed)
            for row, ids in zip(rows, generate(self.run.model, self.run.params, batch, new_tokens, sampling)):
                text = self.tok_decode(ids.tolist())
                outputs[row] = text[
                    : min([text.find(stop) for stop in stops[row] if stop and stop in text] or [len(text)])
                ]
        return outputs


def task_manager(tasks: list[str], include_path: str = ""):
    """The harness's TaskManager over its own tasks and `include_path`'s; an unknown task name is a one-line error."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path or None)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        where = include_path or "no --include_path (local task YAMLs: python -m research.data.eval_tasks)"
        raise ConfigError(f"unknown task {unknown[0]!r}: not a harness task nor one in {where}")
    return manager


def evaluate(
    run: Run, tasks: list[str], directory: str | Path, include_path: str = "", batch_size: int = 16, **options
) -> dict:
    """The harness's results of `tasks` on `run`, written into `directory` (results_STEP.json, and samples_STEP.json
    with log_samples); "table" holds the harness's table, "samples" the per-sample outputs."""
    from lm_eval import evaluator, utils

    manager = task_manager(tasks, include_path)
    results = evaluator.simple_evaluate(model=RunLM(run, batch_size), tasks=tasks, task_manager=manager, **options)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    samples = results.pop("samples", None)
    as_json = lambda value: json.dumps(value, indent=2, default=utils.handle_non_serializable) + "\n"
    (directory / f"results_{run.step}.json").write_text(as_json(results))
    if samples is not None:
        (directory / f"samples_{run.step}.json").write_text(as_json(samples))
    return results | {"table": utils.make_table(results), "samples": samples}


def quiet_harness() -> None:
    """No progress bars and no INFO or WARNING lines from the harness and the datasets library on a healthy run."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
