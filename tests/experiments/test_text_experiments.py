"""Smoke runs of the text experiments through train_and_evaluate: the numbers they promise.

Reference points for character models on Tiny Shakespeare (66 symbols with padding): a uniform
guess scores ln 66 = 4.19 nats, the character frequencies alone 3.31, and always guessing the
most frequent character (space) is right 15.3% of the time.
"""

import math

import jax
import numpy as np
import pytest

from conftest import assert_trees_close, train_losses
from experiments import bert_finetune, bert_pretrain, shakespeare_gpt, shakespeare_lstm
from research import sharding, train, trained_run
from research.data import mlm, pipeline, text
from research.errors import ConfigError
from research.optim import make_tx

UNIGRAM_ENTROPY = 3.31
SPACE_FREQUENCY = 0.153


def smoke_run(module, data_dir, workdir, **overrides):
    config = module.get_config("smoke")
    config.data_dir = data_dir
    config.update_from_flattened_dict(overrides)
    mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])  # what is tested does not depend on the mesh
    return train.train_and_evaluate(config, module, workdir, mesh=mesh)


@pytest.mark.parametrize("name", ["shakespeare_gpt", "shakespeare_lstm"])
def test_char_language_model_smoke_learns_beyond_character_frequencies(name, smoke_runs):
    workdir, final = smoke_runs[name]
    losses = train_losses(workdir)
    assert losses[0] > 3.3 and losses[-1] < 2.9  # measured: gpt 3.52 -> 2.79, lstm 3.69 -> 2.36
    assert final["eval/loss"] < UNIGRAM_ENTROPY - 0.3  # measured: gpt 2.87, lstm 2.45
    assert final["eval/perplexity"] == pytest.approx(math.exp(final["eval/loss"]), rel=1e-4)
    assert final["eval/accuracy"] > SPACE_FREQUENCY


@pytest.mark.slow
def test_lstm_gru_option_learns(data_dir, tmp_path):
    final = smoke_run(shakespeare_lstm, data_dir, tmp_path, **{"model.cell": "gru"})
    assert final["eval/loss"] < UNIGRAM_ENTROPY - 0.3


def test_gpt_evaluation_scores_every_validation_character_once(data_dir):
    config = shakespeare_gpt.get_config("cpu")
    config.data_dir = data_dir
    batches = list(shakespeare_gpt.make_data(config, "validation"))
    scored = sum(int(batch["mask"].sum()) * config.data.block_size for batch in batches)
    assert scored == 871 * 64  # the 55,770 characters hold 871 windows of 64 plus their last target; 25 are left over
    first = batches[0]
    np.testing.assert_array_equal(first["inputs"][1, 1:], first["targets"][1, :-1])
    np.testing.assert_array_equal(first["inputs"][1, 0], first["targets"][0, -1])  # windows are contiguous


@pytest.fixture(scope="module")
def pretrained(smoke_runs):
    """(final metrics, workdir) of bert_pretrain's smoke run."""
    workdir, final = smoke_runs["bert_pretrain"]
    return final, workdir


def test_bert_pretrain_smoke_loss_falls(pretrained):
    final, workdir = pretrained
    losses = train_losses(workdir)
    uniform = math.log(302)  # 300 sentencepiece pieces plus [MASK] and [CLS]
    assert losses[0] > uniform - 0.3 and losses[-1] < uniform - 0.4  # measured: 5.59 -> 5.23 (uniform 5.71)
    assert final["eval/loss"] < uniform - 0.4  # measured: 5.21


def test_pretraining_text_holds_no_held_out_speech(data_dir):
    corpus = "".join(text.split_text("tiny_shakespeare", split, data_dir) for split in ("train", "validation", "test"))
    kept = mlm.without_held_out_speeches(corpus, data_dir)
    held_out = [
        record["text"].decode()
        for split in ("validation", "test")
        for record in pipeline.tfds_source("shakespeare_speakers", split, data_dir=data_dir)
    ]
    long_ones = [speech for speech in held_out if len(speech) > 200]  # long enough not to recur by chance
    assert 0.95 * len(corpus) < len(kept) < 0.98 * len(corpus)
    assert sum(speech in corpus for speech in long_ones) == len(long_ones) > 50
    assert sum(speech in kept for speech in long_ones) == 0


def test_mlm_pretraining_masks_never_insert_padding_or_special_tokens(data_dir):
    config = bert_pretrain.get_config("smoke")
    config.data_dir = data_dir
    ids = mlm.special_ids(config)
    assert ids["reserved"] == (0, 1, 2, 3) and (ids["mask"], ids["cls"], ids["vocab_size"]) == (300, 301, 302)
    tokens = mlm.split_tokens(config, "train")
    batch = mlm.masked_windows(tokens, np.arange(0, 64000, 100), length=32, seed=0, ids=ids)
    changed = batch["inputs"][(batch["inputs"] != batch["targets"]) & (batch["inputs"] != ids["mask"])]
    assert len(changed) > 100 and changed.min() >= 4 and changed.max() < 300
    assert (batch["inputs"] == text.PAD_ID).sum() == 0 and (batch["inputs"][:, 0] == ids["cls"]).all()


