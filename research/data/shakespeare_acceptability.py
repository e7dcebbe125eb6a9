"""A second labelled-text task from the shipped Tiny Shakespeare: is this line as Shakespeare wrote it?

Each example is one verse or prose line (not a `NAME:` line, at least MIN_WORDS words) of
Tiny Shakespeare's validation and test text, the 10% that bert_pretrain never trains on. Half
the lines are kept (label 1, "original"); the other half are corrupted (label 0): either two of
their words swap places, or one word is replaced by a word drawn from all the lines' words (by
frequency). The first word, capitalised in verse, is never moved or replaced, and replacements
come from the other positions, so capitals do not give a corrupted line away. Neither corruption
changes which words are frequent, and a swap keeps the very same words, so a bag of words cannot
tell the classes apart: the task asks about word order and fit, what a masked language model
learns (in the spirit of CoLA, Warstadt et al. 2019, with corruptions in place of a linguist's
judgements). Split by position among the lines as `tiny_shakespeare.derived_split` (8/1/1,
interleaved). Every choice for line j is drawn from (SEED, j).
"""

import numpy as np
import tensorflow_datasets as tfds

from research.data import tiny_shakespeare

MIN_WORDS = 5
SEED = 20261124
LABEL_NAMES = ["corrupted", "original"]
SPLIT_SIZES = {"train": 1679, "validation": 209, "test": 209}
DESCRIPTION = "Tiny Shakespeare lines, original or with two words swapped / one replaced (shipped)"


def candidate_lines(text: str) -> list[str]:
    """The lines of `text` that are neither speaker names nor shorter than MIN_WORDS words."""
    return [line for line in text.split("\n") if not line.endswith(":") and len(line.split()) >= MIN_WORDS]


def corrupt(words: list[str], rng: np.random.Generator, vocabulary: list[str]) -> list[str]:
    """The words with two different ones after the first swapped, or (half the time) one of them
    replaced by a different word of `vocabulary`."""
    words = list(words)
    if rng.random() < 0.5:
        first, second = 1 + rng.choice(len(words) - 1, size=2, replace=False)
        while words[first] == words[second]:
            first, second = 1 + rng.choice(len(words) - 1, size=2, replace=False)
        words[first], words[second] = words[second], words[first]
    else:
        position = 1 + rng.integers(len(words) - 1)
        replacement = vocabulary[rng.integers(len(vocabulary))]
        while replacement == words[position]:
            replacement = vocabulary[rng.integers(len(vocabulary))]
        words[position] = replacement
    return words


def labelled_lines(text: str) -> list[tuple[str, int]]:
    """(line, label) for every candidate line of the held-out text, half of them corrupted."""
    held_out = tiny_shakespeare.split_text(text)
    lines = candidate_lines(held_out["validation"] + held_out["test"])
    vocabulary = [word for line in lines for word in line.split()[1:]]
    examples = []
    for position, line in enumerate(lines):
        rng = np.random.default_rng([SEED, position])
        words = line.split()
        if rng.random() < 0.5 and len(set(words[1:])) > 1:
            examples.append((" ".join(corrupt(words, rng, vocabulary)), 0))
        else:
            examples.append((" ".join(words), 1))
    return examples


class ResearchShakespeareAcceptability(tiny_shakespeare.DerivedTextBuilder):
    """Original vs corrupted Tiny Shakespeare lines, prepared as array_record."""

    name = "research_shakespeare_acceptability"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Validation + test lines of Tiny Shakespeare; swap / replace corruptions; 8/1/1 split."}
    DESCRIPTION = DESCRIPTION
    LABEL_NAMES = LABEL_NAMES

    def examples(self, text: str) -> list[tuple[str, int]]:
        return labelled_lines(text)
