"""Reverse the words: a seeded chat task with an exact-match answer, SFT conversations and DPO preference pairs.

  python -m research.data.chat_task --output data/chat_task [--train 4000 --test 200 --seed 0]

The user asks for a list of 3-5 distinct words backwards ("Say these words backwards: crown sword night"), the
assistant answers "night sword crown". The words are the 300 most frequent lower-case words of 3+ letters in Tiny
Shakespeare's train split (the text the project's bpe:8192 tokenizer and :cpu models learn from). Writes
sft_{train,test}.jsonl (`{"messages": [...]}`, a quarter of the rows with a system message, a quarter with two
rounds), dpo_{train,test}.jsonl (TRL's conversational preference format, the same prompts: the rejected reply keeps
the original order or swaps one adjacent pair) and manifest.json (counts, sha256s). Held out: a word set is a test
set by a hash of its sorted words, whatever the seed, so no test prompt's words reach train in any order. A rerun
with the same arguments writes byte-identical files.
"""

import argparse
import collections
import functools
import hashlib
import json
import random
import re
import sys
from pathlib import Path

from research.errors import ConfigError

VOCABULARY_SIZE, MINIMUM_LETTERS, WORDS_PER_REQUEST = 300, 3, (3, 4, 5)
HELD_OUT = 10  # one word set in HELD_OUT is a test set
SYSTEM_FRACTION, TWO_ROUNDS_FRACTION = 0.25, 0.25
REQUESTS = (  # each ends in ": " and the words, which is how `answer` finds them
    "Say these words backwards: {}",
    "Reverse the order of these words: {}",
    "Read this list from the end: {}",
    "Words in reverse order, please: {}",
)
SYSTEMS = ("You are a helpful assistant.", "Answer with the words only.", "You reverse lists of words.")
DESCRIPTION = "reverse the words: say a list of 3-5 Tiny Shakespeare words backwards; exact-match answers"
FILES = ("sft_train.jsonl", "sft_test.jsonl", "dpo_train.jsonl", "dpo_test.jsonl")


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """The VOCABULARY_SIZE most frequent all-lower-case words of Tiny Shakespeare's train split, most frequent first."""
    from research.data import tiny_shakespeare

    text = tiny_shakespeare.split_text(tiny_shakespeare.read_text())["train"]
    pattern = re.compile(f"[a-z]{{{MINIMUM_LETTERS},}}")
    words = collections.Counter(word for word in re.findall(r"[A-Za-z']+", text) if pattern.fullmatch(word))
    return tuple(sorted(words, key=lambda word: (-words[word], word))[:VOCABULARY_SIZE])


