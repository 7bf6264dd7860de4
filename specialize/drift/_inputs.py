"""Checks of what the tracker and the detectors are fed: scalars, arrays or tensors."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

ArrayLike = Any  # Python scalar, sequence, numpy array or torch tensor (0-D or 1-D)


def to_1d(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a 1-D numpy array (torch tensors are detached and moved to the CPU).

    Raises:
        ValueError: ``value`` has more than one dimension.
    """
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {array.shape}")
    return array.reshape(-1)


def to_index(value: ArrayLike, name: str, size: int) -> np.ndarray:
    """Integer indices in ``[0, size)`` as int64, with an error naming ``name`` otherwise.

    Raises:
        TypeError: The values are not integers.
        ValueError: A value lies outside ``[0, size)``.
    """
    array = to_1d(value, name)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= size):
        raise ValueError(
            f"{name} must lie in [0, {size}), got values in [{array.min()}, {array.max()}]"
        )
    return array


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int if it is a positive integer (``bool`` is not).

    Raises:
        ValueError: ``value`` is not a positive integer.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)
