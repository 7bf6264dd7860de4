"""Batch input transform: uint8 images to the float32 tensors a model expects."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["INTERPOLATIONS", "InputTransform"]

INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass(frozen=True)
class InputTransform:
    """Scale, normalise and adapt a batch of uint8 images, all as tensor operations.

    ``images / 255`` is normalised per channel with the data set's ``mean`` and ``std``;
    then the channels are adapted to ``in_chans`` (1 -> 3 repeats the channel, 3 -> 1 takes
    the mean) and the spatial size to ``size`` (``F.interpolate`` with ``interpolation``).

    Attributes:
        mean: Per-channel mean of the source images, pixel values in [0, 1].
        std: Per-channel standard deviation of the source images.
        in_chans: Channels the model expects; ``None`` keeps the source channels.
        size: ``(height, width)`` (or one int) the model expects; ``None`` keeps the size.
        interpolation: ``bilinear`` or ``bicubic`` resizing (pretrained weights may expect
            the one they were trained with).

    Example:
        >>> transform = InputTransform((0.286,), (0.353,), in_chans=3, size=32)
        >>> transform(torch.zeros(8, 1, 28, 28, dtype=torch.uint8)).shape
        torch.Size([8, 3, 32, 32])
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_chans: int | None = None
    size: int | tuple[int, int] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        mean, std = tuple(float(m) for m in self.mean), tuple(float(s) for s in self.std)
        if not mean or len(mean) != len(std):
            raise ValueError(
                f"InputTransform: mean and std need one value per channel, got {mean} and {std}"
            )
        if min(std) <= 0:
            raise ValueError(f"InputTransform: std must be > 0 per channel, got {std}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "size", _size_pair(self.size))
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"InputTransform: interpolation must be one of "
                             f"{', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        _check_channel_adaptation(len(mean), self.in_chans)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Transform a batch.

        Args:
            images: uint8 tensor ``(N, C, H, W)`` with ``C == len(mean)``.

        Returns:
            float32 tensor ``(N, in_chans or C, *(size or (H, W)))``.

        Raises:
            ValueError: The batch is not uint8 ``(N, C, H, W)`` with the expected channels.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(
                f"InputTransform expects a uint8 batch (N, {len(self.mean)}, H, W), got "
                f"{images.dtype} of shape {tuple(images.shape)}"
            )
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        x = (images.to(torch.float32) / 255.0 - mean) / std
        x = self._adapt_channels(x)
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.interpolation, align_corners=False)
        return x

    def _adapt_channels(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if self.in_chans is None or self.in_chans == channels:
            return x
        if channels == 1:
            return x.expand(-1, self.in_chans, -1, -1).contiguous()
        return x.mean(dim=1, keepdim=True)


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(
            f"InputTransform: size must be a positive int or (height, width), got {size!r}"
        )
    return int(pair[0]), int(pair[1])


def _check_channel_adaptation(source: int, target: int | None) -> None:
    if target is None or target == source:
        return
    if (source, target) not in ((1, 3), (3, 1)):
        raise ValueError(
            f"InputTransform: cannot adapt {source} channels to in_chans={target}; "
            "allowed: the same count, 1 -> 3 (repeat) or 3 -> 1 (mean)"
        )
