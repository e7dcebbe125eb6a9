"""The datasets a config can name, how each maps to a tfds builder, and `--list_datasets`.

tfds registers every builder class by name when its module is imported, and refuses a second
builder with a taken name: a class `Mnist` of ours would collide with tfds's own `mnist`.
So our builders carry the prefix `research_` (`research_mnist`, `research_cifar10`, ...) and
users name datasets by the short names of `DATASETS`. `tfds:NAME` names an official tfds
builder; preparing one of those needs TensorFlow (reading it back later does not).
"""

import contextlib
import dataclasses
import functools
import io
from typing import Any, Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from absl import logging

from research import errors
from research.data import (
    cifar10,
    files,
    mnist,
    optdigits,
    shakespeare_acceptability,
    shakespeare_speakers,
)  # noqa: F401  (registers every builder)
from research.errors import ConfigError

OFFICIAL_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class Dataset:
    builder: str  # registered tfds name, with its config if it has one
    description: str
    split_sizes: Mapping[str, int]  # what a complete preparation holds


DATASETS = {
    "optdigits": Dataset("optdigits", "UCI handwritten digits 8x8 (shipped)", optdigits.SPLIT_SIZES),
    "mnist": Dataset(
        "research_mnist/full", "MNIST 28x28, official split (four IDX files or internet)", mnist.SPLIT_SIZES["full"]
    ),
    "mnist_subset5k": Dataset(
        "research_mnist/subset5k", "MNIST, shipped: official test + 5k train", mnist.SPLIT_SIZES["subset5k"]
    ),
    "cifar10": Dataset("research_cifar10", "CIFAR-10 32x32x3 (binary archive or internet)", cifar10.SPLIT_SIZES),
    "tiny_shakespeare": Dataset(
        "research_tiny_shakespeare",
        "Tiny Shakespeare, one text per split (shipped)",
        {"train": 1, "validation": 1, "test": 1},
    ),
    "shakespeare_speakers": Dataset(
        "research_shakespeare_speakers", shakespeare_speakers.DESCRIPTION, shakespeare_speakers.SPLIT_SIZES
    ),
    "shakespeare_acceptability": Dataset(
        "research_shakespeare_acceptability",
        shakespeare_acceptability.DESCRIPTION,
        shakespeare_acceptability.SPLIT_SIZES,
    ),
}


def builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """The tfds builder behind a dataset name (see `DATASETS`, or `tfds:NAME`), writing array_record."""
    return tfds.builder(resolve(name, data_dir), data_dir=data_dir or None, file_format="array_record")


def resolve(name: str, data_dir: str | None = None) -> str:
    """The registered tfds name (and config) that a user-facing dataset name stands for."""
    if name.startswith(OFFICIAL_PREFIX):
        return name[len(OFFICIAL_PREFIX) :]
    if name == "mnist":
        return _mnist_builder(data_dir or "")
    if name not in DATASETS:
        known = ", ".join(DATASETS)
        raise errors.MissingDataError(
            f"unknown dataset {name!r}: use one of {known}, or tfds:NAME for an official tfds dataset"
        )
    return DATASETS[name].builder


@functools.lru_cache(maxsize=None)  # resolve once per data_dir, so the offline notice prints once
def _mnist_builder(data_dir: str) -> str:
    """`mnist` is the full official split when it is prepared, in the manual directory or downloadable."""
    full = DATASETS["mnist"].builder
    if tfds.builder(full, data_dir=data_dir or None, file_format="array_record").is_prepared():
        return full
    if files.find_files(files.manual_dir(data_dir), list(mnist.OFFICIAL_SHA256)) or files.online(mnist.URL):
        return full
    print(
        f"mnist: offline and the official training images are not in {files.manual_dir(data_dir)}: "
        "training on the 5,000-image subset shipped with the package (the test set is the full 10,000)."
    )
    return DATASETS["mnist_subset5k"].builder


def source(name: str, split: str, data_dir: str | None = None) -> Sequence[Mapping[str, Any]]:
    """Random-access records of a split, preparing the dataset as array_record first if needed."""
    dataset_builder = builder(name, data_dir)
    with quietly():  # before a first preparation tfds warns that the version's folder has no dataset_info.json
        prepared = dataset_builder.is_prepared()
    if not prepared:
        prepare(dataset_builder, name)
    try:
        return dataset_builder.as_data_source(split=split)
    except (ValueError, KeyError, AssertionError) as error:  # tfds's split parser: "train[:300%]", "trian"
        splits = ", ".join(sorted(dataset_builder.info.splits))
        raise ConfigError(
            f"split {split!r} of {name}: {str(error).splitlines()[0][:200]} (its splits: {splits}; "
            "slices as in 'train[:90%]' or 'train[1000:]')"
        ) from None


def prepare(dataset_builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Prepares a dataset. Official tfds builders need TensorFlow and, offline, their files in the manual directory."""
    if name.startswith(OFFICIAL_PREFIX):
        try:
            import tensorflow  # noqa: F401  (only to find out whether it is there)
        except ImportError:
            raise errors.MissingDataError(
                f"preparing the official tfds dataset {name!r} needs TensorFlow: pip install tensorflow, "
                "or prepare it elsewhere as array_record into this data_dir"
            ) from None
        _check_official_files(dataset_builder, name)
        dataset_builder.download_and_prepare()  # tfds's own messages: it may download, and takes a while
        return
    with quietly():  # ours read files shipped or found locally: tfds's "Downloading and preparing" would mislead
        dataset_builder.download_and_prepare()


@contextlib.contextmanager
def quietly() -> Iterator[None]:
    """tfds's console output (its progress bars, its download notices, absl's warnings) held back for the block."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # "Variant folder ... has no dataset_info.json": a first preparation
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.set_verbosity(verbosity)


def _check_official_files(dataset_builder: tfds.core.DatasetBuilder, name: str) -> None:
    """Offline, tfds would retry each download for minutes: fail at once unless every file is in the manual
    directory."""
    url_infos = dataset_builder.url_infos or {}
    if not url_infos or files.online(next(iter(url_infos))):
        return
    names = [info.filename or url.rsplit("/", 1)[-1] for url, info in url_infos.items()]
    directory = files.manual_dir(str(dataset_builder.data_dir_root))
    if files.find_files(directory, names) is None:
        raise files.missing(name, names, directory)


def describe(data_dir: str | None = None) -> list[dict[str, Any]]:
    """One row per dataset: name, tfds builder, whether prepared, where, and split sizes."""
    rows = []
    for name, dataset in DATASETS.items():
        dataset_builder = tfds.builder(dataset.builder, data_dir=data_dir or None, file_format="array_record")
        prepared = dataset_builder.is_prepared()
        sizes = (
            {split: info.num_examples for split, info in dataset_builder.info.splits.items()}
            if prepared
            else dict(dataset.split_sizes)
        )
        rows.append(
            {
                "name": name,
                "builder": dataset.builder,
                "prepared": prepared,
                "path": str(dataset_builder.data_path),
                "splits": sizes,
                "description": dataset.description,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """`describe()` as aligned text: a header, then two lines per dataset."""
    lines = [f"{'dataset':22s} {'state':13s} {'splits (examples; expected ones when not prepared)':52s} description"]
    for row in rows:
        splits = " ".join(f"{split}={size:,}" for split, size in row["splits"].items())
        state = "prepared" if row["prepared"] else "not prepared"
        lines.append(f"{row['name']:22s} {state:13s} {splits:52s} {row['description']}")
        lines.append(f"{'':22s} tfds builder {row['builder']} at {row['path']}")
    return "\n".join(lines)
