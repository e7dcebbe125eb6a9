"""Direct preference optimisation (Rafailov et al. 2023) of a language model on chat preference pairs.

  python -m research.data.chat_task --output data/reverse      # dpo_{train,test}.jsonl beside the SFT files
  python launch.py --config experiments/lm.py:from=runs/sft --workdir runs/dpo --config.preference.pairs=data/reverse \
      --config.num_steps=200 --config.batch_size=8 --config.optimizer.learning_rate=5e-5 --config.model.block_size=160
Measured (docs/results.md "Preference optimisation"): held-out reward accuracy 0 to 0.9+ in 200 steps.

A feature that wraps the experiment when `preference.pairs` names a directory of dpo_train.jsonl and dpo_test.jsonl
(TRL's conversational format: `prompt` a list of messages, `chosen` and `rejected` the assistant's replies). Each
side is rendered with the chat template (research/data/chat.py: the chat_template.jinja beside the experiment's
tokenizer.json, a chat corpus's, else `preference.chat_template`) and scored on the reply's tokens only:
log pi(reply | prompt), summed. The loss is -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))) plus
sft_weight x the chosen reply's NLL per token (TRL's rpo_alpha), ref the frozen reference's log-probabilities
(`preference.reference`, default the run fine-tuned from, `init_from.workdir`): computed once before training, as
TRL's precompute_ref_log_probs does, so no second model is held while training; with neither they are 0
(reference-free). The chosen side is the batch's `inputs`, `targets` and `weights` (an LM batch: prediction and the
dry run read it as one), the rejected side `rejected_*`. Logged: rewards/chosen and rewards/rejected (beta x the
log-ratios), rewards/margin, rewards/accuracy (the chosen reward above the rejected), logps/*, nll/chosen.
"""

import json
from pathlib import Path
from types import ModuleType
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import experiment, metrics
from research.data import chat, pipeline
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError

FIELDS = ("prompt", "chosen", "rejected")
SIDES = ("chosen", "rejected")
PREFIX = {"chosen": "", "rejected": "rejected_"}  # the chosen side is an LM batch's inputs, targets and weights
SCORED = ("inputs", "targets", "weights")


