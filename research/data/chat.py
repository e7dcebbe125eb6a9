"""Chat templates: conversations rendered as transformers renders them, tokenized with a loss mask on the assistant.

  template = chat.load_template("chatml")  # or llama3, a tokenizer_config.json, a checkpoint directory, a .jinja
  text, spans = chat.render(template, messages, add_generation_prompt=True)  # a prompt for generation
  ids, mask = chat.encode(tokenizer, template, messages)  # SFT data: int32 ids, True where the loss counts

The Jinja environment is transformers' (utils/chat_template_utils.py): a sandbox with trim_blocks, lstrip_blocks,
loop controls, raise_exception, strftime_now, a tojson that does not escape HTML, and `{% generation %}` blocks
marking the assistant's text. Templates without them (the released ones) are split by prefix rendering: the
assistant's i-th turn is what rendering messages[:i + 1] adds to messages[:i] with the generation prompt, its
end-of-turn marker included, so the model learns to stop. Every bad input is a one-line ConfigError.
"""

import contextlib
import contextvars
import functools
import json
import re
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from research.data.tokenizer import CorpusTokenizer
from research.errors import ConfigError

Span = tuple[int, int]  # [start, end) in characters of the rendered text

TEMPLATE_FILE = "chat_template.jinja"  # as transformers 5 saves a checkpoint's template

