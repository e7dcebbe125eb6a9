"""Streaming prepared corpora: every window once per epoch, the same global batches for any process count, exact
resume, mixtures at their weights, and documents that neither attention nor the loss crosses."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, assert_trees_close, restored_state, train_losses
from experiments import lm
from research import metrics, train
from research.data import pipeline, prepare, stream


def make_corpus(directory, letter: str, documents: int, seed: int = 0, files: int = 1) -> stream.Corpus:
    """`documents` paragraphs of `letter` (5 to 60 of it), in `files` files, prepared with the bytes tokenizer."""
    rng = np.random.default_rng(seed)
    raw = directory / "raw"
    raw.mkdir(parents=True)
    for index in range(files):
        paragraphs = [letter * int(rng.integers(5, 60)) for _ in range(documents // files)]
        (raw / f"part{index}.txt").write_text("\n\n".join(paragraphs))
    arguments = ["--input", str(raw / "*.txt"), "--output", str(directory / "prepared"), "--tokenizer=bytes"]
    assert prepare.main([*arguments, "--documents=paragraph", "--validation_fraction=0.1"]) == 0
    return stream.Corpus.open(directory / "prepared")


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {letter: make_corpus(root / letter, letter, 600, files=3) for letter in "ab"}


def test_every_window_once_per_epoch_in_a_fresh_order(corpora):
    windows = stream.Windows(corpora["a"], "train", 16, seed=0)
    counts = windows.counts
    assert len(counts) == 3 and windows.total == counts.sum()
    everything = {(shard, window * 16) for shard in range(3) for window in range(counts[shard])}
    epochs = [windows.locate(np.arange(epoch * windows.total, (epoch + 1) * windows.total)) for epoch in (0, 1)]
    for shards, starts in epochs:
        assert set(zip(shards.tolist(), starts.tolist())) == everything and len(shards) == len(everything)
    assert not np.array_equal(epochs[0][1], epochs[1][1])
    again = stream.Windows(corpora["a"], "train", 16, seed=0).locate(np.arange(windows.total))
    assert np.array_equal(again[1], epochs[0][1])


def test_two_processes_read_the_two_halves_of_the_global_batch(corpora):
    def load(process):
        windows = stream.Windows(corpora["a"], "train", 16, seed=3)
        return stream.LoadBatch([windows], [1.0], 8, segment_ids=True, process=process)

    whole = load(pipeline.Process(0, 1))(11)
    halves = [load(pipeline.Process(index, 2))(11) for index in (0, 1)]
    for key in whole:
        assert np.array_equal(np.concatenate([half[key] for half in halves]), whole[key]), key


def test_a_mixture_delivers_its_weights(corpora):
    windows = [stream.Windows(corpora[letter], "train", 16, seed=k) for k, letter in enumerate("ab")]
    load = stream.LoadBatch(windows, [0.7, 0.3], 8, segment_ids=False, process=pipeline.Process(0, 1))
    a_id = ord("a") + 1  # bytes: id = byte + 1
    rows_from_a = sum(int(np.any(load(batch)["inputs"] == a_id, axis=1).sum()) for batch in range(10_000))
    assert abs(rows_from_a / 80_000 - 0.7) < 0.01


def test_the_iterator_state_resumes_exactly(corpora):
    spec = f"{corpora['a'].directory}:2,{corpora['b'].directory}:1"
    batches = iter(stream.train_batches(spec, length=16, batch_size=4, seed=0, segment_ids=True))
    for _ in range(5):
        next(batches)
    state = batches.get_state()
    expected = [next(batches) for _ in range(3)]
    resumed = iter(stream.train_batches(spec, length=16, batch_size=4, seed=0, segment_ids=True))
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[key], want[key]) for key in want)


def test_neither_attention_nor_the_loss_crosses_a_document(corpora):
    load = stream.LoadBatch([stream.Windows(corpora["a"], "train", 64, seed=0)], [1.0], 2, segment_ids=True)
    batch = load(0)
    eos = corpora["a"].eos_id
    ended = batch["inputs"] == eos
    assert ended[0].any() and np.array_equal(batch["weights"] == 0, ended)  # the target after an end is not scored
    assert np.array_equal(np.diff(batch["segment_ids"], axis=1) == 1, ended[:, :-1])  # a new document after an end
    config = lm.get_config("smoke")
    config.model.vocab_size = corpora["a"].vocab_size
    model = lm.make_model(config)
    params = model.init(jax.random.PRNGKey(0), jnp.asarray(batch["inputs"]))["params"]
    first = batch["segment_ids"][0] == 1
    changed = batch["inputs"].copy()
    changed[0, first & ~ended[0]] = ord("z") + 1  # another first document
    later = ~first
    for segments, crosses in ((batch["segment_ids"], False), (None, True)):
        logits = [
            model.apply({"params": params}, jnp.asarray(x), segment_ids_BxL=segments)
            for x in (batch["inputs"], changed)
        ]
        moved = float(jnp.max(jnp.abs(logits[0][0, later] - logits[1][0, later])))
        assert (moved > 1e-3) if crosses else (moved < 1e-5), (segments is None, moved)
    logits = model.apply({"params": params}, jnp.asarray(batch["inputs"]), segment_ids_BxL=batch["segment_ids"])
    other_targets = dict(batch, targets=np.where(ended, ord("z") + 1, batch["targets"]))
    assert float(metrics.next_token_loss(logits, batch)[0]) == float(metrics.next_token_loss(logits, other_targets)[0])


def shakespeare(tmp_path, tokenizer: str = "bytes") -> str:
    """The shipped Tiny Shakespeare text prepared as paragraphs (the docs' example, with a smaller BPE)."""
    arguments = ["--input", str(ROOT / "research/data/bundled/tiny_shakespeare/input.txt"), f"--tokenizer={tokenizer}"]
    assert prepare.main([*arguments, "--documents=paragraph", "--output", str(tmp_path / "corpus")]) == 0
    return str(tmp_path / "corpus")


@pytest.mark.slow
def test_a_resumed_run_trains_on_exactly_the_batches_of_an_uninterrupted_one(tmp_path):
    config = lm.get_config("smoke")
    config.data.update({"prepared": shakespeare(tmp_path, "bpe:512"), "segment_ids": True})
    config.update_from_flattened_dict({"num_steps": 12, "checkpoint.every_steps": 0, "eval_every": 0, "log_every": 1})
    train.train_and_evaluate(config, lm, tmp_path / "straight")
    train.train_and_evaluate(config, lm, tmp_path / "resumed", stop_at_step=7)
    train.train_and_evaluate(config, lm, tmp_path / "resumed")
    states = [restored_state(tmp_path / name, 12) for name in ("straight", "resumed")]
    assert_trees_close(states[1], states[0], atol=0.0)
    losses = train_losses(tmp_path / "straight")
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    corpus = shakespeare(tmp_path)
    losses = {}
    for name, devices, extra in (("one", 8, []), ("two", 4, ["--local_processes=2"])):
        environment = dict(
            os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu"
        )
        command = [sys.executable, "launch.py", "--config=experiments/lm.py:smoke", f"--workdir={tmp_path / name}"]
        command += [f"--config.data.prepared={corpus}", "--config.num_steps=5", "--config.log_every=1", *extra]
        result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [record["train/loss"] for record in records if "train/loss" in record]
    assert len(losses["one"]) == 5
    np.testing.assert_allclose(losses["two"], losses["one"], atol=1e-5)
