"""Chat templates (research/data/chat.py) against transformers' apply_chat_template, on a small byte-level BPE."""

import json

import numpy as np
import pytest
import tokenizers
import transformers

from research.data import chat
from research.data import tokenizer as tokenizer_lib
from research.errors import ConfigError

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>")
SPECIAL += ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
SENTENCES = (
    "Hello there, how are you today?\n",
    "I am fine, thank you. The weather is nice and the café is open.\n",
    "Please answer briefly: what is two plus two? Four.\n",
)
END = {"chatml": "<|im_end|>\n", "llama3": "<|eot_id|>"}  # what closes an assistant turn

# The built-in templates with the assistant's content and end marker inside {% generation %} (as TRL's do).
TAGGED = {
    "chatml": """\
{%- for message in messages %}
{%- if message['role'] == 'assistant' %}
{{- '<|im_start|>assistant\n' }}
{%- generation %}{{ message['content'] ~ '<|im_end|>\n' }}{% endgeneration %}
{%- else %}
{{- '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}
""",
    "llama3": """\
{{- bos_token | default('<|begin_of_text|>', true) }}
{%- for message in messages %}
{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' }}
{%- if message['role'] == 'assistant' %}
{%- generation %}{{ message['content'] | trim ~ '<|eot_id|>' }}{% endgeneration %}
{%- else %}
{{- message['content'] | trim ~ '<|eot_id|>' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}
""",
}

SYSTEM = {"role": "system", "content": "You answer briefly."}
CONVERSATIONS = {
    "single_turn": [
        {"role": "user", "content": "Hello there, how are you?"},
        {"role": "assistant", "content": "I am fine, thank you."},
    ],
    "system": [
        SYSTEM,
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
    ],
    "three_turns": [
        SYSTEM,
        {"role": "user", "content": "Hello there!"},
        {"role": "assistant", "content": " Hello, how are you today? "},  # spaces that llama3 trims
        {"role": "user", "content": "Is the café open?"},
        {"role": "assistant", "content": "Yes, the café is open.\nThe weather is nice."},
        {"role": "user", "content": "Thank you."},
        {"role": "assistant", "content": "You are welcome."},
    ],
}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> tokenizer_lib.CorpusTokenizer:
    """A 400-id byte-level BPE whose chat markers are added special tokens, loaded as prepared corpora load theirs."""
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=list(SPECIAL),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(SENTENCES * 4, trainer=trainer)
    directory = tmp_path_factory.mktemp("chat_tokenizer")
    bpe.save(str(directory / "tokenizer.json"))
    return tokenizer_lib.load(directory)