def is_test(words: tuple[str, ...]) -> bool:
    """Whether a word set is held out: by a hash of its sorted words, so any order of it lands in the same split."""
    digest = hashlib.sha256(" ".join(sorted(words)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT == 0


def _index(rng: random.Random, count: int) -> int:
    # Only Random.random()'s sequence is promised to stay the same across Python versions; choice/sample are not.
    return int(rng.random() * count)


def _words(rng: random.Random, split: str, used: set[frozenset[str]]) -> tuple[str, ...]:
    """A new list of distinct words of `split`, its set not in `used` (which it joins)."""
    words_of = vocabulary()
    while True:
        length = WORDS_PER_REQUEST[_index(rng, len(WORDS_PER_REQUEST))]
        chosen: list[str] = []
        while len(chosen) < length:
            word = words_of[_index(rng, len(words_of))]
            if word not in chosen:
                chosen.append(word)
        key = frozenset(chosen)
        if is_test(tuple(chosen)) == (split == "test") and key not in used:
            used.add(key)
            return tuple(chosen)


def _request(rng: random.Random, words: tuple[str, ...]) -> list[dict]:
    """One user/assistant round asking for `words` backwards."""
    user = REQUESTS[_index(rng, len(REQUESTS))].format(" ".join(words))
    return [{"role": "user", "content": user}, {"role": "assistant", "content": " ".join(reversed(words))}]


def _chosen_rows(rng: random.Random, count: int, fraction: float) -> set[int]:
    """Exactly round(count * fraction) row numbers, drawn by `rng`."""
    rows = list(range(count))
    for position in range(count - 1, 0, -1):  # Fisher-Yates on rng.random() alone
        other = _index(rng, position + 1)
        rows[position], rows[other] = rows[other], rows[position]
    return set(rows[: round(count * fraction)])


def conversations(count: int, split: str, rng: random.Random, used: set[frozenset[str]]) -> list[list[dict]]:
    """`count` conversations of `split`, each ending in an assistant turn that answers its last request."""
    with_system = _chosen_rows(rng, count, SYSTEM_FRACTION)
    two_rounds = _chosen_rows(rng, count, TWO_ROUNDS_FRACTION)
    made = []
    for row in range(count):
        messages = [{"role": "system", "content": SYSTEMS[_index(rng, len(SYSTEMS))]}] if row in with_system else []
        for _ in range(2 if row in two_rounds else 1):
            messages += _request(rng, _words(rng, split, used))
        made.append(messages)
    return made


def preference(messages: list[dict], rng: random.Random) -> dict:
    """A conversation as a TRL preference pair: the prompt up to its last user turn, the right reply chosen and a
    plausible mistake (the original order, or one adjacent pair of the right reply swapped) rejected."""
    correct = answer(messages).split()
    if rng.random() < 0.5:
        wrong = correct[::-1]
    else:
        wrong, position = list(correct), _index(rng, len(correct) - 1)
        wrong[position], wrong[position + 1] = wrong[position + 1], wrong[position]
    return {
        "prompt": messages[:-1],
        "chosen": [{"role": "assistant", "content": " ".join(correct)}],
        "rejected": [{"role": "assistant", "content": " ".join(wrong)}],
    }


def answer(messages: list[dict]) -> str:
    """The correct reply to the last user turn of `messages`: the words after its last colon, backwards."""
    users = [message["content"] for message in messages if message["role"] == "user"]
    if not users or ":" not in users[-1]:
        raise ValueError("the conversation has no user turn of the form '...: word word word'")
    return " ".join(reversed(users[-1].rsplit(":", 1)[1].split()))


def exact_match(prediction: str, messages: list[dict]) -> bool:
    """Whether `prediction` is the last user turn's answer, up to whitespace."""
    return " ".join(prediction.split()) == answer(messages)


def _write(path: Path, rows: list[dict]) -> dict:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    path.write_bytes(data)
    return {"rows": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def make(output: Path, *, train: int = 4000, test: int = 200, seed: int = 0) -> dict:
    """Writes the SFT and DPO files of both splits and manifest.json into `output`; returns the manifest."""
    if train < 1 or test < 1:
        raise ConfigError(f"--train {train} --test {test}: give at least one row of each")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rng, used = random.Random(seed), set()
    sft = {"train": conversations(train, "train", rng, used), "test": conversations(test, "test", rng, used)}
    dpo = {split: [preference(messages, rng) for messages in rows] for split, rows in sft.items()}
    rows = {f"sft_{split}.jsonl": [{"messages": messages} for messages in sft[split]] for split in sft}
    rows |= {f"dpo_{split}.jsonl": dpo[split] for split in dpo}
    files = {name: _write(output / name, rows[name]) for name in FILES}
    manifest = {
        "description": DESCRIPTION,
        "seed": seed,
        "counts": {"train": train, "test": test},
        "vocabulary_size": len(vocabulary()),
        "vocabulary_source": "research/data/bundled/tiny_shakespeare/input.txt, train split",
        "files": files,
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the directory of the .jsonl files and manifest.json")
    parser.add_argument("--train", type=int, default=4000, help="training conversations (and preference pairs)")
    parser.add_argument("--test", type=int, default=200, help="held-out conversations (and preference pairs)")
    parser.add_argument("--seed", type=int, default=0, help="the phrasings, words and mistakes drawn")
    arguments = parser.parse_args(argv)
    try:
        manifest = make(Path(arguments.output), train=arguments.train, test=arguments.test, seed=arguments.seed)
    except (ConfigError, OSError) as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    counts = manifest["counts"]
    print(
        f"{arguments.output}: {counts['train']:,} train / {counts['test']:,} test conversations and preference "
        f"pairs over {manifest['vocabulary_size']} words, seed {manifest['seed']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
