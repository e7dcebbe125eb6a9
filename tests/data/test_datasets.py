import hashlib

import numpy as np
import pytest

from research.data import optdigits, pipeline

# Class counts published in optdigits.names (and checked in PROVENANCE.md).
TRAIN_COUNTS = [376, 389, 380, 389, 387, 376, 377, 387, 380, 382]
TEST_COUNTS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


def test_bundled_files_are_the_documented_ones():
    digests = {
        name: hashlib.sha256((optdigits.BUNDLED_DIR / name).read_bytes()).hexdigest()
        for name in ("optdigits.tra", "optdigits.tes")
    }
    assert digests == {
        "optdigits.tra": "e1b683cc211604fe8fd8c4417e6a69f31380e0c61d4af22e93cc21e9257ffedd",
        "optdigits.tes": "6ebb3d2fee246a4e99363262ddf8a00a3c41bee6014c373ed9d9216ba7f651b8",
    }


@pytest.mark.parametrize("split, counts", [("train", TRAIN_COUNTS), ("test", TEST_COUNTS)])
def test_optdigits_builder_yields_the_official_split(data_dir, split, counts):
    source = pipeline.tfds_source("optdigits", split, data_dir=data_dir)
    assert len(source) == sum(counts) == optdigits.SPLIT_SIZES[split]
    records = [source[index] for index in range(len(source))]
    assert np.bincount([record["label"] for record in records], minlength=10).tolist() == counts
    assert records[0]["image"].shape == (8, 8) and records[0]["image"].dtype == np.uint8
    assert max(int(record["image"].max()) for record in records) == 16
    # Same multiset of rows as the file (tfds reorders records by hashed key).
    images, labels = optdigits.read_split(optdigits.BUNDLED_DIR / optdigits.SPLIT_FILES[split])
    from_file = sorted(image.tobytes() + bytes([label]) for image, label in zip(images, labels))
    from_tfds = sorted(record["image"].tobytes() + bytes([record["label"]]) for record in records)
    assert from_file == from_tfds


def first_batches(dataset, count):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(count)]


def test_train_batches_are_deterministic_under_a_seed_and_reshuffle_each_epoch():
    source = pipeline.array_source(x=np.arange(20, dtype=np.int32))
    batches = lambda seed: [
        batch["x"].tolist() for batch in first_batches(pipeline.train_batches(source, batch_size=5, seed=seed), 8)
    ]
    assert batches(0) == batches(0)
    assert batches(0) != batches(1)
    epochs = [sum(batches(0)[4 * epoch : 4 * epoch + 4], []) for epoch in (0, 1)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(20)), "each epoch sees every example once"
    assert epochs[0] != epochs[1], "the order changes between epochs"
    assert all(
        batch["mask"].tolist() == [1.0] * 5
        for batch in first_batches(pipeline.train_batches(source, batch_size=5, seed=0), 2)
    )


def test_eval_batches_cover_each_example_once_then_pad_with_mask():
    source = pipeline.array_source(x=np.arange(11, dtype=np.int32))
    batches = list(pipeline.eval_batches(source, batch_size=4))
    assert [batch["x"].shape for batch in batches] == [(4,)] * 3
    values = np.concatenate([batch["x"] for batch in batches])
    mask = np.concatenate([batch["mask"] for batch in batches])
    assert values[mask == 1].tolist() == list(range(11))
    assert mask.tolist() == [1.0] * 11 + [0.0]


def test_array_source_rejects_ragged_columns():
    with pytest.raises(ValueError, match="differ in length"):
        pipeline.array_source(x=np.zeros(3), y=np.zeros(4))
