"""Per-example image transformations in numpy, for grain's `map` and `random_map`.

Random ones take a `np.random.Generator` that grain seeds from the pipeline seed and the
element's position, so the same seed gives the same augmented batches, also after a restore.
Legend: H height, W width, C channels.
"""

import numpy as np

# Per-channel mean and standard deviation of the CIFAR-10 training images, on the 0..1 scale.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def normalize(image_HxWxC: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], scale: float = 255.0) -> np.ndarray:
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
