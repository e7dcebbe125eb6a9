"""A labelled-text task derived from the shipped Tiny Shakespeare: who speaks this speech?

The corpus is a sequence of speeches, each a line `NAME:` followed by its lines and a blank
line. The label is the speaker among the 8 who give the most speeches (GLOUCESTER, DUKE
VINCENTIO, MENENIUS, ROMEO, PETRUCHIO, CORIOLANUS, KING RICHARD III, ISABELLA: 1,288
speeches); the text is the speech without its name line. Split by position among those
speeches, interleaved so every speaker appears in every split: j % 10 in 0..7 train, 8
validation, 9 test. It is an offline stand-in for `tfds:glue/sst2` or `tfds:imdb_reviews`
(which need TensorFlow to prepare), for fine-tuning a language model on classification.
"""

import collections

import tensorflow_datasets as tfds

from research.data import tiny_shakespeare

NUM_SPEAKERS = 8
# What labelled_speeches() finds in the shipped text (a test checks it), so the label names need no parsing at import.
SPEAKER_NAMES = [
    "GLOUCESTER",
    "DUKE VINCENTIO",
    "MENENIUS",
    "ROMEO",
    "PETRUCHIO",
    "CORIOLANUS",
    "KING RICHARD III",
    "ISABELLA",
]
SPLIT_SIZES = {"train": 1032, "validation": 128, "test": 128}
DESCRIPTION = "Tiny Shakespeare speeches labelled with 1 of 8 speakers (shipped)"


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, speech text) for every block of the corpus that starts with a `NAME:` line."""
    result = []
    for block in text.split("\n\n"):
        lines = block.strip("\n").split("\n")
        if len(lines) >= 2 and lines[0].endswith(":"):
            result.append((lines[0][:-1], "\n".join(lines[1:])))
    return result


def labelled_speeches(text: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(speaker names by frequency, [(speech, label)]) for the `NUM_SPEAKERS` most frequent speakers."""
    all_speeches = speeches(text)
    counts = collections.Counter(speaker for speaker, _ in all_speeches)
    names = [name for name, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:NUM_SPEAKERS]]
    label_of = {name: label for label, name in enumerate(names)}
    return names, [(speech, label_of[speaker]) for speaker, speech in all_speeches if speaker in label_of]


class ResearchShakespeareSpeakers(tiny_shakespeare.DerivedTextBuilder):
    """Speaker identification over Tiny Shakespeare speeches, prepared as array_record."""

    name = "research_shakespeare_speakers"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "8 most frequent speakers, interleaved 8/1/1 split."}
    DESCRIPTION = DESCRIPTION
    LABEL_NAMES = SPEAKER_NAMES

    def examples(self, text: str) -> list[tuple[str, int]]:
        return labelled_speeches(text)[1]
