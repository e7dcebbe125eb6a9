"""MNIST with a small CNN: conv(3x3,64)-pool-conv(3x3,128)-pool-dense 1000-dense 10, SGD + momentum.

  python launch.py --config experiments/mnist_cnn.py --workdir runs/mnist_cnn        # full MNIST (GPU)
  python launch.py --config experiments/mnist_cnn.py:cpu --workdir runs/mnist_cnn_cpu
Source: the Flax examples' MNIST CNN (github.com/google/flax, examples/mnist): SGD, learning rate
0.1, momentum 0.9, batch 128, 10 epochs on the 60,000 official training images: 99.17% test
accuracy. Our default config is that recipe (10 epochs of the 54,000 images left after holding
out 6,000 for validation); expected ~99.1%, not measured here (full MNIST is not offline).
`:cpu` trains on the 4,500-image part of the shipped 5k subset (500 held out) for 15 epochs, each
image shifted at random by up to 2 pixels each way, and is tested on the official 10,000 test
images; the issue's bar is >= 97.5%. MEASURED (2-core CPU shared with other jobs, 2026-11-23):

  config                 seed   validation (500)   test (10,000)                 wall time
  :cpu, on main's code   0      0.986              accuracy 0.9837, loss 0.0494  7.8 min (beside the test suite)
  :cpu                   0      0.980              accuracy 0.9801, loss 0.0594  13 min (two runs at once)
  :cpu                   1      0.982              accuracy 0.9815, loss 0.0546  13 min (two runs at once)
  :cpu, data.max_shift=0 0      0.980              accuracy 0.9773, loss 0.0858  7.0 min
  :cpu, data.max_shift=0 1      0.974              accuracy 0.9703, loss 0.1202  6.2 min

All runs are 525 steps; all but the first ran before this branch merged main (the trainer
and data pipeline underneath changed, hence different numbers). Without the shifts the training loss reaches 0.001 and the test
accuracy depends on the seed. Each run used about 3 minutes of CPU time (user); the wall times
are those of a machine shared with the other engineers' runs.
`:smoke` is a reduced model for 30 steps (tests): test accuracy ~0.57 on 256 test images.
"""

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from experiments import mnist_mlp
from research import metrics, perf
from research.config import choose, trainer_config
from research.data import pipeline
from research.models import compute_dtype
from research.models.cnn import CNN

MAX_PIXEL = 255.0


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = trainer_config()
    config.data = ml_collections.ConfigDict({
        "name": "mnist",  # the full official split, or the shipped 5k subset offline (said once)
        # 10% of the training images are held out for the periodic evaluation; nothing is tuned on test.
        "splits": {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},
        "max_shift": 0,  # >0: training images move by up to this many pixels each way, at random
    })
    config.model = ml_collections.ConfigDict({"conv_features": (64, 128), "dense_features": 1000, "pooling": "avg",
                                           "dtype": "float32"})  # compute dtype; bfloat16: mixed precision
    config.update_from_flattened_dict({
        "num_steps": 3800,  # 10 epochs of 54,000 images at batch 128
        "batch_size": 128,
        "eval_every": 380,
        "log_every": 50,
        "optimizer.name": "momentum",
        "optimizer.kwargs.momentum": 0.9,
        "optimizer.learning_rate": 0.1,
    })
    config.update_from_flattened_dict(choose(arg, {
        None: {},
        # 4,500 images / 128 = 35 steps an epoch: 15 epochs.
        # Without the shifts 4,500 images overfit: test accuracy 0.977 or 0.970 by the seed.
        "cpu": {"data.name": "mnist_subset5k", "data.max_shift": 2, "num_steps": 525, "eval_every": 175, "log_every": 35},
        "smoke": {
            "data.name": "mnist_subset5k",
            "data.splits.validation": "train[90%:95%]",
            "data.splits.test": "test[:256]",
            "model.conv_features": (8, 16),
            "model.dense_features": 32,
            "num_steps": 30,
            "batch_size": 32,
            "eval_every": 0,
            "log_every": 5,
            "optimizer.learning_rate": 0.05,
        },
    }))
    return config


def preprocess(batch) -> dict[str, np.ndarray]:
    """One example or a batch: float32 pixels in 0..1 with a channel axis (..., 28, 28, 1), int32 labels."""
    image = np.asarray(batch["image"], np.float32) / MAX_PIXEL
    return {"inputs": image[..., None], "labels": np.asarray(batch["label"], np.int32)}


def random_shift(record, rng: np.random.Generator, max_shift: int) -> dict[str, np.ndarray]:
    """The image moved by up to `max_shift` pixels along each axis, the uncovered border black."""
    image_HxW = np.asarray(record["image"])
    height, width = image_HxW.shape
    top, left = rng.integers(0, 2 * max_shift + 1, size=2)
    shifted = np.pad(image_HxW, max_shift)[top : top + height, left : left + width]
    return preprocess({"image": shifted, "label": record["label"]})


def make_data(config: ml_collections.ConfigDict, split: str):
    if split == "train" and config.data.max_shift:  # per-example random shifts: a few ms a batch, well under a step
        source = pipeline.tfds_source(config.data.name, config.data.splits[split], data_dir=config.data_dir)
        shift = functools.partial(random_shift, max_shift=config.data.max_shift)
        return pipeline.train_batches(source, batch_size=config.batch_size, seed=config.seed, random_transform=shift)
    return mnist_mlp.make_data(config, split, preprocess=preprocess)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    model = config.model
    return CNN(conv_features=tuple(model.conv_features), dense_features=model.dense_features, pooling=model.pooling,
               dtype=compute_dtype(model.dtype))


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one 28x28 image (research/perf.py), for the logged MFU."""
    model = config.model
    return perf.cnn_training_flops_per_example(28, 1, tuple(model.conv_features), model.dense_features, classes=10)


def loss_fn(params, batch, rng, *, model) -> tuple[jax.Array, dict]:
    del rng  # no dropout
    logits_BxK = model.apply({"params": params}, batch["inputs"])
    return metrics.classification_loss(logits_BxK, batch["labels"], batch["mask"])


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    logits_BxK = model.apply({"params": params}, batch["inputs"])
    return metrics.classification_metrics(logits_BxK, batch["labels"], batch["mask"])