def read_pairs(path: Path) -> list[dict]:
    """The preference rows of a JSONL file; a row without a prompt, chosen or rejected is a one-line error."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise ConfigError(f"{path}:{number}: not JSON") from None
        missing = [field for field in FIELDS if not isinstance(row, dict) or not row.get(field)]
        if missing:
            raise ConfigError(f"{path}:{number}: a preference row needs {', '.join(FIELDS)}; missing {missing[0]}")
        rows.append(row)
    return rows


class Preference:
    """The experiment trained on preference pairs (the module docstring); every other function and hook is its own."""

    def __init__(self, inner: ModuleType, config: ml_collections.ConfigDict):
        self.inner, self.settings = inner, config.preference
        file = experiment.hook(inner, "tokenizer_file")
        path = Path(file(config)) if file and file(config) else None
        if path is None:
            raise ConfigError("preference.pairs: the experiment reads no tokenizer.json (train it on prepared corpora)")
        self.tokenizer = tokenizer_lib.load(path.parent)
        beside = path.parent / chat.TEMPLATE_FILE
        self.template = beside.read_text() if beside.is_file() else chat.load_template(self.settings.chat_template)
        self.columns: dict[Path, dict[str, np.ndarray]] = {}  # per file: validation and test read the same one

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)
        if name in ("flops_per_example", "tokens_per_example"):  # an example is a pair: two sequences
            return lambda config: 2 * value(config)
        return value

    def make_data(self, config: ml_collections.ConfigDict, split: str):
        """Training batches of the pairs in dpo_train.jsonl, or one pass over dpo_test.jsonl."""
        path = Path(self.settings.pairs) / f"dpo_{'train' if split == 'train' else 'test'}.jsonl"
        if not path.is_file():
            raise ConfigError(f"preference.pairs: no {path} (python -m research.data.chat_task makes an example)")
        if path not in self.columns:  # encoded and scored by the reference once per file
            self.columns[path] = self.scored(config, path)
        columns = self.columns[path]
        count = len(columns["inputs"])
        if split == "train":
            return pipeline.array_batches(columns, batch_size=config.batch_size, seed=config.seed)
        examples = [{name: value[i] for name, value in columns.items()} for i in range(count)]
        return pipeline.eval_batches(examples, batch_size=config.eval_batch_size)

    def scored(self, config: ml_collections.ConfigDict, path: Path) -> dict[str, np.ndarray]:
        """The file's pairs encoded, with the settings and the reference's log-probabilities beside them."""
        length = experiment.hook(self.inner, "tokens_per_example")  # a sequence's tokens: the window a pair fills
        if length is None:
            raise ConfigError("preference.pairs: the experiment has no tokens_per_example hook (its sequence length)")
        columns = self.encode(read_pairs(path), length(config))
        count = len(columns["inputs"])
        columns |= {"beta": np.full(count, self.settings.beta, np.float32)}
        columns |= {"sft_weight": np.full(count, self.settings.sft_weight, np.float32)}
        return columns | reference_logps(config, self.inner, columns)

    def encode(self, rows: list[dict], length: int) -> dict[str, np.ndarray]:
        """Each side's inputs, targets and weights (its reply's tokens), padded to `length` + 1 tokens."""
        special = {"eos_token": self.tokenizer.token(self.tokenizer.eos_id)}
        columns = {f"{PREFIX[side]}{key}": [] for side in SIDES for key in SCORED}
        for index, row in enumerate(rows):
            for side in SIDES:
                messages = list(row["prompt"]) + list(row[side])
                ids, mask = chat.encode(self.tokenizer, self.template, messages, index=index, last_turn=True, **special)
                if len(ids) > length + 1:
                    raise ConfigError(
                        f"pair {index}'s {side} conversation is {len(ids)} tokens, over {length} + 1: raise the "
                        "experiment's sequence length (lm: model.block_size)"
                    )
                window, weights = np.zeros(length + 1, np.int32), np.zeros(length + 1, np.float32)
                window[: len(ids)], weights[: len(ids)] = ids, mask
                columns[f"{PREFIX[side]}inputs"].append(window[:-1])
                columns[f"{PREFIX[side]}targets"].append(window[1:])
                columns[f"{PREFIX[side]}weights"].append(weights[1:])
        return {name: np.stack(values) for name, values in columns.items()}

    def terms(self, params, batch, model) -> dict[str, jax.Array]:
        """Per pair: the loss, rewards and log-probabilities (`dpo_terms`) of the policy's replies, both sides in one
        forward pass."""
        stacked = {key: jnp.concatenate([batch[f"{PREFIX[side]}{key}"] for side in SIDES]) for key in SCORED}
        logps = sequence_logps(self.inner, model, {"params": params}, *(stacked[key] for key in SCORED))
        chosen, rejected = jnp.split(logps, 2)
        return dpo_terms(chosen, rejected, batch)

    def loss_fn(self, params, batch, rng, *, model):
        terms, mask = self.terms(params, batch, model), batch["mask"]
        return metrics.masked_mean(terms.pop("loss"), mask), {k: metrics.masked_mean(v, mask) for k, v in terms.items()}

    def eval_fn(self, params, batch, *, model) -> dict[str, metrics.Metric]:
        return {
            name: metrics.Mean.from_values(v, batch["mask"]) for name, v in self.terms(params, batch, model).items()
        }


def sequence_logps(module, model, variables, inputs_BxL, targets_BxL, weights_BxL) -> jax.Array:
    """Each row's summed log-probability of its weighted targets (the experiment's logits, in float32)."""
    logits_BxLxV = experiment.logits_of(module, model, variables, inputs_BxL).astype(jnp.float32)
    logps_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV), targets_BxL[..., None], axis=-1)[..., 0]
    return jnp.sum(logps_BxL * weights_BxL, axis=-1)


def dpo_terms(chosen: jax.Array, rejected: jax.Array, batch) -> dict[str, jax.Array]:
    """The loss (DPO's, plus sft_weight x the chosen reply's NLL per token), each side's reward (beta x its
    log-ratio to the reference) and log-probability, from the policy's summed reply log-probabilities; the batch
    carries beta, sft_weight and the reference's log-probabilities."""
    rewards = {
        side: batch["beta"] * (value - batch[f"reference_{side}"]) for side, value in zip(SIDES, (chosen, rejected))
    }
    margin = rewards["chosen"] - rewards["rejected"]
    nll = -chosen / jnp.maximum(jnp.sum(batch["weights"], axis=-1), 1.0)
    return {
        "loss": -jax.nn.log_sigmoid(margin) + batch["sft_weight"] * nll,
        "nll/chosen": nll,
        "rewards/chosen": rewards["chosen"],
        "rewards/rejected": rewards["rejected"],
        "rewards/margin": margin,
        "rewards/accuracy": (margin > 0).astype(jnp.float32),
        "logps/chosen": chosen,
        "logps/rejected": rejected,
    }


def reference_logps(config, module: ModuleType, columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference run's summed reply log-probabilities of each side (zeros without a reference)."""
    workdir = config.preference.reference or config.init_from.workdir
    count = len(columns["inputs"])
    if not workdir:
        return {f"reference_{side}": np.zeros(count, np.float32) for side in SIDES}
    from absl import logging

    from research.inference import predict

    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax warns that it opens the reference's checkpoints read-only
    try:
        run = predict.load_run(workdir, Path(module.__file__).parent)
    finally:
        logging.set_verbosity(verbosity)
    score = jax.jit(lambda variables, *scored: sequence_logps(run.module, run.model, variables, *scored))
    result = {}
    for side in SIDES:
        parts = [
            score(run.variables, *(columns[f"{PREFIX[side]}{key}"][start : start + 64] for key in SCORED))
            for start in range(0, count, 64)
        ]
        result[f"reference_{side}"] = np.concatenate([np.asarray(part) for part in parts]).astype(np.float32)
    return result


def wrap(config: ml_collections.ConfigDict, inner: ModuleType) -> Preference:
    """The experiment trained on the preference pairs `config.preference` names."""
    return Preference(inner, config)
