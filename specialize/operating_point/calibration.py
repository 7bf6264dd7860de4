"""Temperature scaling: one scalar that makes an exit's softmax match its accuracy.

Guo et al., 2017: divide the logits by ``T`` fitted to minimise the negative log-likelihood
on held-out labelled data. ``T > 1`` softens an overconfident exit. The budget controller
(:mod:`specialize.operating_point.search`) reads the final exit's calibrated softmax as the belief
that an earlier exit's answer is right, so an overconfident final exit would overstate how
much accuracy early answers lose (about 2x on the default model, uncalibrated).

Example:
    >>> import torch
    >>> generator = torch.Generator().manual_seed(0)
    >>> labels = torch.randint(0, 5, (2000,), generator=generator)
    >>> logits = 3.0 * torch.randn(2000, 5, generator=generator)
    >>> logits[torch.arange(2000), labels] += 6.0
    >>> round((logits.argmax(1) == labels).float().mean().item(), 2)  # accuracy
    0.79
    >>> round(logits.softmax(1).amax(1).mean().item(), 2)  # overconfident
    0.86
    >>> temperature = fit_temperature(logits, labels)
    >>> round(temperature, 2), round((logits / temperature).softmax(1).amax(1).mean().item(), 2)
    (1.48, 0.79)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fit_temperature"]

_LOW, _HIGH = math.log(0.05), math.log(20.0)  # search range of log T


@torch.no_grad()
def fit_temperature(logits: Tensor, labels: Tensor, *, tolerance: float = 1e-4) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (golden-section on log T).

    The NLL is convex in ``1 / T``, so the one-dimensional search finds its minimum.

    Args:
        logits: ``(N, C)`` logits (or log-probabilities) of held-out samples.
        labels: ``(N,)`` their true classes.
        tolerance: Width of the final bracket in ``log T``.

    Returns:
        ``T`` in ``[0.05, 20]``.

    Raises:
        ValueError: Shapes disagree or there is no sample.
    """
    if logits.ndim != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"fit_temperature needs logits (N, C) and labels (N,) with N >= 1, "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    logits, labels = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    low, high = _LOW, _HIGH
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > tolerance:
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2.0)
