"""Linear regression: recover y = 3x + 2 from noisy samples with one Dense unit, SGD and MSE.

  python launch.py --config experiments/linear_regression.py --workdir runs/linear_regression
Expected: test/slope 3.00 and test/intercept 2.00 (each within 0.01) and test/mse ~0.01, the
noise variance; a few seconds on a CPU. `:smoke` takes fewer steps and lands within 0.05.
Optimizer arguments go under optimizer.kwargs: `--config.optimizer.kwargs.momentum=0.9`.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from research import metrics
from research.config import choose, trainer_config
from research.data import pipeline
from research.experiment import Reference, Workload

SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}

# The data's generating line is the truth a fit should recover.
REFERENCES = tuple(
    Reference(
        config=config,
        metric=f"test/{name}",
        value=value,
        tolerance=tolerance,
        source="the data: y = 3x + 2 + noise",
        kind="truth",
    )
    for config, tolerance in ((None, 0.01), ("smoke", 0.05))
    for name, value in (("slope", 3.0), ("intercept", 2.0))
)
# A workload of the optimizer benchmark (--bench_optimizer): steps to a validation MSE near the noise variance.
BENCHMARK = Workload(
    metric="mse",
    target=0.0125,
    mode="min",
    eval_every=10,
    budget=500,
    baseline_learning_rates=(("adamw", 0.1), ("momentum", 0.05)),
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = trainer_config()
    config.data = ml_collections.ConfigDict(
        {
            "slope": 3.0,
            "intercept": 2.0,
            "noise_std": 0.1,
            "sizes": {"train": 1000, "validation": 200, "test": 200},
            "seed": 0,  # the samples themselves; config.seed orders them
        }
    )
    config.update_from_flattened_dict(
        {
            "num_steps": 300,
            "batch_size": 32,
            "eval_every": 100,
            "optimizer.name": "sgd",
            "optimizer.learning_rate": 0.1,
            "optimizer.schedule.name": "constant",
        }
    )
    config.update_from_flattened_dict(choose(arg, {None: {}, "smoke": {"num_steps": 100, "log_every": 25}}))
    return config


def make_data(config: ml_collections.ConfigDict, split: str):
    """x ~ U(-1, 1), y = slope * x + intercept + N(0, noise_std^2); each split drawn independently."""
    rng = np.random.default_rng([config.data.seed, SPLIT_SEEDS[split]])
    size = config.data.sizes[split]
    x_Nx1 = rng.uniform(-1.0, 1.0, size=(size, 1)).astype(np.float32)
    noise_Nx1 = rng.normal(0.0, config.data.noise_std, size=(size, 1))
    y_Nx1 = (config.data.slope * x_Nx1 + config.data.intercept + noise_Nx1).astype(np.float32)
    source = pipeline.array_source(inputs=x_Nx1, targets=y_Nx1)
    if split == "train":
        return pipeline.train_batches(source, batch_size=config.batch_size, seed=config.seed)
    return pipeline.eval_batches(source, batch_size=config.eval_batch_size)


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    del config
    return nn.Dense(features=1)


def loss_fn(params, batch, rng, *, model):
    del rng
    predictions_Bx1 = model.apply({"params": params}, batch["inputs"])
    return metrics.masked_mean(jnp.square(predictions_Bx1 - batch["targets"]), batch["mask"][:, None]), {}


def eval_fn(params, batch, *, model) -> dict[str, metrics.Metric]:
    """Test MSE, plus the fitted slope and intercept (a mean of a constant is that constant)."""
    predictions_Bx1 = model.apply({"params": params}, batch["inputs"])
    mask_Bx1 = batch["mask"][:, None]
    ones_Bx1 = jnp.ones_like(predictions_Bx1)
    return {
        "mse": metrics.MeanSquaredError.from_predictions(predictions_Bx1, batch["targets"], mask_Bx1),
        "slope": metrics.Mean.from_values(params["kernel"][0, 0] * ones_Bx1, mask_Bx1),
        "intercept": metrics.Mean.from_values(params["bias"][0] * ones_Bx1, mask_Bx1),
    }
