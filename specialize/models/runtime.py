"""What a loaded model needs at run time: its input transform and the CPU thread count.

Shared by the preparation of models (:mod:`specialize.models.zoo`,
:mod:`specialize.models.pretrained`), the run and the command line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from backbones.contract import MultiExitModel
from streams.datasets import ArrayDataset
from streams.transforms import InputTransform

__all__ = ["input_transform", "model_input_options", "threads"]


@contextlib.contextmanager
def threads(count: int | None) -> Iterator[None]:
    """Use ``count`` torch CPU threads inside the block (``None``: leave as it is)."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def model_input_options(model: MultiExitModel) -> dict[str, Any]:
    """How a model wants its inputs: channels, size and (pretrained) normalisation.

    Returns:
        Keyword arguments of ``streams.replay.build_stream`` (``in_chans``, ``input_size``,
        ``mean``, ``std``, ``interpolation``); ``mean``/``std`` are ``None`` when the model
        uses its data set's statistics.
    """
    preprocessing = model.preprocessing or {}
    return {"in_chans": model.input_size[0], "input_size": tuple(model.input_size[1:]),
            "mean": preprocessing.get("mean"), "std": preprocessing.get("std"),
            "interpolation": preprocessing.get("interpolation", "bilinear")}


def input_transform(model: MultiExitModel, data: ArrayDataset) -> InputTransform:
    """The transform that turns ``data``'s uint8 images into ``model``'s inputs."""
    options = model_input_options(model)
    return InputTransform(data.mean if options["mean"] is None else options["mean"],
                          data.std if options["std"] is None else options["std"],
                          in_chans=options["in_chans"], size=options["input_size"],
                          interpolation=options["interpolation"])
