"""The exit rule: confidence measures and the choice of the exit that answers.

This module is the one place where thresholds are applied. The executor (batch 1 and
batched), the engine's reference step, :func:`select_exits`, the threshold sweeps and
operating points in ``specialize.evaluation.curves`` and the calibration in
``specialize.policy`` all compare through :func:`accepts`, so a sample's exit is decided by
the same comparison everywhere, ties included.

The rule: exits are evaluated in order ``0 .. K-1``; exit ``k`` answers when its confidence
``c_k >= threshold_k`` (:func:`accepts`); the first exit that accepts answers and nothing
deeper runs. The last exit always answers, whatever its threshold. A NaN confidence never
clears a threshold.

The comparison is made in one dtype, :data:`RULE_DTYPE` (float32, what the models compute
confidences in): :func:`rule_values` rounds confidences and thresholds to it (to the nearest
float32), so a threshold of ``0.9`` accepts a confidence of ``float32(0.9)`` on every path.
Thresholds are reported as configured (:func:`normalize_thresholds`, float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "CONFIDENCE_MEASURES",
    "RULE_DTYPE",
    "accepts",
    "confidence",
    "exit_thresholds",
    "normalize_thresholds",
    "rule_values",
    "select_exits",
]

CONFIDENCE_MEASURES: tuple[str, ...] = ("max_softmax", "margin", "neg_entropy")
"""Names accepted by :func:`confidence`; larger values always mean "more confident"."""

RULE_DTYPE = torch.float32
"""The dtype confidences and thresholds are compared in (see the module docstring)."""


def _check_measure(measure: str) -> None:
    if measure not in CONFIDENCE_MEASURES:
        raise ValueError(
            f"unknown confidence measure {measure!r}; use one of {', '.join(CONFIDENCE_MEASURES)}"
        )


def confidence(logits: Tensor, measure: str = "max_softmax") -> Tensor:
    """Confidence of each sample's prediction from one exit's logits.

    Measures (all computed from the softmax of the logits):

    * ``max_softmax``: the largest class probability, in ``[1/C, 1]``.
    * ``margin``: top-1 minus top-2 probability, in ``[0, 1]`` (``1`` when ``C == 1``).
    * ``neg_entropy``: minus the entropy in nats, ``sum_c p_c log p_c``, in ``[-log C, 0]``.

    Args:
        logits: Logits of shape ``(B, C)``.
        measure: One of :data:`CONFIDENCE_MEASURES`.

    Returns:
        Confidence of shape ``(B,)``, in the logits' dtype (float32 for half precision input).

    Raises:
        ValueError: ``measure`` is unknown or ``logits`` is not 2-D.
    """
    _check_measure(measure)
    if logits.ndim != 2:
        raise ValueError(
            f"logits must have shape (B, C), got {tuple(logits.shape)}; "
            "flatten extra dimensions before calling confidence()"
        )
    if not logits.is_floating_point() or logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    log_probs = logits.log_softmax(dim=-1)
    probs = log_probs.exp()
    if measure == "max_softmax":
        return probs.amax(dim=-1)
    if measure == "margin":
        if probs.shape[-1] < 2:
            return probs[:, 0]
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    # p log p -> 0 as p -> 0; also covers classes masked with -inf logits.
    return torch.where(probs > 0, probs * log_probs, 0.0).sum(dim=-1)


def rule_values(values: float | Sequence[float] | Tensor) -> Tensor:
    """Confidences or thresholds as the rule compares them: :data:`RULE_DTYPE`, nearest value.

    Example:
        >>> rule_values(0.9) == torch.tensor(0.9, dtype=torch.float64).float()
        tensor(True)

    Args:
        values: A number, a sequence, a numpy array or a tensor (any floating dtype).

    Returns:
        ``values`` as a float32 tensor (the tensor itself when it already is one).
    """
    values = torch.as_tensor(values)
    return values if values.dtype == RULE_DTYPE else values.to(RULE_DTYPE)


def accepts(confidence: Tensor, threshold: float | Tensor) -> Tensor:
    """Whether an exit may answer: ``confidence >= threshold``, both as :func:`rule_values`.

    Args:
        confidence: Confidence values of any shape.
        threshold: A number or a tensor broadcastable against ``confidence``.

    Returns:
        A bool tensor of the broadcast shape.
    """
    return rule_values(confidence) >= rule_values(threshold)


def normalize_thresholds(thresholds: float | Sequence[float] | Tensor, num_exits: int) -> Tensor:
    """Expand a threshold specification to one value per exit.

    Args:
        thresholds: A number (applied to every early exit), or a sequence of length
            ``num_exits - 1`` (one per early exit) or ``num_exits`` (the last entry is
            ignored). ``+inf`` means "this exit never answers early".
        num_exits: Number of exits ``K`` (at least 1).

    Returns:
        A float64 tensor of shape ``(K,)`` whose last entry is ``-inf`` (the last exit
        always answers).

    Raises:
        ValueError: ``num_exits < 1``, the sequence has the wrong length, or a threshold is NaN.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be at least 1, got {num_exits}")
    values = torch.as_tensor(thresholds, dtype=torch.float64).detach().cpu()
    if values.ndim == 0:
        values = values.expand(num_exits - 1)
    elif values.ndim != 1 or values.numel() not in (num_exits - 1, num_exits):
        raise ValueError(
            f"expected one threshold, or {num_exits - 1} (one per early exit) or {num_exits} "
            f"(one per exit) thresholds for {num_exits} exits, got shape {tuple(values.shape)}"
        )
    if torch.isnan(values).any():
        raise ValueError(f"thresholds must not be NaN, got {values.tolist()}")
    out = torch.empty(num_exits, dtype=torch.float64)
    out[: num_exits - 1] = values[: num_exits - 1]
    out[-1] = -math.inf
    return out


