"""CIFAR-10 with the CIFAR ResNets of He et al. 2016 (20/32/56 layers by `model.depth`), BatchNorm, crop + flip.

  python launch.py --config experiments/cifar10_resnet.py --workdir runs/resnet20            # one GPU
  python launch.py --config experiments/cifar10_resnet.py --config.model.depth=56 --workdir runs/resnet56
  python launch.py --config experiments/cifar10_resnet.py:cpu --workdir runs/resnet20_cpu
Needs cifar-10-binary.tar.gz in DATA_DIR/downloads/manual/ (or internet access).
Source: He et al. 2016, "Deep residual learning for image recognition", sec. 4.2 and Table 6:
test accuracy 91.25% (ResNet-20), 92.49% (ResNet-32), 93.03% (ResNet-56). Their recipe, our
default config: 45k/5k split, 4-pixel padding + random 32x32 crop + flip, per-channel
normalization, SGD + momentum 0.9, weight decay 1e-4 (`optimizer.l2_penalty`, the L2 term
Torch's SGD adds to the gradient, sparing biases and BatchNorm scales), batch 128, 64k steps, lr
0.1 divided by 10 at 32k and 48k (the `piecewise` schedule). BatchNorm statistics live in
`TrainState.model_state`; evaluation uses the running averages. `:cpu` is ResNet-20 for one epoch
(700 steps of 64, ~15 minutes on a 2-core CPU): a pipeline check on real data, far below the
paper; not measured here (no CIFAR-10 offline). `:smoke` runs anywhere: ResNet-8 on synthetic
CIFAR-shaped images whose class sets the mean colour, through the same crop + flip pipeline.
"""

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from research import metrics, perf
from research.config import choose, trainer_config
from research.data import augment, pipeline
from research.experiment import Reference
from research.models import compute_dtype
from research.models.resnet import CifarResNet

SYNTHETIC = "synthetic"  # data.name of the smoke config: generated in memory, no files needed

# He et al. 2016, Table 6 (test error 8.75 / 7.51 / 6.97 %); needs the data and a GPU.
REFERENCES = tuple(
    Reference(
        config=None,
        metric="test/accuracy",
        value=accuracy,
        tolerance=0.005,
        better="max",
        source=f"He et al. 2016, Table 6, ResNet-{depth}",
        kind="published",
        overrides=(("model.depth", depth),),
    )
    for depth, accuracy in ((20, 0.9125), (32, 0.9249), (56, 0.9303))
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "name": "cifar10",
            "splits": {"train": "train[:90%]", "validation": "train[90%:]", "test": "test"},  # He et al.'s 45k/5k
            "synthetic_size": 0,  # examples per split when name is "synthetic"
        }
    )
    config.model = ml_collections.ConfigDict(
        {"depth": 20, "width": 16, "dtype": "float32"}
    )  # compute dtype; bfloat16: mixed precision
    config.update_from_flattened_dict(
        {
            "num_steps": 64000,
            "batch_size": 128,
            "eval_every": 2000,
            "log_every": 100,
            "optimizer.name": "momentum",
            "optimizer.kwargs.momentum": 0.9,
            "optimizer.l2_penalty": 1e-4,
            "optimizer.schedule.name": "piecewise",
            "optimizer.schedule.boundaries": (32000, 48000),
            "optimizer.schedule.factors": (0.1, 0.1),
            "optimizer.learning_rate": 0.1,
            "checkpoint.every_minutes": 10.0,
        }
    )
    config.update_from_flattened_dict(
        choose(
            arg,
            {
                None: {},
                "cpu": {"num_steps": 700, "batch_size": 64, "eval_every": 350, "log_every": 50},
                "smoke": {
                    "data.name": SYNTHETIC,
                    "data.synthetic_size": 256,
                    "model.depth": 8,
                    "model.width": 8,
                    "num_steps": 30,
                    "batch_size": 32,
                    "eval_batch_size": 64,
                    "eval_every": 0,
                    "log_every": 5,
                    "optimizer.learning_rate": 0.05,
                    "checkpoint.every_minutes": 0.0,
                },
            },
        )
    )
    return config


def synthetic_source(size: int, split: str) -> list[dict[str, np.ndarray]]:
    """CIFAR-shaped uint8 records whose label sets the mean colour, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(["train", "validation", "test"].index(split))
    labels_N = rng.integers(0, 10, size=size)
    colours_Kx3 = np.random.default_rng(10).integers(40, 216, size=(10, 3))
    noise_NxHxWxC = rng.normal(0, 40, size=(size, 32, 32, 3))
    images_NxHxWxC = np.clip(colours_Kx3[labels_N][:, None, None, :] + noise_NxHxWxC, 0, 255).astype(np.uint8)
    return pipeline.array_source(image=images_NxHxWxC, label=labels_N)


def make_data(config: ml_collections.ConfigDict, split: str):
    synthetic = synthetic_source(config.data.synthetic_size, split) if config.data.name == SYNTHETIC else None
    crop_and_flip = augment.cifar_train_transform
    return pipeline.labelled_batches(
        config, split, transform=augment.cifar_eval_transform, random_transform=crop_and_flip, source=synthetic
    )


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    return CifarResNet(depth=config.model.depth, width=config.model.width, dtype=compute_dtype(config.model.dtype))


def flops_per_example(config: ml_collections.ConfigDict) -> float:
    """Training FLOPs of one 32x32 image (research/perf.py), for the logged MFU."""
    return perf.resnet_training_flops_per_example(config.model.depth, config.model.width, classes=10)


def init_variables(model: nn.Module, rng: jax.Array, batch) -> dict:
    """Parameters and the BatchNorm running averages (`batch_stats`)."""
    return model.init(rng, batch["inputs"], train=False)


def loss_fn(params, batch, rng, *, model, model_state) -> tuple[jax.Array, dict]:
    """Training (rng given): batch statistics, updated running averages. Evaluation (rng None): running averages."""
    variables = {"params": params, **model_state}
    if rng is None:
        logits_BxK, new_model_state = model.apply(variables, batch["inputs"], train=False), model_state
    else:
        logits_BxK, new_model_state = model.apply(variables, batch["inputs"], train=True, mutable=["batch_stats"])
    cross_entropy, aux = metrics.classification_loss(
        logits_BxK, batch["labels"], batch["mask"]
    )  # optimizer.l2_penalty adds the weight decay
    return cross_entropy, aux | {"model_state": new_model_state}


def eval_fn(params, batch, *, model, model_state) -> dict[str, metrics.Metric]:
    logits_BxK = model.apply({"params": params, **model_state}, batch["inputs"], train=False)
    return metrics.classification_metrics(logits_BxK, batch["labels"], batch["mask"])
