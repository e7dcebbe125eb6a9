"""Image transformations in numpy for the pipelines: grey-level pixels to model inputs, MNIST's
random shifts, CIFAR's normalisation and crop + flip.

Random ones take a `np.random.Generator` that grain seeds from the pipeline seed and the
element's position, so the same seed gives the same augmented batches, also after a restore.
Legend: H height, W width, C channels.
"""

import functools
from typing import Callable

import numpy as np

# Per-channel mean and standard deviation of the CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def normalize(
    image_HxWxC: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], scale: float = 255.0
) -> np.ndarray:
    """float32 (image / scale - mean) / std, per channel."""
    image = image_HxWxC.astype(np.float32) / scale
    return (image - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_crop_flip(image_HxWxC: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """Zero-pads by `padding`, crops back to HxW at a random offset, then flips left-right half the time."""
    height, width = image_HxWxC.shape[:2]
    padded = np.pad(image_HxWxC, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    crop = padded[top : top + height, left : left + width]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def cifar_train_transform(record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CIFAR training example: random crop and flip, then normalized float32 image and int32 label."""
    image = random_crop_flip(record["image"], rng)
    return {"inputs": normalize(image, CIFAR10_MEAN, CIFAR10_STD), "labels": np.int32(record["label"])}


def cifar_eval_transform(record) -> dict[str, np.ndarray]:
    """CIFAR evaluation example: normalized, no augmentation."""
    return {"inputs": normalize(record["image"], CIFAR10_MEAN, CIFAR10_STD), "labels": np.int32(record["label"])}


def pixels(record, *, scale: float, flat: bool) -> dict[str, np.ndarray]:
    """A grey-level image (H x W) or a batch of them as float32 in 0..1 (pixel / scale), flattened to
    H * W or given a channel axis (H x W x 1), and the int32 label."""
    image = np.asarray(record["image"], np.float32) / scale
    inputs = image.reshape(*image.shape[:-2], -1) if flat else image[..., None]
    return {"inputs": inputs, "labels": np.asarray(record["label"], np.int32)}


def random_shift(
    record, rng: np.random.Generator, *, max_shift: int, scale: float, flat: bool = False
) -> dict[str, np.ndarray]:
    """`pixels` of the image moved by up to `max_shift` pixels along each axis, the uncovered border black."""
    image_HxW = np.asarray(record["image"])
    height, width = image_HxW.shape
    top, left = rng.integers(0, 2 * max_shift + 1, size=2)
    shifted = np.pad(image_HxW, max_shift)[top : top + height, left : left + width]
    return pixels({"image": shifted, "label": record["label"]}, scale=scale, flat=flat)


def random_shifts(max_shift: int, scale: float, flat: bool = False) -> Callable | None:
    """`random_shift` with these settings as a pipeline's random transform; None (no augmentation) for 0."""
    return functools.partial(random_shift, max_shift=max_shift, scale=scale, flat=flat) if max_shift else None