def reference(tokenizer: tokenizer_lib.CorpusTokenizer, template: str) -> transformers.PreTrainedTokenizerFast:
    """transformers' tokenizer over the same tokenizer.json, with `template` as its chat template."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend.to_str())
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>"
    )
    reference.chat_template = template
    return reference


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
def test_rendering_equals_transformers(tokenizer, name):
    template = chat.load_template(name)
    hf = reference(tokenizer, template)
    compared = 0
    for messages in CONVERSATIONS.values():
        for conversation in (messages, messages[:-1]):  # a whole conversation, and the prompt before its last answer
            for add_generation_prompt in (False, True):
                text, _ = chat.render(
                    template, conversation, add_generation_prompt=add_generation_prompt, **hf.special_tokens_map
                )
                expected = hf.apply_chat_template(
                    conversation, tokenize=False, add_generation_prompt=add_generation_prompt
                )
                assert text == expected, (name, conversation, add_generation_prompt)
                compared += 1
    assert compared == 12
    text, _ = chat.render(template, CONVERSATIONS["single_turn"], add_generation_prompt=True)
    expected = {
        "chatml": "<|im_start|>user\nHello there, how are you?<|im_end|>\n<|im_start|>assistant\n"
        "I am fine, thank you.<|im_end|>\n<|im_start|>assistant\n",
        "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello there, how are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nI am fine, thank you.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    }
    assert text == expected[name]


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
def test_assistant_mask_equals_transformers_and_prefix_rendering_finds_the_same(tokenizer, name, conversation):
    messages = CONVERSATIONS[conversation]
    hf = reference(tokenizer, TAGGED[name])
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat.encode(tokenizer, TAGGED[name], messages, **hf.special_tokens_map)
    assert ids.dtype == np.int32 and mask.dtype == bool
    assert ids.tolist() == expected["input_ids"]
    assert mask.astype(int).tolist() == expected["assistant_masks"]

    untagged_ids, untagged_mask = chat.encode(tokenizer, chat.TEMPLATES[name], messages, **hf.special_tokens_map)
    assert untagged_ids.tolist() == ids.tolist() and untagged_mask.tolist() == mask.tolist()
    # What the loss sees: each answer with its end-of-turn marker, nothing of the prompts.
    answers = [m["content"].strip() if name == "llama3" else m["content"] for m in messages if m["role"] == "assistant"]
    trained = tokenizer.backend.decode(ids[mask].tolist(), skip_special_tokens=False)
    assert trained == "".join(answer + END[name] for answer in answers)
    assert 0 < mask.sum() < len(mask)


def test_a_token_straddling_the_start_of_a_span_is_the_assistants_as_in_transformers(tokenizer):
    template = (
        "{% for message in messages %}{{ message['role'] }}: {% if message['role'] == 'assistant' %}"
        "{% generation %}{{ message['content'] }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}"
        "\n{% endfor %}"
    )
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "The weather is nice."}]
    hf = reference(tokenizer, template)
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = chat.encode(tokenizer, template, messages)
    assert ids.tolist() == expected["input_ids"] and mask.astype(int).tolist() == expected["assistant_masks"]
    first = tokenizer.backend.decode([int(ids[np.argmax(mask)])])
    assert first == " The", "the space before the span is in the first token: overlap, not start, decides"


def test_bytes_tokenizer_masks_the_bytes_of_the_assistants_characters(tmp_path):
    tokenizer = tokenizer_lib.build("bytes", "", tmp_path)
    messages = CONVERSATIONS["three_turns"]
    ids, mask = chat.encode(tokenizer, chat.TEMPLATES["chatml"], messages)
    text, spans = chat.render(chat.TEMPLATES["chatml"], messages)
    assert ids.tolist() == [byte + 1 for byte in text.encode("utf-8")]
    trained = bytes(int(i) - 1 for i in ids[mask]).decode("utf-8")
    assert trained == "".join(text[start:end] for start, end in spans)
    assert trained.count("é") == 1 and trained.count("<|im_end|>") == 3
    assert int(mask.sum()) == len(trained.encode("utf-8")) == 120


def test_load_template_from_names_files_and_checkpoints(tmp_path, tokenizer):
    assert chat.load_template("chatml") == chat.TEMPLATES["chatml"]
    hf = reference(tokenizer, chat.TEMPLATES["llama3"])
    hf.save_pretrained(tmp_path / "checkpoint")  # transformers 5: chat_template.jinja beside tokenizer_config.json
    assert (tmp_path / "checkpoint" / chat.TEMPLATE_FILE).is_file()
    assert chat.load_template(str(tmp_path / "checkpoint")) == chat.TEMPLATES["llama3"]
    assert chat.load_template(str(tmp_path / "checkpoint" / chat.TEMPLATE_FILE)) == chat.TEMPLATES["llama3"]

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer_config.json").write_text(json.dumps({"chat_template": TAGGED["chatml"]}))
    assert chat.load_template(str(tmp_path / "old")) == TAGGED["chatml"]
    named = [{"name": "tool_use", "template": "{{ tools }}"}, {"name": "default", "template": TAGGED["llama3"]}]
    (tmp_path / "named.json").write_text(json.dumps({"chat_template": named}))
    assert chat.load_template(str(tmp_path / "named.json")) == TAGGED["llama3"]


def one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as raised:
        function(*args, **kwargs)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


def test_bad_templates_are_one_line_errors(tmp_path):
    assert "give chatml or llama3, a .jinja file" in one_line_error(chat.load_template, "mistral")
    assert "has no chat_template.jinja or tokenizer_config.json" in one_line_error(chat.load_template, str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert "has no chat_template string" in one_line_error(chat.load_template, str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "rag", "template": "x"}]}))
    assert "no chat template named 'default' among ['rag']" in one_line_error(chat.load_template, str(tmp_path))
    (tmp_path / "broken.jinja").write_text("{% for message in messages %}\n{{ message['content'] }}\n")
    message = one_line_error(chat.load_template, str(tmp_path / "broken.jinja"))
    assert message.startswith("chat template starting '{% for message in messages %}', line 2: Unexpected end")

    messages = CONVERSATIONS["single_turn"]
    undefined = "{% for message in messages %}\n{{ message.content.text.upper() }}{% endfor %}"
    assert "line 2: 'str object' has no attribute 'text'" in one_line_error(chat.render, undefined, messages)
    alternate = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    assert one_line_error(chat.render, alternate, messages).endswith(
        ": Conversation roles must alternate user/assistant"
    )
    # Like Qwen3's, a template that renders the last answer differently from the earlier ones has no prefix spans.
    latest = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<end>{% endif %}{% endfor %}"
    message = one_line_error(chat.encode, None, latest, messages)
    assert "does not render conversations incrementally (message 1): mark the assistant's text" in message


def test_bad_conversations_are_one_line_errors(tokenizer):
    template = chat.TEMPLATES["chatml"]
    question = {"role": "user", "content": "Hello?"}
    assert one_line_error(chat.encode, tokenizer, template, [SYSTEM, question], index=7) == (
        "conversation 7 has no assistant turn: roles system, user"
    )
    no_content = [question, {"role": "assistant", "content": None}]
    assert one_line_error(chat.encode, tokenizer, template, no_content, index=3).startswith(
        "conversation 3: message 1 needs a 'role' and a 'content': {'role': 'assistant', 'content': None}"
    )
    assert "message 0 needs a 'role'" in one_line_error(chat.render, template, [{"content": "Hello?"}])
    assert "is not a non-empty list of messages" in one_line_error(chat.render, template, [])
    sentencepiece = tokenizer_lib.CorpusTokenizer("sentencepiece", None, 256, 2, tokenizer.path.with_name("x.model"))
    message = one_line_error(chat.encode, sentencepiece, template, CONVERSATIONS["single_turn"])
    assert message.endswith("a sentencepiece tokenizer gives no offsets: use a tokenizer.json for chat data")
