"""Our tfds builders prepare from shipped or generated files, offline, with the documented counts."""

import collections
import gzip
import hashlib
import tarfile
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import launch, write_cifar_archive
from research import errors
from research.data import (
    catalog,
    cifar10,
    files,
    mnist,
    shakespeare_acceptability,
    shakespeare_speakers,
    tiny_shakespeare,
)

# From research/data/bundled/mnist/PROVENANCE.md.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture
def offline(monkeypatch):
    """No network, whatever the machine has: builders must not try to download."""
    monkeypatch.setattr(files, "online", lambda url: False)
    catalog._mnist_builder.cache_clear()
    yield
    catalog._mnist_builder.cache_clear()


def test_our_names_do_not_collide_with_official_tfds_builders():
    for dataset in catalog.DATASETS.values():
        assert tfds.builder_cls(dataset.builder.split("/")[0]).__module__.startswith("research.data.")
    assert tfds.builder_cls("mnist").__module__.startswith("tensorflow_datasets.")


def test_mnist_offline_prepares_the_shipped_subset_and_says_so_once(data_dir, offline, capsys):
    assert [catalog.resolve("mnist", data_dir) for _ in range(3)] == ["research_mnist/subset5k"] * 3
    notice = capsys.readouterr().out
    assert notice.count("training on the 5,000-image subset") == 1
    train = catalog.source("mnist", "train", data_dir)
    test = catalog.source("mnist", "test", data_dir)
    assert (len(train), len(test)) == (5000, 10000)
    train_records = [train[index] for index in range(len(train))]
    test_records = [test[index] for index in range(len(test))]
    assert np.bincount([record["label"] for record in train_records]).tolist() == [500] * 10
    assert np.bincount([record["label"] for record in test_records]).tolist() == MNIST_TEST_COUNTS
    # Each training image is the official training image with the same label.
    official_train_labels = mnist.read_idx(mnist.BUNDLED_DIR / "train-labels-idx1-ubyte.gz")
    indices = np.array([record["index"] for record in train_records])
    assert len(set(indices.tolist())) == 5000 and indices.max() < 5848
    assert (official_train_labels[indices] == [record["label"] for record in train_records]).all()
    # The test split is the official file, image for image.
    official_test = mnist.read_idx(mnist.BUNDLED_DIR / "t10k-images-idx3-ubyte.gz")
    by_index = sorted(test_records, key=lambda record: record["index"])
    assert (
        hashlib.sha256(np.stack([record["image"] for record in by_index]).tobytes()).hexdigest()
        == hashlib.sha256(official_test.tobytes()).hexdigest()
    )


