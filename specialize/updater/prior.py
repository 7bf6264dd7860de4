"""The stream's class prior, estimated without labels, and prior-corrected pseudo-labels.

A class-skewed stream shows only a few classes, but the exit that answers a sample spreads
its doubt over all of them: on a stream of six dog breeds, Tiny-ImageNet's final exit is
right 56 % of the time, and most of its errors name a class the stream never shows. The
prior ``pi(c)`` of the stream's classes is estimated from the served predictions themselves
(an exponential moving count over about ``window`` samples, plus one pseudo-count per class),
and the pseudo-label becomes the argmax of ``p(c | x) * pi(c) / (1 / C)``: Bayes' rule for a
model trained on balanced classes and served on a skewed stream (Saerens et al., 2002, with
a one-step estimate instead of EM). Measured on Tiny-ImageNet's dogs, this lifts the
pseudo-labels from 56 % to 65 % right.

Only the teaching targets change: the served heads, and so every answer, stay what they
were. A class that leaves the stream loses its prior within about ``window`` samples; a
drift reset (``HeadUpdater.reset``) forgets it at once.

Example:
    >>> import torch
    >>> prior = ClassPrior(num_classes=4, window=100)
    >>> prior.update(torch.tensor([0, 0, 1, 0, 1, 0]))
    >>> [round(p, 2) for p in prior.probabilities().tolist()]
    [0.5, 0.3, 0.1, 0.1]
    >>> logits = torch.tensor([[-1.0, 0.1, 0.3, 0.0]])  # the exit leans to class 2
    >>> prior.correct(logits).argmax(1).item()  # the stream's prior moves it to class 1
    1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class ClassPrior:
    """Exponential moving class counts of the served predictions, and the corrected posterior.

    Args:
        num_classes: Number of classes ``C``.
        window: Effective number of recent samples the estimate reflects (the counts decay by
            ``1 - 1 / window`` per sample).
        pseudo_count: Added to every class's count (keeps unseen classes possible).
    """

    def __init__(self, num_classes: int, window: int, pseudo_count: float = 1.0) -> None:
        self.num_classes = num_classes
        self.decay = 1.0 - 1.0 / window
        self.pseudo_count = pseudo_count
        self.counts = torch.zeros(num_classes, dtype=torch.float64)

    def update(self, predictions: Tensor) -> None:
        """Count a batch of served predictions (int64 ``(B,)``), oldest first."""
        predictions = predictions.reshape(-1).long().cpu()
        size = predictions.numel()
        if size == 0:
            return
        # each prediction decays by the samples that came after it in this batch
        weights = torch.full((size,), self.decay, dtype=torch.float64).pow(
            torch.arange(size - 1, -1, -1, dtype=torch.float64))
        self.counts.mul_(self.decay ** size)
        self.counts.index_add_(0, predictions, weights)

    def probabilities(self) -> Tensor:
        """The estimated prior ``(C,)`` float64, summing to 1."""
        smoothed = self.counts + self.pseudo_count
        return smoothed / smoothed.sum()

    def correct(self, logits: Tensor) -> Tensor:
        """Log-posteriors under the stream's prior: ``log_softmax(logits) + log(C * pi)``."""
        log_prior = torch.log(self.probabilities() * self.num_classes)
        return F.log_softmax(logits.float(), dim=1) + log_prior.to(logits.device, torch.float32)

    def reset(self) -> None:
        """Forget every count (the stream changed)."""
        self.counts.zero_()

    def state_dict(self) -> dict[str, Any]:
        """The counts (a tensor)."""
        return {"counts": self.counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        counts = state["counts"]
        if tuple(counts.shape) != (self.num_classes,):
            raise ValueError(f"class prior state has {tuple(counts.shape)} counts, expected "
                             f"({self.num_classes},)")
        self.counts = counts.to(torch.float64).clone()
