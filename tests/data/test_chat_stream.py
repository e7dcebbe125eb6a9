"""Chat corpora: prepared with a template (each conversation's ids and its assistant mask, as research.data.chat
encodes it), streamed as packs of whole conversations whose weights are that mask, every pack once per epoch."""

import json

import numpy as np
import pytest

from research.data import chat, chat_task, prepare, stream

LENGTH = 128


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The bundled reversal task's first 600 conversations, prepared with ChatML and a 600-id BPE."""
    root = tmp_path_factory.mktemp("chat")
    chat_task.make(root / "task", train=600, test=20)
    arguments = ["--input", str(root / "task" / "sft_train.jsonl"), "--output", str(root / "prepared")]
    assert prepare.main([*arguments, "--tokenizer=bpe:600", "--chat_template=chatml", "--validation_fraction=0.1"]) == 0
    conversations = [json.loads(line)["messages"] for line in (root / "task" / "sft_train.jsonl").open()]
    return stream.Corpus.open(root / "prepared"), conversations


def test_pack_takes_whole_documents_and_cuts_only_a_longer_one():
    starts, sizes = stream.pack(np.array([3, 4, 10, 2, 2, 6]), capacity=6)
    assert starts.tolist() == [0, 3, 7, 17, 21] and sizes.tolist() == [3, 4, 6, 4, 6]


def test_each_record_is_the_conversations_ids_and_assistant_mask(prepared):
    corpus, conversations = prepared
    tokenizer, template = corpus.tokenizer(), (corpus.directory / chat.TEMPLATE_FILE).read_text()
    assert template == chat.TEMPLATES["chatml"]
    splits = {split: np.flatnonzero(corpus.document_lengths(split, 0) >= 0) for split in prepare.SPLITS}
    assert sum(len(rows) for rows in splits.values()) == len(conversations)
    cache = stream.ShardCache()
    ids, mask = cache.stream(corpus, "train", 0), cache.loss_mask(corpus, "train", 0)
    train = [c for i, c in enumerate(conversations) if not prepare.is_validation(0, i, 0.1)]
    offset = 0
    for messages, length in zip(train, corpus.document_lengths("train", 0)):
        expected_ids, expected_mask = chat.encode(tokenizer, template, messages, eos_token="<|endoftext|>")
        np.testing.assert_array_equal(ids[offset : offset + length], expected_ids)
        np.testing.assert_array_equal(mask[offset : offset + length], expected_mask)
        assert ids[offset + length] == corpus.eos_id and mask[offset + length] == 0
        offset += length + 1
    assert offset == len(ids)
    assert corpus.manifest["splits"]["train"]["assistant_tokens"] == int(mask.sum())


def test_an_epoch_of_packs_holds_every_conversation_once_and_weighs_only_the_answers(prepared):
    corpus, _ = prepared
    tokenizer = corpus.tokenizer()
    windows = stream.Windows(corpus, "train", LENGTH, seed=0)
    load = stream.LoadBatch([windows], [1.0], batch_size=windows.total, segment_ids=True)
    batch = load(0)  # one epoch: every pack once, in the seed's order
    lengths = corpus.document_lengths("train", 0)
    seen, answers = [], 0
    sizes = windows.spans(np.arange(windows.total))[2]  # the batch's windows, in order
    for inputs, targets, segments, weights, size in zip(
        batch["inputs"], batch["targets"], batch["segment_ids"], batch["weights"], sizes
    ):
        window = np.append(inputs, targets[-1])[:size]
        assert np.all(segments[: size - 1] > 0) and not np.any(segments[size:])
        ends = np.flatnonzero(window == corpus.eos_id)
        seen += np.diff(ends, prepend=-1).tolist()  # each conversation with its end-of-document id
        if not len(ends) or ends[-1] != len(window) - 1:  # a longer conversation, cut, alone in its window
            assert not len(ends) and len(window) == LENGTH + 1
            seen.append(LENGTH + 1)
        assert not np.any(weights[segments == 0]) and not np.any(weights[inputs == corpus.eos_id])
        text = tokenizer.decode(targets[weights > 0])
        answers += text.count("<|im_end|>")
        assert "<|im_start|>" not in text and "user" not in text
    assert sorted(seen) == sorted(min(int(n) + 1, LENGTH + 1) for n in lengths)
    assert len(batch["inputs"]) < len(lengths)  # several conversations share a window
    assert answers > len(lengths)  # every answer, two in the two-round conversations


def test_validation_packs_are_read_in_order_with_their_masks(prepared):
    corpus, _ = prepared
    validation = stream.EvalWindows(stream.Windows(corpus, "validation", 2 * LENGTH, seed=0, shuffle=False), True)
    mask = stream.ShardCache().loss_mask(corpus, "validation", 0)
    weighted = sum(float(validation[i]["weights"].sum()) for i in range(len(validation)))
    assert weighted == float(mask.sum())  # none of its conversations is longer than 256


def test_a_conversation_without_an_answer_stops_preparation_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    arguments = ["--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "out"), "--tokenizer=bytes"]
    assert prepare.main([*arguments, "--chat_template=chatml"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: conversation 0 has no assistant turn") and "\n" not in error
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_sft_of_a_pretrained_run_learns_the_answers_and_resumes_bitwise(tmp_path):
    """A :smoke run pretrained on Shakespeare, fine-tuned by `lm.py:from=RUN` on the reversal task prepared with
    its tokenizer: the loss on the answers falls, and a run stopped at step 6 ends bitwise the uninterrupted one."""
    from conftest import ROOT, resumed_losses
    from experiments import lm
    from research import experiment, train

    source = ["--input", str(ROOT / "research/data/bundled/tiny_shakespeare/input.txt"), "--documents=paragraph"]
    assert prepare.main([*source, "--tokenizer=bpe:512", "--output", str(tmp_path / "shakespeare")]) == 0
    base = lm.get_config("smoke")
    base.data.update({"prepared": str(tmp_path / "shakespeare"), "segment_ids": True})
    base.update_from_flattened_dict({"num_steps": 20, "checkpoint.every_steps": 0, "eval_every": 0})
    experiment.claim_workdir(tmp_path / "base", "lm", base)
    train.train_and_evaluate(base, lm, tmp_path / "base")
    chat_task.make(tmp_path / "task", train=300, test=20)
    arguments = ["--input", str(tmp_path / "task" / "sft_train.jsonl"), "--output", str(tmp_path / "chat")]
    tokenizer = f"--tokenizer={tmp_path / 'shakespeare' / 'tokenizer.json'}"
    assert prepare.main([*arguments, tokenizer, "--chat_template=chatml"]) == 0
    config = lm.get_config(f"from={tmp_path / 'base'}")
    config.data.prepared = str(tmp_path / "chat")
    config.update_from_flattened_dict({"num_steps": 12, "batch_size": 8, "model.block_size": 96, "eval_every": 0})
    config.update_from_flattened_dict({"checkpoint.every_steps": 6, "log_every": 1, "optimizer.learning_rate": 1e-2})
    config.optimizer.schedule.warmup_steps = 2
    losses = resumed_losses(lm, config, tmp_path, stop_at=6)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5, losses