def test_mnist_full_offline_without_files_fails_fast_in_one_line(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(errors.MissingDataError) as error:
        tfds.builder("research_mnist/full", data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert (
        "\n" not in message
        and "train-images-idx3-ubyte.gz" in message
        and str(tmp_path / "downloads" / "manual") in message
    )


def test_read_idx_parses_generated_files(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    header = (0x803).to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in images.shape)
    (tmp_path / "images.gz").write_bytes(gzip.compress(header + images.tobytes()))
    assert np.array_equal(mnist.read_idx(tmp_path / "images.gz"), images)
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x04" + bytes(12)))
    with pytest.raises(ValueError, match="not an IDX file"):
        mnist.read_idx(tmp_path / "bad.gz")


def test_cifar10_prepares_from_a_generated_binary_archive(tmp_path, offline):
    sizes = {f"data_batch_{number}.bin": number for number in range(1, 6)} | {"test_batch.bin": 4}
    manual = files.manual_dir(str(tmp_path))
    manual.mkdir(parents=True)
    written = write_cifar_archive(manual / cifar10.ARCHIVE, sizes)
    for split, members in cifar10.SPLIT_MEMBERS.items():
        source = catalog.source("cifar10", split, str(tmp_path))
        assert len(source) == sum(sizes[member] for member in members)
        records = sorted((source[index] for index in range(len(source))), key=lambda record: record["id"])
        expected_images = np.concatenate([written[member][0] for member in members])
        expected_labels = np.concatenate([written[member][1] for member in members])
        assert np.array_equal(np.stack([record["image"] for record in records]), expected_images)
        assert [record["label"] for record in records] == expected_labels.tolist()
    # Pixel (row 0, column 1) of the first train image, green channel, is byte 1 + 1024 + 1 of its record.
    raw = tarfile.open(manual / cifar10.ARCHIVE).extractfile(cifar10.PREFIX + "data_batch_1.bin").read()
    assert written["data_batch_1.bin"][0][0, 0, 1, 1] == raw[1 + 1024 + 1]


def test_cifar10_without_the_archive_fails_fast_in_one_line(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(errors.MissingDataError, match=r"put cifar-10-binary.tar.gz in .*downloads/manual"):
        catalog.source("cifar10", "train", str(tmp_path))
    assert time.perf_counter() - start < 5


def test_parse_batch_rejects_a_truncated_file():
    with pytest.raises(ValueError, match="records of 3073 bytes"):
        cifar10.parse_batch(bytes(3074))


def test_tiny_shakespeare_has_the_official_character_split(data_dir):
    text = tiny_shakespeare.read_text()
    assert (
        hashlib.sha256(text.encode()).hexdigest() == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    )
    splits = {split: catalog.source("tiny_shakespeare", split, data_dir) for split in tiny_shakespeare.SPLIT_CHARACTERS}
    assert {split: len(source) for split, source in splits.items()} == {"train": 1, "validation": 1, "test": 1}
    texts = {split: source[0]["text"].decode() for split, source in splits.items()}
    assert {split: len(value) for split, value in texts.items()} == tiny_shakespeare.SPLIT_CHARACTERS
    assert texts["train"] + texts["validation"] + texts["test"] == text


def test_shakespeare_speakers_labels_the_most_frequent_speakers(data_dir):
    names, examples = shakespeare_speakers.labelled_speeches(tiny_shakespeare.read_text())
    assert names == shakespeare_speakers.SPEAKER_NAMES and len(examples) == 1288
    counts = collections.Counter(label for _, label in examples)
    assert [counts[label] for label in range(8)] == [211, 189, 161, 160, 155, 148, 137, 127]
    sources = {
        split: catalog.source("shakespeare_speakers", split, data_dir) for split in shakespeare_speakers.SPLIT_SIZES
    }
    assert {split: len(source) for split, source in sources.items()} == shakespeare_speakers.SPLIT_SIZES
    test_labels = {record["label"] for record in (sources["test"][index] for index in range(128))}
    assert test_labels == set(range(8))
    first = min((sources["train"][index] for index in range(len(sources["train"]))), key=lambda record: record["index"])
    assert first["text"].decode().startswith(examples[0][0][:40])


def test_shakespeare_acceptability_corrupts_half_the_held_out_lines_by_word_order_or_one_word(data_dir):
    text = tiny_shakespeare.read_text()
    held_out = tiny_shakespeare.split_text(text)
    lines = shakespeare_acceptability.candidate_lines(held_out["validation"] + held_out["test"])
    examples = shakespeare_acceptability.labelled_lines(text)
    assert len(examples) == len(lines) == 2097 and sum(label for _, label in examples) == 1045
    swaps = replacements = 0
    for (line, label), original in zip(examples, lines):
        words, before = line.split(), original.split()
        assert len(words) == len(before) >= shakespeare_acceptability.MIN_WORDS and words[0] == before[0]
        changed = [i for i in range(len(words)) if words[i] != before[i]]
        if label == 1:
            assert changed == []
        elif sorted(words) == sorted(before):  # two different words swapped places
            assert len(changed) == 2 and words[changed[0]] == before[changed[1]]
            swaps += 1
        else:
            assert len(changed) == 1
            replacements += 1
    assert swaps + replacements == 1052 and abs(swaps - replacements) < 100
    assert not any(line in held_out["train"] for line in lines[:50] if len(line) > 40)  # none from pre-training's text
    sources = {
        split: catalog.source("shakespeare_acceptability", split, data_dir)
        for split in shakespeare_acceptability.SPLIT_SIZES
    }
    assert {split: len(source) for split, source in sources.items()} == shakespeare_acceptability.SPLIT_SIZES
    test_labels = [sources["test"][index]["label"] for index in range(len(sources["test"]))]
    assert 0.4 < np.mean(test_labels) < 0.6


def test_unknown_dataset_name_is_one_line():
    with pytest.raises(errors.MissingDataError, match="unknown dataset 'mnits': use one of optdigits, mnist"):
        catalog.resolve("mnits")


def test_list_datasets_shows_what_is_prepared_where_with_split_sizes(data_dir):
    catalog.source("optdigits", "train", data_dir)
    rows = {row["name"]: row for row in catalog.describe(data_dir)}
    assert set(rows) == set(catalog.DATASETS)
    assert rows["optdigits"]["prepared"] and rows["optdigits"]["splits"] == {"train": 3823, "test": 1797}
    assert rows["optdigits"]["path"].startswith(data_dir)
    assert not rows["cifar10"]["prepared"] and rows["cifar10"]["splits"] == {"train": 50000, "test": 10000}
    result = launch("--list_datasets", f"--data_dir={data_dir}", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 + 2 * len(catalog.DATASETS)
    assert lines[1].split()[:3] == ["optdigits", "prepared", "train=3,823"]
    assert f"tfds builder optdigits at {data_dir}" in lines[2]


def test_official_tfds_dataset_without_tensorflow_fails_fast_in_one_line(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(
        errors.MissingDataError,
        match=r"^preparing the official tfds dataset 'tfds:mnist' needs TensorFlow: pip install tensorflow",
    ):
        catalog.source("tfds:mnist", "train", str(tmp_path))
    assert time.perf_counter() - start < 5


def test_official_builder_offline_needs_its_files_in_the_manual_directory(tmp_path, offline):
    from types import SimpleNamespace

    stub = SimpleNamespace(
        url_infos={"https://example.org/a.gz": SimpleNamespace(filename="a.gz")}, data_dir_root=tmp_path
    )
    with pytest.raises(
        errors.MissingDataError, match=r"^dataset 'tfds:x' is not available offline: put a.gz in .*downloads/manual"
    ):
        catalog._check_official_files(stub, "tfds:x")
    files.manual_dir(str(tmp_path)).mkdir(parents=True)
    (files.manual_dir(str(tmp_path)) / "a.gz").write_bytes(b"")
    catalog._check_official_files(stub, "tfds:x")  # present: tfds may go on and use it


def write_idx(path, array: np.ndarray) -> None:
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_mnist_uses_the_full_files_from_the_manual_directory(tmp_path, offline, monkeypatch):
    manual = files.manual_dir(str(tmp_path))
    manual.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train": (rng.integers(0, 256, (7, 28, 28)), np.arange(7) % 10),
        "test": (rng.integers(0, 256, (3, 28, 28)), np.array([9, 8, 7])),
    }
    for split, (images, labels) in arrays.items():
        write_idx(manual / mnist.FILES[split][0], images)
        write_idx(manual / mnist.FILES[split][1], labels)
    # Generated stand-ins for the official files: accept their digests for this test only.
    monkeypatch.setattr(mnist, "OFFICIAL_SHA256", {name: files.sha256(manual / name) for name in mnist.OFFICIAL_SHA256})
    assert catalog.resolve("mnist", str(tmp_path)) == "research_mnist/full"
    for split, (images, labels) in arrays.items():
        source = catalog.source("mnist", split, str(tmp_path))
        records = sorted((source[index] for index in range(len(source))), key=lambda record: record["index"])
        assert np.array_equal(np.stack([record["image"] for record in records]), images)
        assert [record["label"] for record in records] == labels.tolist()


def test_mnist_rejects_a_manual_file_that_is_not_the_official_one(tmp_path, offline):
    manual = files.manual_dir(str(tmp_path))
    manual.mkdir(parents=True)
    for name in mnist.OFFICIAL_SHA256:
        write_idx(manual / name, np.zeros((1, 28, 28) if "images" in name else (1,)))
    with pytest.raises(
        errors.MissingDataError, match=r"is not the official train-images-idx3-ubyte.gz \(sha256 differs\)"
    ):
        tfds.builder("research_mnist/full", data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