@pytest.mark.slow
def test_next_sentence_pairs_differ_only_in_what_b_says(data_dir):
    config = bert_pretrain.get_config("smoke")
    config.data_dir, config.model.next_sentence = data_dir, True
    ids = mlm.special_ids(config)
    assert (ids["sep"], ids["vocab_size"]) == (302, 303)
    tokens = mlm.split_tokens(config, "train")
    newline = int(mlm.encode(config, "\n")[0])
    starts = np.arange(0, 60000, 97)
    pairs = mlm.sentence_pairs(tokens, starts, length=32, seed=0, ids=ids, newline=newline, rate=0.15)
    assert 0.45 < pairs["next_label"].mean() < 0.55 and pairs["targets"].shape == (len(starts), 32)
    for start, targets, segments, label in zip(starts, pairs["targets"], pairs["segments"], pairs["next_label"]):
        seps = np.flatnonzero(targets == ids["sep"])
        assert targets[0] == ids["cls"] and seps[-1] == 31 and len(seps) == 2
        a, b = targets[1 : seps[0]], targets[seps[0] + 1 : 31]
        assert np.array_equal(a, tokens[start : start + len(a)]) and (segments == (np.arange(32) > seps[0])).all()
        b_start = (
            start + len(a)
            if label
            else next(i for i in np.flatnonzero(tokens == b[0]) if np.array_equal(tokens[i : i + len(b)], b))
        )
        assert np.array_equal(tokens[b_start : b_start + len(b)], b)
        assert tokens[b_start - 1] == newline or newline not in a  # B starts a line in both cases, if A ends one
        assert label or abs(b_start - start) >= mlm.NEXT_SENTENCE_MIN_DISTANCE
    assert (pairs["weights"][pairs["targets"] == ids["sep"]] == 0).all() and (
        pairs["weights"].sum(1) == round(0.15 * 29)
    ).all()


def test_bert_finetune_optimizer_scales_only_the_encoders_steps():
    config = bert_finetune.get_config("cpu")
    config.optimizer.kwargs.scale = 0.1
    config.optimizer.weight_decay = 0.0
    tx = make_tx(config)
    params = {"encoder": {"kernel": np.ones(3, np.float32)}, "classifier": {"kernel": np.ones(3, np.float32)}}
    grads = {
        "encoder": {"kernel": np.array([1.0, -2.0, 3.0], np.float32)},
        "classifier": {"kernel": np.array([-1.0, 5.0, 0.5], np.float32)},
    }
    # Adam's step is -lr * sign(g) while the gradient is constant; warm-up's first rate is 0, so take the second.
    _, state = tx.update(grads, tx.init(params), params)
    updates, _ = tx.update(grads, state, params)
    ratio = np.asarray(updates["encoder"]["kernel"]) / np.sign(grads["encoder"]["kernel"])
    head = np.asarray(updates["classifier"]["kernel"]) / np.sign(grads["classifier"]["kernel"])
    np.testing.assert_allclose(ratio, 0.1 * head, rtol=1e-5)
    assert config.optimizer.schedule.warmup_steps == 25
    assert head[0] < 0 and abs(head[0]) == pytest.approx(
        config.optimizer.learning_rate / 25, rel=1e-4
    )  # warm-up's step 1 of 25


def test_bert_finetune_smoke_starts_from_the_pretrained_encoder(pretrained, data_dir, tmp_path, capsys):
    _, pretrain_dir = pretrained
    smoke_run(bert_finetune, data_dir, tmp_path, **{"init_from.workdir": str(pretrain_dir)})
    assert (
        "left at random init: classifier/bias, classifier/kernel, pooler/bias, pooler/kernel\n"
        in capsys.readouterr().out
    )
    losses = train_losses(tmp_path)
    assert losses[0] > math.log(8) - 0.1 and losses[-1] < losses[0] - 0.3  # measured: 2.08 -> 1.56 on its 64 speeches


def test_bert_finetune_cloze_head_starts_from_the_whole_pretrained_model(pretrained, data_dir, tmp_path, capsys):
    _, pretrain_dir = pretrained
    smoke_run(bert_finetune, data_dir, tmp_path, **{"init_from.workdir": str(pretrain_dir), "model.head": "cloze"})
    assert "left at random init: none\n" in capsys.readouterr().out  # no layer of the classifier is new
    losses = train_losses(tmp_path)
    assert losses[0] > math.log(8) - 0.3 and losses[-1] < losses[0] - 0.3


def test_bert_finetune_reads_the_acceptability_lines(data_dir):
    config = bert_finetune.get_config("smoke")
    config.data_dir, config.data.name = data_dir, "shakespeare_acceptability"
    assert bert_finetune.class_names(config) == ["corrupted", "original"]
    batch = next(iter(bert_finetune.make_data(config, "validation")))
    ids = mlm.special_ids(config)
    assert (batch["inputs"][:, 0] == ids["cls"]).all() and set(batch["labels"].tolist()) == {0, 1}
    lengths = (batch["inputs"] != text.PAD_ID).sum(1)
    assert 6 <= lengths.min() and lengths.max() <= config.model.max_length  # [CLS] + a line of at least 5 words
    config.model.head = "cloze"
    with pytest.raises(ConfigError, match="model.head=cloze reads a speaker's name"):
        bert_finetune.make_model(config)


def test_bert_finetune_frozen_encoder_keeps_the_pretrained_weights(pretrained, data_dir, tmp_path):
    _, pretrain_dir = pretrained
    overrides = {"init_from.workdir": str(pretrain_dir), "freeze": "^encoder/", "num_steps": 10}
    smoke_run(bert_finetune, data_dir, tmp_path, **overrides)
    pretrained_params, _ = trained_run.load_params(pretrain_dir)
    finetuned_params, _ = trained_run.load_params(tmp_path)
    assert_trees_close(finetuned_params["encoder"], pretrained_params["encoder"], atol=0.0)
    assert np.abs(finetuned_params["classifier"]["kernel"]).sum() > 0