def exit_thresholds(thresholds: float | Sequence[float] | Tensor, num_exits: int) -> Tensor:
    """:func:`normalize_thresholds` as the rule compares them: float32 ``(K,)``, last ``-inf``.

    Raises:
        ValueError: As :func:`normalize_thresholds`.
    """
    return rule_values(normalize_thresholds(thresholds, num_exits))


def select_exits(confidences: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """Index of the exit that answers for each sample.

    The first exit ``k`` with ``accepts(confidences[:, k], thresholds[k])`` answers; the last
    exit always answers (its threshold is ignored). Both are compared as float32
    (:func:`rule_values`), so a threshold of ``0.7`` accepts a confidence of ``float32(0.7)``.

    Args:
        confidences: Confidence of every exit, shape ``(N, K)``.
        thresholds: One threshold per exit, shape ``(K,)`` (see :func:`normalize_thresholds`
            to build it from a number or a list of ``K - 1``).

    Returns:
        An int64 tensor of shape ``(N,)`` with values in ``[0, K)``.

    Raises:
        ValueError: ``confidences`` is not 2-D or ``thresholds`` does not have ``K`` entries.
    """
    if confidences.ndim != 2 or confidences.shape[1] < 1:
        raise ValueError(
            f"confidences must have shape (N, K) with K >= 1, got {tuple(confidences.shape)}"
        )
    num_exits = confidences.shape[1]
    thresholds = torch.as_tensor(thresholds)
    if thresholds.shape != (num_exits,):
        raise ValueError(
            f"expected {num_exits} thresholds (one per exit), got shape {tuple(thresholds.shape)}; "
            "use normalize_thresholds(thresholds, num_exits) to expand a number or a shorter list"
        )
    accepted = accepts(confidences, thresholds.to(device=confidences.device))
    accepted[:, -1] = True
    # argmax returns the first maximal index, i.e. the first exit that accepts.
    return accepted.to(torch.uint8).argmax(dim=1).to(torch.int64)
