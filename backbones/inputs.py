"""What a multi-exit model accepts as input, checked in one place for the engine and executor.

A batch is a ``torch.Tensor`` of shape ``(B, *model.input_size)`` (``B >= 0``), floating
point. Per case:

* **wrong type, number of dimensions, channels or size**: ``ValueError`` (adapt the images
  with ``streams.transforms.InputTransform(in_chans=..., size=...)``);
* **integer or bool dtype** (e.g. raw ``uint8`` images): ``ValueError`` (they are not
  normalised: ``InputTransform`` does it);
* **another floating dtype** (float64, float16, bfloat16): cast to the model's dtype
  (float32), since that is the precision the model computes in anyway: float16 and bfloat16
  convert exactly, float64 rounds to the nearest float32, and a float64 value beyond float32's
  range becomes ``inf`` and so counts as non-finite;
* **NaN or inf values**: reported per row by :func:`finite_rows`; the caller raises or skips
  (:class:`InputChecker`'s ``on_bad_input``, the engine's);
* **an empty batch** (``B == 0``): valid; there is nothing to run.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["BAD_INPUT_ACTIONS", "InputChecker", "check_finite", "finite_rows",
           "prepare_inputs"]

BAD_INPUT_ACTIONS = ("error", "skip")  # what rows with NaN or inf values do


def prepare_inputs(x: object, input_size: tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """Check a batch's type, shape and dtype; return it in the model's floating dtype.

    Args:
        x: The batch, expected ``(B, *input_size)`` floating point.
        input_size: ``(C, H, W)`` the model expects.
        dtype: The model's floating dtype (its parameters').

    Returns:
        ``x`` itself when it already has ``dtype``, else ``x`` cast to it.

    Raises:
        ValueError: Not a tensor, a shape other than ``(B, *input_size)``, or not floating
            point; the message says how to fix it.
    """
    expected = f"(B, {', '.join(map(str, input_size))})"
    if not isinstance(x, Tensor):
        raise ValueError(f"input must be a torch.Tensor of shape {expected}, got "
                         f"{type(x).__name__}; stack samples with torch.stack")
    if x.dim() != len(input_size) + 1 or tuple(x.shape[1:]) != tuple(input_size):
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not fit the model: expected {expected}; "
            "adapt channels/size with streams.transforms.InputTransform(in_chans=..., size=...)"
        )
    if not x.is_floating_point():
        raise ValueError(f"input dtype {x.dtype} is not floating point; normalise uint8 "
                         "images with streams.transforms.InputTransform first")
    return x if x.dtype == dtype else x.to(dtype)


def finite_rows(x: Tensor) -> Tensor:
    """``(B,)`` bool: whether every value of each row of ``x`` is finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def check_finite(x: Tensor, fix: str = "fix the data") -> None:
    """Raise unless every value of ``x`` is finite.

    Args:
        x: A batch ``(B, ...)``.
        fix: What the message suggests.

    Raises:
        ValueError: Naming the first row with a NaN or inf value.
    """
    if bool(torch.isfinite(x).all()):  # one reduction on the hot path
        return
    bad = int((~finite_rows(x)).nonzero()[0])
    raise ValueError(f"input row {bad} has NaN/inf values; {fix}")


class InputChecker:
    """Validates engine inputs, per case (the module docstring lists them).

    Args:
        input_size: ``(C, H, W)`` the model expects.
        on_bad_input: What rows with NaN or inf values do: ``error`` raises; ``skip`` marks
            them invalid (counted, never learned from). Inputs of the wrong type, shape or an
            integer dtype raise either way.
        dtype: The model's floating dtype; other floating inputs are cast to it.
    """

    def __init__(self, input_size: tuple[int, ...], on_bad_input: str = "error",
                 dtype: torch.dtype = torch.float32) -> None:
        if on_bad_input not in BAD_INPUT_ACTIONS:
            raise ValueError(f"on_bad_input must be one of {BAD_INPUT_ACTIONS}, "
                             f"got {on_bad_input!r}")
        self.input_size = tuple(input_size)
        self.on_bad_input = on_bad_input
        self.dtype = dtype

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(x in the model's dtype, valid rows (B,) bool)``, or raise.

        Raises:
            ValueError: Wrong type, shape or integer dtype; or NaN/inf values with
                ``on_bad_input="error"``. The message names the problem and the fix.
        """
        x = prepare_inputs(x, self.input_size, self.dtype)
        if self.on_bad_input == "skip":
            return x, finite_rows(x)
        check_finite(x, "fix the data or set engine.on_bad_input=skip to count and skip "
                        "such samples")
        return x, torch.ones(x.shape[0], dtype=torch.bool)
