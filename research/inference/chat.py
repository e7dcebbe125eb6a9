"""Held-out exact match of a chat model: each conversation's last assistant turn against what the run generates.

  python predict.py --workdir runs/sft --chat_eval data/reverse/sft_test.jsonl [--chat_template chatml]

Each conversation up to its last assistant turn is rendered with the chat template and the generation prompt
(research/data/chat.py), continued greedily for --num_tokens tokens, and cut at the template's end-of-turn
marker (what it writes after an assistant's text: `<|im_end|>` for ChatML, `<|eot_id|>` for Llama 3); the
reply matches when it equals the reference with whitespace runs made single spaces. Prompts of one token length
are generated as one batch (one compiled program per length).
"""

import json
from pathlib import Path
from typing import Any

import numpy as np

from research.data import chat, stream
from research.errors import ConfigError
from research.inference.generate import Sampling, generate

SENTINEL = "\x00reply\x00"  # a reply no template rewrites: what a template writes after it ends the turn


def end_of_turn(template: str, **special: str) -> str:
    """The marker the template writes after an assistant's reply (its span past the reply, stripped)."""
    messages = [{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}]
    text, spans = chat.render(template, messages, **special)
    start, end = spans[-1]
    marker = text[start:end].split(SENTINEL)[-1].strip()
    if SENTINEL not in text[start:end] or not marker:
        raise ConfigError("the chat template writes no end-of-turn marker after a reply: generation cannot stop")
    return marker


def run_template(run, spec: str | None) -> str:
    """`spec` (a name or path), else the template of the chat corpus the run trained on."""
    if spec:
        return chat.load_template(spec)
    prepared = run.config.get("data", {}).get("prepared", "")
    corpus = stream.parse_sources(prepared)[0][0] if prepared else None
    if corpus is None or not corpus.chat:
        raise ConfigError(f"{run.name} did not train on a chat corpus: name its template with --chat_template")
    return (corpus.directory / chat.TEMPLATE_FILE).read_text()


def read_conversations(path: str | Path) -> list[list[dict]]:
    """The `messages` of each line of a JSONL file; each must end with an assistant turn (the reference)."""
    conversations = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: not a JSON object with a messages list") from None
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
            raise ConfigError(f"{path}:{number}: the conversation does not end with the assistant's reply to compare")
        conversations.append(messages)
    if not conversations:
        raise ConfigError(f"{path}: no conversations")
    return conversations


def normalised(text: str) -> str:
    return " ".join(text.split())


def exact_match(run, conversations: list[list[dict]], template: str, *, num_tokens: int = 32) -> dict[str, Any]:
    """{"exact_match": the fraction of replies equal to the references, "replies": each generated reply}."""
    if not run.config.get("data", {}).get("prepared"):
        raise ConfigError(f"{run.name}: chat evaluation needs a run of prepared corpora (their tokenizer.json)")
    tokenizer = stream.parse_sources(run.config.data.prepared)[0][0].tokenizer()
    special = {"eos_token": tokenizer.token(tokenizer.eos_id)}
    marker = end_of_turn(template, **special)
    prompts = []
    for index, messages in enumerate(conversations):
        text, _ = chat.render(template, messages[:-1], add_generation_prompt=True, index=index, **special)
        prompts.append(np.asarray(tokenizer.encode(text), np.int32))
    replies: list[str] = [""] * len(prompts)
    for length in sorted({len(prompt) for prompt in prompts}):
        rows = [i for i, prompt in enumerate(prompts) if len(prompt) == length]
        tokens = generate(run.model, run.params, np.stack([prompts[i] for i in rows]), num_tokens, Sampling(0.0))
        for i, row in zip(rows, tokens):
            replies[i] = tokenizer.decode(row.tolist()).split(marker)[0]
    matches = [
        normalised(reply) == normalised(messages[-1]["content"]) for reply, messages in zip(replies, conversations)
    ]
    return {"exact_match": float(np.mean(matches)), "conversations": len(matches), "replies": replies}
