"""Seeded class-conditional images whose difficulty grows with the class id."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streams.datasets.base import SPLITS, ArrayDataset, channel_stats, check_split, size_pair


def make_synthetic(
    *,
    split: str = "train",
    num_classes: int = 10,
    samples_per_class: int = 200,
    image_size: int | Sequence[int] = 16,
    in_chans: int = 1,
    noise_min: float = 0.05,
    noise_max: float = 0.6,
    seed: int = 0,
) -> ArrayDataset:
    """Generate a seeded class-conditional data set for fast tests and demos.

    Each class has a random prototype image (shared by all splits of the same ``seed``);
    a sample is its prototype plus Gaussian noise whose standard deviation grows linearly
    with the class id, from ``noise_min`` (class 0, easy) to ``noise_max`` (last class, hard).
    Samples are shuffled; the train and test splits use independent noise.

    Args:
        split: ``"train"`` or ``"test"``.
        num_classes: Number of classes (>= 1).
        samples_per_class: Samples of each class (>= 1).
        image_size: Height and width, an int or ``[height, width]``.
        in_chans: Number of channels (>= 1).
        noise_min: Noise standard deviation of class 0, in [0, 1] pixel units.
        noise_max: Noise standard deviation of the last class.
        seed: Identity of the data set (prototypes and noise).

    Returns:
        ``num_classes * samples_per_class`` images with class names ``class_0``, ....

    Example:
        >>> data = make_synthetic(num_classes=3, samples_per_class=4, image_size=8, seed=1)
        >>> data
        ArrayDataset(name='synthetic/train', size=12, shape=(1, 8, 8), num_classes=3)
        >>> data.class_counts().tolist(), data.class_names
        ([4, 4, 4], ('class_0', 'class_1', 'class_2'))
    """
    check_split("synthetic", split)
    height, width = size_pair(image_size, "synthetic image_size")
    for name, value in (
        ("num_classes", num_classes),
        ("samples_per_class", samples_per_class),
        ("in_chans", in_chans),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"synthetic {name}: must be an integer >= 1, got {value!r}")
    if not 0 <= noise_min <= noise_max:
        raise ValueError(
            f"synthetic noise: need 0 <= noise_min <= noise_max, got {noise_min} and {noise_max}"
        )
    proto_rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(0,))))
    prototypes = proto_rng.uniform(0.15, 0.85, size=(num_classes, in_chans, height, width))
    rng = np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(1 + SPLITS.index(split),)))
    )
    labels = rng.permutation(np.repeat(np.arange(num_classes), samples_per_class))
    noise_std = np.linspace(noise_min, noise_max, num_classes) if num_classes > 1 else [noise_min]
    sigma = np.asarray(noise_std)[labels][:, None, None, None]
    pixels = prototypes[labels] + sigma * rng.standard_normal(prototypes[labels].shape)
    images = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    mean, std = channel_stats(images)
    return ArrayDataset(
        images=torch.from_numpy(images),
        labels=torch.from_numpy(labels.astype(np.int64)),
        class_names=tuple(f"class_{k}" for k in range(num_classes)),
        mean=mean,
        std=std,
        name=f"synthetic/{split}",
    )


def load_synthetic(root: str | Path | None = None, **kwargs: Any) -> ArrayDataset:
    """:func:`make_synthetic` as a :func:`load_dataset` reader: generated data has no root."""
    if root is not None:
        raise ValueError("dataset 'synthetic' is generated and takes no root; remove data.root")
    return make_synthetic(**kwargs)
