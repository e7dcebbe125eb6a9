"""The reverse-the-words chat task: byte-identical reruns, held-out word sets, right answers, plausible rejected
replies, the multi-turn and system fractions, exact match and the command line."""

import hashlib
import json

import pytest

from research.data import chat_task

TRAIN, TEST = 2000, 200


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The files of seed 0, read back as plain json: {name: rows}, and the manifest."""
    output = tmp_path_factory.mktemp("chat_task")
    manifest = chat_task.make(output, train=TRAIN, test=TEST, seed=0)
    rows = {name: [json.loads(line) for line in (output / name).read_text().splitlines()] for name in chat_task.FILES}
    return {"output": output, "manifest": manifest, "rows": rows}


def requested(messages: list[dict]) -> list[frozenset[str]]:
    """The word set of every user turn."""
    return [frozenset(m["content"].rsplit(":", 1)[1].split()) for m in messages if m["role"] == "user"]


def test_vocabulary_is_300_shakespeare_words():
    words = chat_task.vocabulary()
    assert len(words) == len(set(words)) == 300
    assert words[:5] == ("the", "and", "you", "that", "not")
    assert all(word.isalpha() and word.islower() and len(word) >= 3 for word in words)


def test_reruns_are_byte_identical_and_another_seed_differs(made, tmp_path):
    again = chat_task.make(tmp_path / "again", train=TRAIN, test=TEST, seed=0)
    assert again == made["manifest"]
    for name in (*chat_task.FILES, "manifest.json"):
        assert (tmp_path / "again" / name).read_bytes() == (made["output"] / name).read_bytes()
    other = chat_task.make(tmp_path / "other", train=TRAIN, test=TEST, seed=1)
    for name in chat_task.FILES:
        assert other["files"][name]["sha256"] != made["manifest"]["files"][name]["sha256"]


def test_manifest_counts_and_checksums(made):
    manifest = made["manifest"]
    assert manifest["seed"] == 0 and manifest["vocabulary_size"] == 300 and manifest["description"]
    assert manifest["counts"] == {"train": TRAIN, "test": TEST}
    for name in chat_task.FILES:
        data = (made["output"] / name).read_bytes()
        entry = manifest["files"][name]
        assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
        assert entry["rows"] == len(made["rows"][name]) == (TRAIN if "train" in name else TEST)
    assert json.loads((made["output"] / "manifest.json").read_text()) == manifest


def test_no_test_word_set_reaches_train(made):
    train = {words for row in made["rows"]["sft_train.jsonl"] for words in requested(row["messages"])}
    test = [words for row in made["rows"]["sft_test.jsonl"] for words in requested(row["messages"])]
    assert len(train) > TRAIN and len(test) > TEST  # two-round rows ask twice
    assert not train & set(test)
    assert len(set(test)) == len(test)  # and no test prompt repeats
    assert all(chat_task.is_test(tuple(words)) for words in test)


def test_answers_reverse_the_request(made):
    for name in ("sft_train.jsonl", "sft_test.jsonl"):
        for row in made["rows"][name]:
            messages = row["messages"]
            assert [m["role"] for m in messages if m["role"] != "system"] == ["user", "assistant"] * (
                (len(messages) - (messages[0]["role"] == "system")) // 2
            )
            for position, message in enumerate(messages):
                if message["role"] == "user":
                    words = message["content"].rsplit(":", 1)[1].split()
                    assert 3 <= len(words) <= 5 and len(set(words)) == len(words)
                    assert set(words) <= set(chat_task.vocabulary())
                    assert messages[position + 1]["content"] == " ".join(words[::-1])
            assert chat_task.answer(messages[:-1]) == messages[-1]["content"]


def test_preference_pairs(made):
    for split in ("train", "test"):
        sft, dpo = made["rows"][f"sft_{split}.jsonl"], made["rows"][f"dpo_{split}.jsonl"]
        kinds = {"original order": 0, "one swap": 0}
        for conversation, pair in zip(sft, dpo, strict=True):
            assert set(pair) == {"prompt", "chosen", "rejected"}
            assert pair["prompt"] == conversation["messages"][:-1] and pair["prompt"][-1]["role"] == "user"
            (chosen,), (rejected,) = pair["chosen"], pair["rejected"]
            assert chosen["role"] == rejected["role"] == "assistant"
            assert chosen["content"] == chat_task.answer(pair["prompt"]) != rejected["content"]
            right, wrong = chosen["content"].split(), rejected["content"].split()
            assert sorted(right) == sorted(wrong)
            if wrong == right[::-1]:
                kinds["original order"] += 1
            else:
                differ = [i for i in range(len(right)) if right[i] != wrong[i]]
                assert len(differ) == 2 and differ[1] == differ[0] + 1
                kinds["one swap"] += 1
        assert min(kinds.values()) > 0.4 * len(dpo)


def test_system_and_two_round_fractions(made):
    for name, count in (("sft_train.jsonl", TRAIN), ("sft_test.jsonl", TEST)):
        conversations = [row["messages"] for row in made["rows"][name]]
        system = sum(messages[0]["role"] == "system" for messages in conversations) / count
        two_rounds = sum(sum(m["role"] == "user" for m in messages) == 2 for messages in conversations) / count
        assert (
            abs(system - chat_task.SYSTEM_FRACTION) <= 0.05 and abs(two_rounds - chat_task.TWO_ROUNDS_FRACTION) <= 0.05
        )
        assert {len(requested(messages)) for messages in conversations} == {1, 2}
        phrasings = {
            m["content"].rsplit(":", 1)[0] for messages in conversations for m in messages if m["role"] == "user"
        }
        assert len(phrasings) == len(chat_task.REQUESTS)


def test_exact_match(made):
    messages = made["rows"]["sft_test.jsonl"][0]["messages"][:-1]
    right = chat_task.answer(messages)
    assert chat_task.exact_match(f"  \n{right.replace(' ', '   ')}\t\n", messages)
    words = right.split()
    assert not chat_task.exact_match(" ".join([words[1], words[0], *words[2:]]), messages)
    assert not chat_task.exact_match(" ".join(words[::-1]), messages)
    assert chat_task.exact_match(
        "night sword crown", [{"role": "user", "content": "Say it backwards: crown sword night"}]
    )
    with pytest.raises(ValueError, match="no user turn"):
        chat_task.answer([{"role": "assistant", "content": "hello"}])


def test_command_line(tmp_path, capsys):
    assert chat_task.main(["--output", str(tmp_path / "out"), "--train", "8", "--test", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.count("\n") == 0 and "8 train / 4 test" in printed and "seed 3" in printed
    assert len((tmp_path / "out" / "sft_train.jsonl").read_text().splitlines()) == 8
    assert chat_task.main(["--output", str(tmp_path / "bad"), "--train", "0"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --train 0") and error.count("\n") == 1
    (tmp_path / "file").write_text("")
    assert chat_task.main(["--output", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
