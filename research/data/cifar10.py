"""CIFAR-10 (Krizhevsky, 2009) as a TensorFlow-free tfds builder over the official BINARY archive.

`cifar-10-binary.tar.gz` holds `cifar-10-batches-bin/data_batch_{1..5}.bin` (train, 50,000)
and `test_batch.bin` (10,000): records of 1 label byte then 3,072 pixel bytes (the red,
green and blue 32x32 planes). It is parsed with numpy; nothing is ever unpickled. The archive
comes from the manual directory or, online, from the official URL with its published sha256.
"""

import tarfile
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from research.data import files

ARCHIVE = "cifar-10-binary.tar.gz"
URL = "https://www.cs.toronto.edu/~kriz/" + ARCHIVE
PREFIX = "cifar-10-batches-bin/"
SPLIT_MEMBERS = {"train": [f"data_batch_{number}.bin" for number in range(1, 6)], "test": ["test_batch.bin"]}
SPLIT_SIZES = {"train": 50000, "test": 10000}
LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RECORD_BYTES = 1 + 3 * 32 * 32


def parse_batch(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch file into (images_Nx32x32x3 uint8, labels_N)."""
    if len(data) % RECORD_BYTES:
        raise ValueError(f"a CIFAR-10 binary batch holds records of {RECORD_BYTES} bytes; got {len(data)} bytes")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    images_Nx32x32x3 = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images_Nx32x32x3, records[:, 0].astype(np.int64)


def read_archive(path: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every record of `split` from the archive, in file order."""
    parts = []
    with tarfile.open(path, "r:gz") as archive:
        for member in SPLIT_MEMBERS[split]:
            handle = archive.extractfile(PREFIX + member)
            if handle is None:
                raise ValueError(f"{path} has no regular file {PREFIX + member}")
            parts.append(parse_batch(handle.read()))
    return np.concatenate([images for images, _ in parts]), np.concatenate([labels for _, labels in parts])


class ResearchCifar10(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 from the official binary archive, prepared as array_record."""

    name = "research_cifar10"  # the official builder owns `cifar10`; see research/data/catalog.py
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official binary archive parsed with numpy."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the official {ARCHIVE} here (from {URL})."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="32x32 colour images in 10 classes; `id` is the record's file and position in the archive.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=LABEL_NAMES),
                    "id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        )

    def _split_generators(self, dl_manager):
        archive = self._archive(dl_manager)
        return {split: self._generate_examples(archive, split) for split in SPLIT_MEMBERS}

    def _archive(self, dl_manager) -> Path:
        local = files.find_files(files.manual_dir_of(dl_manager), [ARCHIVE])
        if local is not None:
            return local[ARCHIVE]
        if files.online(URL):
            return Path(dl_manager.download(URL))
        raise files.missing("cifar10", [ARCHIVE], files.manual_dir(str(self.data_dir_root)))

    def _generate_examples(self, archive: Path, split: str):
        images, labels = read_archive(archive, split)
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image, "label": int(label), "id": index}
