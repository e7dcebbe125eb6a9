"""UCI optdigits as a TensorFlow-free tfds builder over the copy shipped in the package.

Alpaydin & Kaynak (1998), "Optical Recognition of Handwritten Digits": 8x8 images of
counts in 0..16, train 3,823 (30 writers) / test 1,797 (13 other writers).
"""

from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

BUNDLED_DIR = Path(__file__).parent / "bundled" / "optdigits"
SPLIT_FILES = {"train": "optdigits.tra", "test": "optdigits.tes"}
SPLIT_SIZES = {"train": 3823, "test": 1797}


def read_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Parses one UCI file (64 comma-separated pixels then the class) into (images_Nx8x8, labels_N)."""
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"{path} is not an optdigits file: expected 65 comma-separated ints per row")
    return table[:, :64].reshape(-1, 8, 8).astype(np.uint8), table[:, 64]


class Optdigits(tfds.core.GeneratorBasedBuilder):
    """optdigits from the bundled UCI files, prepared as array_record."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "UCI files shipped with the package."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="UCI optical recognition of handwritten digits, 8x8 counts in 0..16.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(8, 8), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
            license="CC BY 4.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the files ship with the package
        return {split: self._generate_examples(BUNDLED_DIR / name) for split, name in SPLIT_FILES.items()}

    def _generate_examples(self, path: Path):
        images, labels = read_split(path)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": int(label)}
