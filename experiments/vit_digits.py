"""MNIST with a small Vision Transformer (Dosovitskiy et al. 2021): 7x7 patches, 4 blocks of width 64.

  python launch.py --config experiments/vit_digits.py --workdir runs/vit_digits          # full MNIST
  python launch.py --config experiments/vit_digits.py:cpu --workdir runs/vit_digits_cpu
A 28x28 image is 16 patches of 7x7 plus the [CLS] token; pre-LayerNorm blocks with 4 heads, MLP
width 128, dropout 0.1; Adam 1e-3 at batch 128. No published number to match: the point of
comparison is mnist_cnn on the same splits, since a ViT lacks the convolution's locality prior
and needs more data (the ViT paper's own finding), so on 4,500 images it should trail the CNN.
Default: 20 epochs of 54,000 images. `:cpu`: 30 epochs of the shipped 4,500-image subset, tested
on the official 10,000: expected test accuracy ~0.93 (mnist_cnn without shifts: ~0.977) in ~4
minutes on a 2-core CPU (docs/results.md). `:smoke` (one block of width 32, 30 steps): ~0.41 on
256 test images.
"""

import flax.linen as nn
import ml_collections

from research import metrics
from research.config import choose, trainer_config
from research.data import mnist
from research.models import apply_with_dropout, compute_dtype
from research.models.vit import ViT


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {"name": "mnist", "splits": mnist.SPLITS, "max_shift": 0}
    )  # max_shift as mnist_cnn's
    config.model = ml_collections.ConfigDict(
        {
            "patch_size": 7,
            "num_layers": 4,
            "num_heads": 4,
            "width": 64,
            "mlp_dim": 128,
            "dropout_rate": 0.1,
            "dtype": "float32",
            "remat": "none",  # compute dtype (bfloat16: mixed precision); transformer.REMAT_POLICIES
        }
    )
    config.update_from_flattened_dict(
        {  # 20 epochs of 54,000 images at batch 128
            "num_steps": 8440,
            "batch_size": 128,
            "eval_every": 2110,
            "optimizer.name": "adam",
            "optimizer.learning_rate": 1e-3,
        }
    )
    cpu = mnist.OFFLINE | {"num_steps": 1050, "eval_every": 350, "log_every": 35}
    smoke = mnist.SMOKE | {
        "model.num_layers": 1,
        "model.width": 32,
        "model.mlp_dim": 64,
        "num_steps": 30,
        "batch_size": 32,
        "eval_every": 0,
        "log_every": 5,
        "optimizer.learning_rate": 3e-3,
    }
    config.update_from_flattened_dict(choose(arg, {None: {}, "cpu": cpu, "smoke": smoke}))
    return config


def make_data(config: ml_collections.ConfigDict, split: str):
    return mnist.batches(config, split, flat=False, max_shift=config.data.max_shift)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    return ViT(num_classes=10, **(config.model.to_dict() | {"dtype": compute_dtype(config.model.dtype)}))


def loss_fn(params, batch, rng, *, model):
    logits_BxK = apply_with_dropout(model, {"params": params}, batch["inputs"], rng=rng)
    return metrics.classification_loss(logits_BxK, batch["labels"], batch["mask"])


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    return metrics.classification_metrics(
        model.apply({"params": params}, batch["inputs"]), batch["labels"], batch["mask"]
    )
