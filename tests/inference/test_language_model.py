"""Text generation from a trained workdir: a tiny char-level GPT experiment (written here, with the
optional encode_text/decode_tokens hooks) memorizes a sentence and continues a prompt with it."""

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from conftest import ROOT
from research import experiment, sharding, train
from research.inference import export, predict
from research.inference.generate import Sampling

pytestmark = pytest.mark.slow  # trains a small language model first

TINY_LM = textwrap.dedent('''
    """A char GPT that memorizes one repeated sentence (tests only)."""
    import ml_collections
    import optax
    from research import metrics
    from research.config import trainer_config
    from research.data import pipeline, text
    from research.models.gpt import GPT

    TEXT = "to be or not to be, that is the question. " * 60
    TOKENIZER = text.CharTokenizer.from_text(TEXT)

    def get_config(arg=None):
        config = trainer_config()
        config.model = ml_collections.ConfigDict({"num_layers": 2, "width": 32, "block_size": 64})
        config.data = ml_collections.ConfigDict({"length": 32})
        config.update_from_flattened_dict({"num_steps": 150, "batch_size": 16, "eval_batch_size": 16, "eval_every": 0,
                                           "optimizer.learning_rate": 1e-2, "checkpoint.asynchronous": False})
        return config

    def make_data(config, split):
        columns, gather = text.window_columns(TOKENIZER.encode(TEXT), config.data.length, stride=7)
        if split == "train":
            return pipeline.array_batches(columns, batch_size=config.batch_size, seed=config.seed, transform=gather)
        source = [gather({"start": start[None]}) for start in columns["start"][:40]]
        records = [{key: value[0] for key, value in record.items()} for record in source]
        return pipeline.eval_batches(records, batch_size=config.eval_batch_size)

    def make_model(config):
        return GPT(vocab_size=TOKENIZER.vocab_size, block_size=config.model.block_size,
                   num_layers=config.model.num_layers, num_heads=2, width=config.model.width)

    def loss_fn(params, batch, rng, *, model):
        logits = model.apply({"params": params}, batch["inputs"])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean(-1)
        return metrics.masked_mean(nll, batch["mask"]), {}

    def encode_text(config, prompt):
        return TOKENIZER.encode(prompt)

    def decode_tokens(config, ids):
        return TOKENIZER.decode(ids)
''')


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "experiments").mkdir()
    (root / "experiments" / "tiny_lm.py").write_text(TINY_LM)
    module = experiment.load(root / "experiments" / "tiny_lm.py")
    config = module.get_config()
    experiment.claim_workdir(root / "run", "tiny_lm", config)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
    final = train.train_and_evaluate(config, module, root / "run", mesh=mesh)
    return predict.load_run(root / "run", root / "experiments"), final


def test_one_command_generates_text_and_prints_both_rates(lm_run):
    run, _ = lm_run
    root = run.module.__file__.rsplit("/experiments/", 1)[0]
    command = [
        sys.executable,
        "predict.py",
        f"--workdir={root}/run",
        f"--experiments_dir={root}/experiments",
        "--generate=to be or",
        "--num_tokens=24",
        "--temperature=0",
        "--uncached",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "to be or not to be, that is the"
    cached_rate = float(result.stderr.split("24 tokens, ")[1].split(" tokens/s")[0])
    assert cached_rate > 0 and "without it; same text: True" in result.stderr


def test_generates_the_memorized_continuation_with_and_without_the_cache(lm_run):
    run, _ = lm_run
    greedy = predict.generate_text(run, "to be or", 24, Sampling(temperature=0.0))  # within the 32 trained positions
    assert greedy["text"] == " not to be, that is the "
    assert greedy["tokens_per_second"] > 0
    sampled = [
        predict.generate_text(run, "to be", 27, Sampling(0.7, 5, 0.95, seed=1), cached=cached)["text"]
        for cached in (True, False)
    ]
    assert sampled[0] == sampled[1]


def test_generates_past_the_block_size_with_a_sliding_window(lm_run):
    run, _ = lm_run
    assert run.model.block_size == 64
    greedy, sampled = (
        [
            predict.generate_text(run, "to be or", 150, sampling, cached=cached, keep=40)["text"]
            for cached in (True, False)
        ]
        for sampling in (
            Sampling(temperature=0.0),
            Sampling(0.9, 0, 1.0, seed=2),
        )  # 158 positions: the window slides 4 times
    )
    assert len(greedy[0]) == len(sampled[0]) == 150 and greedy[0] == greedy[1] and sampled[0] == sampled[1]
    assert greedy[0][:24] == " not to be, that is the "  # within the trained positions: the memorized sentence


def test_evaluate_reports_perplexity_and_export_carries_the_vocabulary(lm_run, tmp_path):
    run, final = lm_run
    results = predict.evaluate(run, "test")
    assert results["perplexity"] == pytest.approx(np.exp(results["loss"])) and results["loss"] == pytest.approx(
        final["test/loss"], abs=1e-5
    )
    assert results["perplexity"] < 1.5  # memorized: far below the 15-character vocabulary
    manifest = export.export_run(run, tmp_path)
    assert manifest["inputs"] == {"shape": ["batch", 32], "dtype": "int32"}
    assert "".join(manifest["vocabulary"][1:]) == run.module.TOKENIZER.characters
