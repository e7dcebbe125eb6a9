"""grain pipelines: determinism, exact resume, per-process shards, placement on the mesh, augmentation, folds."""

import json

import jax
import numpy as np
import pytest

from research import sharding
from research.data import augment, folds, optdigits, pipeline


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def images_source(size: int = 40):
    rng = np.random.default_rng(0)
    return pipeline.array_source(
        image=rng.integers(0, 256, size=(size, 32, 32, 3), dtype=np.uint8), label=np.arange(size) % 10
    )


def cifar_batches(seed: int):
    return pipeline.train_batches(
        images_source(), batch_size=8, seed=seed, random_transform=augment.cifar_train_transform
    )


def test_augmented_batches_are_deterministic_under_a_seed():
    first, again, other = (take(iter(cifar_batches(seed)), 6) for seed in (0, 0, 1))
    assert all(
        np.array_equal(a["inputs"], b["inputs"]) and np.array_equal(a["labels"], b["labels"])
        for a, b in zip(first, again)
    )
    assert not np.array_equal(np.stack([b["inputs"] for b in first]), np.stack([b["inputs"] for b in other]))
    assert first[0]["inputs"].shape == (8, 32, 32, 3) and first[0]["inputs"].dtype == np.float32


def test_restored_iterator_continues_with_exactly_the_same_batches():
    original = iter(cifar_batches(seed=3))
    take(original, 4)  # part way through the first epoch (40 examples, 5 batches each)
    state = json.loads(json.dumps(original.get_state()))  # as a checkpoint would store it
    expected = take(original, 9)  # crosses into the second and third epochs
    restored = iter(cifar_batches(seed=3))
    restored.set_state(state)
    for want, got in zip(expected, take(restored, 9)):
        assert np.array_equal(want["inputs"], got["inputs"]) and np.array_equal(want["labels"], got["labels"])


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_shards_are_disjoint_and_cover_the_data(count):
    source = pipeline.array_source(x=np.arange(48, dtype=np.int32))
    global_batch = 8
    epoch_batches = 48 // count // (global_batch // count)
    shards = []
    for index in range(count):
        batches = pipeline.train_batches(
            source, batch_size=global_batch, seed=0, process=pipeline.Process(index, count)
        )
        shards.append(np.concatenate([batch["x"] for batch in take(iter(batches), epoch_batches)]).tolist())
    assert all(len(shard) == 48 // count for shard in shards)
    assert sorted(sum(shards, [])) == list(range(48)), "disjoint and covering"
    # Global batch b is the processes' slices side by side: the same as one process reads.
    single = np.concatenate(
        [
            batch["x"]
            for batch in take(iter(pipeline.train_batches(source, batch_size=global_batch, seed=0)), 48 // global_batch)
        ]
    )
    local = global_batch // count
    stitched = [
        shards[index][step * local : (step + 1) * local] for step in range(48 // global_batch) for index in range(count)
    ]
    assert sum(stitched, []) == single.tolist()
    # Evaluation: each example once over all processes, padding masked.
    seen = []
    for index in range(count):
        for batch in pipeline.eval_batches(
            pipeline.array_source(x=np.arange(45)), batch_size=global_batch, process=pipeline.Process(index, count)
        ):
            seen += batch["x"][batch["mask"] == 1].tolist()
    assert sorted(seen) == list(range(45))


def test_global_batch_must_divide_over_processes():
    with pytest.raises(ValueError, match="batch size 6 does not divide over 4 processes"):
        pipeline.local_batch_size(6, pipeline.Process(0, 4))


def test_prefetch_to_mesh_yields_the_batches_as_global_arrays_in_order():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    batches = [{"x": np.full((8, 3), step, np.float32)} for step in range(5)]
    placed = list(pipeline.prefetch_to_mesh(iter(batches), mesh, size=2))
    assert [float(batch["x"][0, 0]) for batch in placed] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert placed[0]["x"].shape == (8, 3) and len(placed[0]["x"].sharding.device_set) == jax.device_count() == 8


def test_random_crop_flip_is_a_shifted_window_of_the_padded_image():
    image = np.arange(6 * 5 * 1, dtype=np.uint8).reshape(6, 5, 1) + 1
    for seed in range(20):
        out = augment.random_crop_flip(image, np.random.default_rng(seed), padding=2)
        replay = np.random.default_rng(seed)
        top, left = replay.integers(0, 5, size=2)
        window = np.pad(image, ((2, 2), (2, 2), (0, 0)))[top : top + 6, left : left + 5]
        assert np.array_equal(out, window[:, ::-1] if replay.random() < 0.5 else window)
    assert np.allclose(
        augment.normalize(np.full((1, 1, 3), 255, np.uint8), (0.5, 0.5, 0.5), (0.5, 0.25, 0.5)), [[[1.0, 2.0, 1.0]]]
    )


def test_k_folds_partition_the_training_split(data_dir):
    size, k = optdigits.SPLIT_SIZES["train"], 5
    bounds = folds.fold_bounds(size, k)
    assert [end - start for start, end in bounds] == [765, 764, 765, 764, 765]
    assert folds.kfold_splits("train", size=size, k=k, fold=0) == {"train": "train[765:]", "validation": "train[0:765]"}
    assert folds.kfold_splits("train", size=size, k=k, fold=2) == {
        "train": "train[:1529]+train[2294:]",
        "validation": "train[1529:2294]",
    }
    rows = lambda split: [
        record["image"].tobytes() + bytes([record["label"]])
        for record in pipeline.tfds_source("optdigits", split, data_dir=data_dir)
    ]
    everything = sorted(rows("train"))
    validation_union = []
    for fold in range(k):
        splits = folds.kfold_splits("train", size=size, k=k, fold=fold)
        train, validation = rows(splits["train"]), rows(splits["validation"])
        assert sorted(train + validation) == everything
        validation_union += validation
    assert sorted(validation_union) == everything, "each example validates in exactly one fold"
    with pytest.raises(ValueError, match="fold 5 is not in 0..4"):
        folds.kfold_splits("train", size=size, k=k, fold=5)


def test_subset_reads_records_at_the_given_indices():
    source = pipeline.array_source(x=np.arange(10) * 10)
    assert [record["x"] for record in pipeline.subset(source, [7, 2, 2])] == [70, 20, 20]


def test_array_batches_are_seeded_epoch_permutations_of_disjoint_shards():
    columns = {"x": np.arange(48, dtype=np.int32), "y": np.arange(48) * 2}
    double = lambda batch: batch | {"x": batch["x"] * 10}
    run = lambda seed, process: [
        batch
        for batch in take(
            iter(pipeline.array_batches(columns, batch_size=8, seed=seed, transform=double, process=process)), 12
        )
    ]
    single = run(0, pipeline.Process(0, 1))
    assert [b["x"].tolist() for b in single] == [b["x"].tolist() for b in run(0, pipeline.Process(0, 1))]
    assert [b["x"].tolist() for b in single] != [b["x"].tolist() for b in run(1, pipeline.Process(0, 1))]
    epochs = [np.concatenate([b["x"] for b in single[6 * epoch : 6 * epoch + 6]]) for epoch in (0, 1)]
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) == list(range(0, 480, 10))
    assert epochs[0].tolist() != epochs[1].tolist()
    assert all(np.array_equal(b["y"] * 5, b["x"]) and b["mask"].tolist() == [1.0] * 8 for b in single)
    halves = [np.concatenate([b["x"] for b in run(0, pipeline.Process(index, 2))[:6]]).tolist() for index in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(0, 480, 10)), "two processes: disjoint, covering"


def test_array_batches_resume_exactly():
    columns = {"x": np.arange(30, dtype=np.int32)}
    make = lambda: iter(pipeline.array_batches(columns, batch_size=4, seed=5))
    original = make()
    take(original, 9)
    state = json.loads(json.dumps(original.get_state()))
    expected = [batch["x"].tolist() for batch in take(original, 10)]
    restored = make()
    restored.set_state(state)
    assert [batch["x"].tolist() for batch in take(restored, 10)] == expected


def test_k_fold_splits_plug_into_an_experiment_config(data_dir):
    from experiments import digits_mlp

    config = digits_mlp.get_config("smoke")
    config.data_dir = data_dir
    config.data.splits.update(folds.kfold_splits("train", size=optdigits.SPLIT_SIZES["train"], k=5, fold=1))
    masks = [batch["mask"] for batch in digits_mlp.make_data(config, "validation")]
    assert sum(float(mask.sum()) for mask in masks) == 764
    assert next(iter(digits_mlp.make_data(config, "train")))["inputs"].shape == (64, 64)


def test_worker_processes_give_the_same_batches():
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags, which launch.py parses
    source = pipeline.array_source(x=np.arange(32, dtype=np.int32))
    batches = lambda workers: [
        batch["x"].tolist()
        for batch in take(iter(pipeline.train_batches(source, batch_size=4, seed=0, num_workers=workers)), 6)
    ]
    assert batches(1) == batches(0)
