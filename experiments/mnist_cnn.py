"""MNIST with a small CNN: conv(3x3,64)-pool-conv(3x3,128)-pool-dense 1000-dense 10, SGD + momentum.

  python launch.py --config experiments/mnist_cnn.py --workdir runs/mnist_cnn        # full MNIST (GPU)
  python launch.py --config experiments/mnist_cnn.py:cpu --workdir runs/mnist_cnn_cpu
Source: the Flax examples' MNIST CNN (github.com/google/flax, examples/mnist): SGD, learning rate
0.1, momentum 0.9, batch 128, 10 epochs on the 60,000 official training images: 99.17% test
accuracy. The default config is that recipe (10 epochs of the 54,000 images left after holding
out 6,000 for validation); expected ~99.1%, not measured here (full MNIST is not offline).
`:cpu` trains on the 4,500-image part of the shipped 5k subset (500 held out) for 15 epochs, each
image shifted at random by up to 2 pixels each way, and tests on the official 10,000 images:
expected test accuracy ~0.98 (bar 0.975) in ~8 minutes on a 2-core CPU (docs/results.md; without
the shifts 4,500 images overfit: 0.970-0.977 by the seed). `:smoke` (a reduced model, 30 steps):
~0.57 on 256 test images.
"""

import flax.linen as nn
import ml_collections

from research import metrics, perf
from research.config import choose, trainer_config
from research.data import mnist
from research.models import compute_dtype
from research.models.cnn import CNN


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "name": "mnist",  # the full official split, or the shipped 5k subset offline (said once)
            "splits": mnist.SPLITS,
            "max_shift": 0,  # >0: training images move by up to this many pixels each way, at random
        }
    )
    config.model = ml_collections.ConfigDict(
        {"conv_features": (64, 128), "dense_features": 1000, "pooling": "avg", "dtype": "float32"}
    )  # compute dtype; bfloat16: mixed precision
    config.update_from_flattened_dict(
        {  # 10 epochs of 54,000 images at batch 128
            "num_steps": 3800,
            "batch_size": 128,
            "eval_every": 380,
            "log_every": 50,
            "optimizer.name": "momentum",
            "optimizer.kwargs.momentum": 0.9,
            "optimizer.learning_rate": 0.1,
        }
    )
    # 4,500 images / 128 = 35 steps an epoch: 15 epochs.
    cpu = mnist.OFFLINE | {"data.max_shift": 2, "num_steps": 525, "eval_every": 175, "log_every": 35}
    smoke = mnist.SMOKE | {
        "model.conv_features": (8, 16),
        "model.dense_features": 32,
        "num_steps": 30,
        "batch_size": 32,
        "eval_every": 0,
        "log_every": 5,
        "optimizer.learning_rate": 0.05,
    }
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": cpu, "smoke": smoke}))
    return config


def make_data(config: ml_collections.ConfigDict, split: str):
    """In-memory batches, or with `data.max_shift` per-example random shifts (ms a batch, well under a step)."""
    return mnist.batches(config, split, flat=False, max_shift=config.data.max_shift)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    model = config.model
    return CNN(
        conv_features=tuple(model.conv_features),
        dense_features=model.dense_features,
        pooling=model.pooling,
        dtype=compute_dtype(model.dtype),
    )


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one 28x28 image (research/perf.py), for the logged MFU."""
    model = config.model
    return perf.cnn_training_flops_per_example(28, 1, tuple(model.conv_features), model.dense_features, classes=10)


def loss_fn(params, batch, rng, *, model):
    return metrics.classification_loss(model.apply({"params": params}, batch["inputs"]), batch["labels"], batch["mask"])


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    return metrics.classification_metrics(
        model.apply({"params": params}, batch["inputs"]), batch["labels"], batch["mask"]
    )
