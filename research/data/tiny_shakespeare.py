"""Tiny Shakespeare (Karpathy's char-rnn corpus) as a TensorFlow-free tfds builder over the shipped text.

The official builder's split, by characters: train = the first 90% (1,003,854 characters),
validation and test = the next two 5% (55,770 each). As in the official builder each split
is ONE example holding its whole text: a language model reads it once, tokenizes it and cuts
training windows by index (`research.data.text.WindowSource`), so the window length can
change without preparing the data again.
"""

import abc
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

BUNDLED_DIR = Path(__file__).parent / "bundled" / "tiny_shakespeare"
TEXT_FILE = BUNDLED_DIR / "input.txt"
SPLIT_CHARACTERS = {"train": 1003854, "validation": 55770, "test": 55770}


def split_text(text: str) -> dict[str, str]:
    """The official 90/5/5 character split of the corpus."""
    train_end, validation_end = int(len(text) * 0.9), int(len(text) * 0.95)
    return {"train": text[:train_end], "validation": text[train_end:validation_end], "test": text[validation_end:]}


def read_text() -> str:
    """The shipped corpus."""
    return TEXT_FILE.read_text(encoding="utf-8")


class ResearchTinyShakespeare(tfds.core.GeneratorBasedBuilder):
    """Tiny Shakespeare, one whole-split example per split, prepared as array_record."""

    name = "research_tiny_shakespeare"  # the official builder owns `tiny_shakespeare`; see catalog.py
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Shipped input.txt, official 90/5/5 character split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="40,000 lines of Shakespeare; each split is one example holding its whole text.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://github.com/karpathy/char-rnn",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the text ships with the package
        return {split: self._generate_examples(text) for split, text in split_text(read_text()).items()}

    def _generate_examples(self, text: str):
        yield 0, {"text": text}


def derived_split(position: int) -> str:
    """The split of a derived task's j-th example, interleaved so that every part of the corpus
    is in every split: j % 10 in 0..7 train, 8 validation, 9 test."""
    return {8: "validation", 9: "test"}.get(position % 10, "train")


class DerivedTextBuilder(tfds.core.GeneratorBasedBuilder):
    """A labelled-text task derived from the shipped corpus (shakespeare_speakers, ...): a subclass
    gives its `name`, VERSION, RELEASE_NOTES, DESCRIPTION, LABEL_NAMES and `examples`."""

    DESCRIPTION = ""
    LABEL_NAMES: Sequence[str] = ()

    @abc.abstractmethod  # abstract: tfds registers only the subclasses, and a subclass must say what its examples are
    def examples(self, text: str) -> list[tuple[str, int]]:
        """(text, label) of every example of the corpus `text`, in order; `derived_split` splits them."""

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "text": tfds.features.Text(),
                    "label": tfds.features.ClassLabel(names=list(self.LABEL_NAMES)),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("text", "label"),
            homepage="https://github.com/karpathy/char-rnn",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # derived from the shipped text
        examples = self.examples(read_text())
        return {split: self._generate_examples(examples, split) for split in ("train", "validation", "test")}

    def _generate_examples(self, examples: list[tuple[str, int]], split: str):
        for position, (text, label) in enumerate(examples):
            if derived_split(position) == split:
                yield position, {"text": text, "label": label, "index": position}
