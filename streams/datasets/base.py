"""What every reader returns, the error it raises, and the helpers the readers share.

Every reader returns an :class:`ArrayDataset`: ``images`` uint8 ``(N, C, H, W)``, ``labels``
int64 ``(N,)``, the class names and the per-channel normalisation statistics. Files are read
with vectorised ``numpy.frombuffer`` (no pickle) and validated: a corrupt or truncated file
raises :class:`DataFormatError` naming the file and what was expected.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "test")


class DataFormatError(ValueError):
    """A data file is corrupt, truncated or not in the expected format; the message names it."""


@dataclass(frozen=True, eq=False, repr=False)
class ArrayDataset:
    """An in-memory image classification data set.

    Attributes:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: int64 tensor ``(N,)`` with values in ``[0, len(class_names))``.
        class_names: One name per class id.
        mean: Per-channel mean of the pixel values scaled to [0, 1] (for normalisation).
        std: Per-channel standard deviation, same scale.
        name: What the data is, e.g. ``"fashion_mnist/test"``.
        class_ids: The source's own id of each class (Tiny-ImageNet: WordNet ids), or
            ``None``; pretrained classifiers are matched to the classes by them.

    Example:
        >>> import torch
        >>> data = ArrayDataset(
        ...     images=torch.zeros(4, 1, 8, 8, dtype=torch.uint8),
        ...     labels=torch.tensor([0, 1, 1, 2]),
        ...     class_names=("cat", "dog", "bird"),
        ...     mean=(0.5,),
        ...     std=(0.25,),
        ...     name="toy",
        ... )
        >>> data
        ArrayDataset(name='toy', size=4, shape=(1, 8, 8), num_classes=3)
        >>> data.class_counts().tolist()
        [1, 2, 1]
        >>> data.subset([1, 2], name="dogs").labels.tolist()
        [1, 1]
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    class_ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"{self.name}: images must be a uint8 tensor (N, C, H, W), "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(
                f"{self.name}: labels must be an int64 tensor ({images.shape[0]},), "
                f"got {labels.dtype} of shape {tuple(labels.shape)}"
            )
        channels = images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean and std need one value per channel ({channels}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {len(self.class_names)}), "
                f"got values in [{int(labels.min())}, {int(labels.max())}]"
            )
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.class_ids is not None:
            if len(self.class_ids) != len(self.class_names):
                raise ValueError(f"{self.name}: {len(self.class_ids)} class_ids for "
                                 f"{len(self.class_names)} classes")
            object.__setattr__(self, "class_ids", tuple(self.class_ids))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, size={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(class_names)``), whether or not all are present."""
        return len(self.class_names)

    @property
    def in_chans(self) -> int:
        """Number of image channels ``C``."""
        return int(self.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        """Image height and width ``(H, W)``."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    def class_counts(self) -> torch.Tensor:
        """Number of samples of each class, int64 ``(num_classes,)``."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def subset(
        self, indices: Sequence[int] | np.ndarray | torch.Tensor, *, name: str | None = None
    ) -> ArrayDataset:
        """Return the samples at ``indices`` (in that order) as a new data set.

        Args:
            indices: Positions into this data set.
            name: Name of the subset; defaults to this data set's name.

        Returns:
            A data set sharing class names and normalisation statistics with this one.
        """
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(
            images=self.images[index],
            labels=self.labels[index],
            class_names=self.class_names,
            mean=self.mean,
            std=self.std,
            name=self.name if name is None else name,
            class_ids=self.class_ids,
        )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images ``(N, C, H, W)`` scaled to [0, 1]."""
    if images.shape[0] == 0:
        channels = images.shape[1]
        return (0.5,) * channels, (0.25,) * channels
    scaled = images.astype(np.float64) / 255.0
    mean = scaled.mean(axis=(0, 2, 3))
    std = np.maximum(scaled.std(axis=(0, 2, 3)), 1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def check_split(dataset: str, split: str) -> None:
    """Raise ``ValueError`` naming ``dataset`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"{dataset}: unknown split {split!r}; allowed: {', '.join(SPLITS)}")


def resolve_root(root: str | Path | None, env: str, default: Path) -> Path:
    """The data folder: ``root`` if given, else ``$env`` if set, else ``default``."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    return default


def size_pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    """``(height, width)`` from an int or a pair; ``ValueError`` naming ``what`` otherwise."""
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"{what}: expected a positive int or [height, width], got {size!r}")
    return int(pair[0]), int(pair[1])
