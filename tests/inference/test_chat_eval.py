"""Chat evaluation's pieces: the end-of-turn marker each template writes, and the held-out file's checks."""

import json

import pytest

from research.data import chat
from research.errors import ConfigError
from research.inference import chat as chat_eval


@pytest.mark.parametrize("name, marker", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_each_template_ends_a_reply_with_its_marker(name, marker):
    assert chat_eval.end_of_turn(chat.TEMPLATES[name]) == marker


def test_a_template_that_writes_nothing_after_a_reply_cannot_stop_generation():
    bare = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{% endfor %}"
    with pytest.raises(ConfigError, match="no end-of-turn marker"):
        chat_eval.end_of_turn(bare)


def test_held_out_conversations_must_end_with_the_reference_reply(tmp_path):
    good = {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "b a"}]}
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n\n")
    assert chat_eval.read_conversations(tmp_path / "good.jsonl") == [good["messages"]]
    (tmp_path / "open.jsonl").write_text(json.dumps({"messages": good["messages"][:1]}) + "\n")
    with pytest.raises(ConfigError, match=r"open.jsonl:1: the conversation does not end with the assistant"):
        chat_eval.read_conversations(tmp_path / "open.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not a JSON object with a messages list"):
        chat_eval.read_conversations(tmp_path / "bad.jsonl")
    assert chat_eval.normalised("  b \n a ") == "b a"
