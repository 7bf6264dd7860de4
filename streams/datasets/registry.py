"""Data sets by name: :func:`load_dataset` and :func:`list_datasets`.

Adding a reader takes one new module and one line here: write ``streams/datasets/<name>.py``
with ``load_<name>(root, *, split, **options) -> ArrayDataset`` (``root=None`` meaning the
reader's default folder; keyword options with defaults, which :func:`load_dataset` checks
against the signature), then add ``"<name>": load_<name>`` to ``_READERS`` below.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.datasets.base import ArrayDataset
from streams.datasets.cifar10 import load_cifar10
from streams.datasets.fashion_mnist import load_fashion_mnist
from streams.datasets.image_folder import load_image_folder
from streams.datasets.synthetic import load_synthetic, make_synthetic
from streams.datasets.tiny_imagenet import TINY_IMAGENET_SPLIT_PARTS, load_tiny_imagenet

_READERS: dict[str, Callable[..., ArrayDataset]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "image_folder": load_image_folder,
    "synthetic": load_synthetic,
    "tiny_imagenet": load_tiny_imagenet,
}
# Readers that pass ``**options`` on, and the function whose signature lists those options.
_OPTIONS_OF: dict[str, Callable[..., ArrayDataset]] = {"synthetic": make_synthetic}
# The images of each split in named parts, for readers whose splits are fixed files.
_TRAIN_TEST = {"train": frozenset({"train"}), "test": frozenset({"test"})}
_SPLIT_PARTS: dict[str, dict[str, frozenset[str]]] = {
    "fashion_mnist": _TRAIN_TEST, "cifar10": _TRAIN_TEST,
    "tiny_imagenet": TINY_IMAGENET_SPLIT_PARTS,
}


def shares_images(name: str, split: str, other: str) -> bool | None:
    """Whether two splits of data set ``name`` hold a common image (``None``: not known).

    Example:
        >>> shares_images("tiny_imagenet", "pool", "exits_fit")
        False
        >>> shares_images("fashion_mnist", "train", "train")
        True
        >>> shares_images("synthetic", "train", "test") is None
        True
    """
    parts = _SPLIT_PARTS.get(name, {})
    if split not in parts or other not in parts:
        return None
    return bool(parts[split] & parts[other])


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`.

    Example:
        >>> list_datasets()
        ['cifar10', 'fashion_mnist', 'image_folder', 'synthetic', 'tiny_imagenet']
    """
    return sorted(_READERS)


def _check_options(name: str, options: dict[str, Any]) -> None:
    parameters = inspect.signature(_OPTIONS_OF.get(name, _READERS[name])).parameters
    allowed = sorted(p for p in parameters if p not in ("root", "split"))
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"dataset {name!r} does not take option {unknown[0]!r}; "
            f"allowed: {', '.join(allowed) or 'none'}"
        )


def load_dataset(
    name: str, *, split: str, root: str | Path | None = None, **kwargs: Any
) -> ArrayDataset:
    """Load a data set split by name.

    Args:
        name: One of :func:`list_datasets`: ``fashion_mnist``, ``cifar10``, ``image_folder``,
            ``synthetic``.
        split: Which split, e.g. ``"train"`` or ``"test"``.
        root: Data folder (``None``: the reader's default); not allowed for ``synthetic``.
        **kwargs: Reader options, e.g. ``download=True`` (fashion_mnist), ``size=64``
            (image_folder) or ``num_classes=5`` (synthetic).

    Returns:
        The loaded split.

    Raises:
        ValueError: Unknown name or option; the message lists the allowed ones.

    Example:
        >>> load_dataset("synthetic", split="test", num_classes=5, samples_per_class=8)
        ArrayDataset(name='synthetic/test', size=40, shape=(1, 16, 16), num_classes=5)
        >>> load_dataset("synthetic", split="test", classes=5)
        Traceback (most recent call last):
        ...
        ValueError: dataset 'synthetic' does not take option 'classes'; allowed: image_size, ...
    """
    if name not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    _check_options(name, kwargs)
    return _READERS[name](root, split=split, **kwargs)