# ChatML (Qwen2.5's turns, without its default system prompt or tool calls).
CHATML = """\
{%- for message in messages %}
{{- '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Llama 3 instruct: trimmed contents; <|begin_of_text|> unless the caller's bos_token says otherwise.
LLAMA3 = """\
{{- bos_token | default('<|begin_of_text|>', true) }}
{%- for message in messages %}
{{- '<|start_header_id|>' ~ message['role'] ~ '<|end_header_id|>\n\n' ~ message['content'] | trim ~ '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # transformers' test for a template with the tags
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # transformers' aliases, the first is standard

# While a render runs: its output so far and the spans of its {% generation %} blocks.
_TRACKING: contextvars.ContextVar[tuple[list[str], list[Span]] | None] = contextvars.ContextVar(
    "chat_generation", default=None
)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: where the enclosed text lands (transformers' AssistantTracker)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record"), [], [], body).set_lineno(lineno)

    def _record(self, caller: jinja2.runtime.Macro) -> str:
        text = caller()
        if (tracking := _TRACKING.get()) is not None:
            blocks, spans = tracking
            start = sum(len(block) for block in blocks)  # what the top level has yielded so far, as transformers
            spans.append((start, start + len(text)))
        return text


class _Dict:
    """`dict(...)` without the type's attributes, so a template cannot reach Python's internals through it."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore-prefixed attributes (CPython internals)."""

    def __init__(*args, **kwargs):  # Jinja's signature trick, so that `namespace(self=...)` still works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: str) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals |= {
        "raise_exception": _raise_exception,
        "strftime_now": _strftime_now,
        "dict": _Dict(),
        "namespace": _Namespace,
    }
    return environment.from_string(template)


def _name(template: str) -> str:
    name = next((name for name, text in TEMPLATES.items() if text == template), None)
    return name or f"starting {(template.strip().splitlines() or [''])[0][:40]!r}"


def _failure(template: str, error: Exception) -> ConfigError:
    """A template that does not compile or render, in one line naming it, the template's line and the error."""
    line = getattr(error, "lineno", None)  # a syntax error's; a render's is in the frames Jinja rewrote
    for frame in traceback.extract_tb(error.__traceback__):
        line = frame.lineno if frame.filename == "<template>" else line
    where = f", line {line}" if line else ""
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ConfigError(f"chat template {_name(template)}{where}: {detail}")


@contextlib.contextmanager
def _rendering(template: str) -> Iterator[jinja2.Template]:
    try:
        yield _compile(template)
    except (jinja2.TemplateError, TypeError, ValueError) as error:  # syntax, undefined, raise_exception, str + list
        raise _failure(template, error) from None


def load_template(spec: str) -> str:
    """The chat template `spec` names: a built-in (TEMPLATES), a .jinja file, a tokenizer_config.json, or a
    checkpoint directory holding chat_template.jinja or tokenizer_config.json (the first wins, as in transformers)."""
    if spec in TEMPLATES:
        return TEMPLATES[spec]
    path = Path(spec)
    if path.is_dir():
        found = next(
            (path / name for name in (TEMPLATE_FILE, "tokenizer_config.json") if (path / name).is_file()), None
        )
        if found is None:
            raise ConfigError(f"chat template {spec!r}: the directory has no {TEMPLATE_FILE} or tokenizer_config.json")
        path = found
    if path.is_file() and path.suffix in (".jinja", ".jinja2"):
        template = path.read_text(encoding="utf-8")
    elif path.is_file() and path.suffix == ".json":
        template = _from_tokenizer_config(path)
    else:
        raise ConfigError(
            f"chat template {spec!r}: give {' or '.join(TEMPLATES)}, a .jinja file, a tokenizer_config.json, "
            "or a checkpoint directory holding one"
        )
    with _rendering(template):  # compiled here: a syntax error is reported now, not at the first conversation
        return template


def _from_tokenizer_config(path: Path) -> str:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not JSON: {error}") from None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # several named templates: [{"name": ..., "template": ...}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        if not isinstance(named.get("default"), str):
            raise ConfigError(f"{path}: no chat template named 'default' among {sorted(map(str, named))}")
        template = named["default"]
    if not isinstance(template, str):
        raise ConfigError(f"{path} has no chat_template string: give a template name or a .jinja file instead")
    return template


def _checked(messages: Sequence[dict], index: int | None) -> list[dict]:
    """Messages as transformers gives them to a template: None values dropped, reasoning under its aliases."""
    conversation = "conversation" if index is None else f"conversation {index}"
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConfigError(f"{conversation} is not a non-empty list of messages: {str(messages)[:80]}")
    checked = []
    for position, message in enumerate(messages):
        message = (
            {key: value for key, value in message.items() if value is not None} if isinstance(message, dict) else {}
        )
        if "role" not in message or "content" not in message:
            shown = str(messages[position])[:80]
            raise ConfigError(f"{conversation}: message {position} needs a 'role' and a 'content': {shown}")
        reasoning = next((message[key] for key in REASONING_FIELDS if key in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        checked.append(message)
    return checked


def _generate(
    template: str, messages: list[dict], add_generation_prompt: bool, special: dict
) -> tuple[str, list[Span]]:
    blocks: list[str] = []
    spans: list[Span] = []
    variables = {"tools": None, "documents": None} | special
    with _rendering(template) as compiled:
        token = _TRACKING.set((blocks, spans))
        try:
            for block in compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt, **variables):
                blocks.append(block)
        finally:
            _TRACKING.reset(token)
    return "".join(blocks), spans


def render(
    template: str,
    messages: Sequence[dict],
    *,
    add_generation_prompt: bool = False,
    index: int | None = None,
    **special: Any,
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of the assistant's text to train on; `special` gives the
    template's variables (bos_token, eos_token, ...), `index` the conversation's number for error messages."""
    messages = _checked(messages, index)
    text, spans = _generate(template, messages, add_generation_prompt, special)
    if GENERATION_TAG.search(template):
        return text, spans
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, _ = _generate(template, messages[:i], True, special)
        turn, _ = _generate(template, messages[: i + 1], False, special)
        if not turn.startswith(prompt) or not text.startswith(turn):
            raise ConfigError(
                f"chat template {_name(template)} does not render conversations incrementally (message {i}): "
                "mark the assistant's text with {% generation %}...{% endgeneration %}"
            )
        spans.append((len(prompt), len(turn)))
    return text, spans


def _offsets(tokenizer: CorpusTokenizer, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Token ids of the whole text and each token's character span."""
    if tokenizer.kind == "hf":
        encoding = tokenizer.backend.encode(text, add_special_tokens=False)
        return np.asarray(encoding.ids, np.int32), encoding.offsets
    if tokenizer.kind == "bytes":
        data = text.encode("utf-8")
        characters = np.repeat(np.arange(len(text)), [len(character.encode("utf-8")) for character in text])
        return np.frombuffer(data, np.uint8).astype(np.int32) + 1, [(int(c), int(c) + 1) for c in characters]
    raise ConfigError(
        f"{tokenizer.path}: a {tokenizer.kind} tokenizer gives no offsets: use a tokenizer.json for chat data"
    )


def _token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> np.ndarray:
    """True on each token overlapping a span (spans in order): transformers' return_assistant_tokens_mask rule."""
    mask = np.zeros(len(offsets), bool)
    span = 0
    for position, (start, end) in enumerate(offsets):
        while span < len(spans) and start >= spans[span][1]:
            span += 1
        if span == len(spans):
            break
        mask[position] = end > spans[span][0]
    return mask


def encode(
    tokenizer: CorpusTokenizer,
    template: str,
    messages: Sequence[dict],
    *,
    index: int | None = None,
    last_turn: bool = False,
    **special: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """A conversation's token ids (int32) and loss mask (True on the assistant's tokens; `last_turn`: on its last
    reply only, a preference pair's response), the whole rendered text tokenized at once (the tokenizer's offsets
    place the spans); a tokenizer.json or bytes."""
    conversation = "conversation" if index is None else f"conversation {index}"
    roles = [message["role"] for message in _checked(messages, index)]
    if "assistant" not in roles:
        raise ConfigError(f"{conversation} has no assistant turn: roles {', '.join(map(str, roles))}")
    text, spans = render(template, messages, index=index, **special)
    spans = spans[-1:] if last_turn else spans
    ids, offsets = _offsets(tokenizer, text)
    mask = _token_mask(offsets, spans)
    if not mask.any():
        raise ConfigError(f"{conversation}: chat template {_name(template)} marks none of the assistant's text")
    return ids, mask
