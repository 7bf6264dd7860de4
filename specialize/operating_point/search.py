"""Label-free operating point: thresholds that hold an accuracy budget on the stream.

The user says "at most ``budget`` points less accurate than the final exit" and the run pays
as little compute as that allows, now and after the heads specialize. No label of the stream
is used. What the controller knows:

* the checkpoint's **validation set** (labelled at training time, never a stream sample): one
  pass of the frozen backbone keeps every head's pooled input, so each exit's answer on it can
  be recomputed for the heads being served now (:func:`specialize.evaluation.passes.rerun_heads`);
* the **stream's class mix**, estimated from the answers it serves
  (:class:`specialize.updater.prior.ClassPrior`).

Class-skewed streams are label shift: the images of a class look the same, only how often
each class comes changes. So any average over the stream equals the validation average with
each class weighted by its share of the stream. The controller draws a validation sample with
the stream's class mix (:func:`stream_mix_rows`: stratified, deterministic, no image twice
while the class has unused ones), measures there, with labels, how much accuracy each shared
threshold loses against the final exit, and picks the cheapest thresholds whose drop plus
``bound`` standard errors stays within the budget (``calibrate_thresholds(..., bound=)``, the
search every calibration uses): one per early exit by default (``policy.budget_thresholds``),
since specialized heads differ in how far they can be trusted.

What a user can check, in words: *if* the stream's images of each class look like the
validation images of that class (label shift: only how often each class comes changes) and
the served answers estimate the class mix well, then for thresholds fixed in advance the
chance that their drop on fresh images at that mix exceeds the estimate plus ``z`` standard
errors is about ``1 - budget_confidence``. The search picks the cheapest of many candidates,
which flatters the chosen one a little (selection), and a stream's own samples may differ from
fresh images (a stream that repeats its images lets the specialized heads learn those very
images). ``benchmarks/operating_point.py`` measures how often the true drop, on the stream and
on held-out eval_in, exceeds the budget by more than 0.25 pt.

The estimate is as good as the validation rows of the stream's classes are many: a stream of
six classes draws about 600 rows from the Tiny-ImageNet model's 100 images a class, whose
drop has a standard error near 1 point at thresholds where one answer in ten changes.

Why not the final exit's belief on audited samples, the estimate the issue proposed: on the
default model it overstates the drop 3 to 10 times even after temperature scaling (early exits
are often right where the final exit is wrong, and on exactly those samples the final exit
is overconfident), and at 3 % audits a 3,000-sample stream holds about 90 audited samples,
whose mean has a standard error near 0.7 points: no bound computed from them can certify half
a point. The numbers are in the README. Audits still serve: they measure disagreement with
the final exit online (the updater's health check rolls degraded heads back) and report the
belief-based estimate beside the truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from specialize.evaluation.curves import drop_standard_error
from specialize.evaluation.passes import ExitPass
from specialize.policy import CalibrationResult, calibrate_thresholds

__all__ = ["BudgetChoice", "choose_thresholds", "normal_quantile", "stream_mix_rows"]


def normal_quantile(confidence: float) -> float:
    """``z`` with ``P(Z <= z) = confidence`` for a standard normal ``Z`` (one-sided bound).

    Example:
        >>> round(normal_quantile(0.95), 3)
        1.645
    """
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must lie in [0.5, 1), got {confidence}")
    low, high = 0.0, 10.0
    for _ in range(80):  # bisection on the error function: exact to float precision
        middle = (low + high) / 2.0
        if 0.5 * (1.0 + math.erf(middle / math.sqrt(2.0))) < confidence:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0


def stream_mix_rows(labels: Tensor, prior: Tensor) -> Tensor:
    """Rows of a labelled set drawn so that its class mix is ``prior``.

    Every class ``c`` gets ``round(prior[c] * n)`` rows, its own samples in order (repeating
    only when it has too few), with ``n`` as large as the set allows without repeating the
    classes that carry the mix: ``n = min over classes with prior >= 1/(2C) of
    available[c] / prior[c]``. Deterministic.

    Args:
        labels: ``(N,)`` classes of the labelled set.
        prior: ``(C,)`` the target class mix (sums to 1).

    Returns:
        int64 row indices into ``labels``.

    Example:
        >>> labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
        >>> stream_mix_rows(labels, torch.tensor([0.5, 0.5, 0.0])).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    num_classes = prior.shape[0]
    prior = prior.double() / prior.sum()
    members = [torch.nonzero(labels == c).squeeze(1) for c in range(num_classes)]
    available = torch.tensor([len(m) for m in members], dtype=torch.float64)
    carrying = (prior >= 0.5 / num_classes) & (available > 0)
    size = float((available[carrying] / prior[carrying]).min()) if carrying.any() else 0.0
    rows = []
    for c, rows_of_class in enumerate(members):
        count = int(round(float(prior[c]) * size))
        if count and len(rows_of_class):
            repeats = -(-count // len(rows_of_class))
            rows.append(rows_of_class.repeat(repeats)[:count])
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)


@dataclass(frozen=True)
class BudgetChoice:
    """Thresholds chosen for a budget, and what they are estimated to cost and lose.

    Attributes:
        thresholds: One per early exit (``+inf``: that exit never answers).
        drop: Estimated accuracy drop against the final exit, points.
        bound: ``drop`` plus ``z`` standard errors (what the budget is compared with).
        mean_flops: Estimated mean FLOPs per sample on the stream's class mix.
        samples: Validation rows the estimate rests on.
    """

    thresholds: tuple[float, ...]
    drop: float
    bound: float
    mean_flops: float
    samples: int


def choose_thresholds(evidence: ExitPass, rows: Tensor, budget: float,
                      z: float, shared: bool = True) -> BudgetChoice:
    """The cheapest thresholds whose drop's upper bound stays within ``budget``.

    Args:
        evidence: Every exit's answers on the validation set, for the heads served now.
        rows: Which validation rows (with repeats) form the stream's class mix.
        budget: Allowed accuracy drop against the final exit, points.
        z: Standard errors added to the estimated drop.
        shared: One threshold for every early exit (exact search), or one per early exit
            (``calibrate_thresholds(shared=False)``: the shared optimum refined exit by exit;
            never costlier). Per exit matters once heads specialize: an early head that now
            beats the final exit on the stream's classes may answer almost everything that
            reaches it, while the heads before it stay strict, which no shared value allows.

    Returns:
        The choice; with no row, the final exit answers everything.
    """
    num_early = evidence.confidence.shape[1] - 1
    if len(rows) == 0:
        return BudgetChoice((math.inf,) * num_early, 0.0, 0.0, math.nan, 0)
    chosen = evidence.subset(rows)
    arrays = (chosen.confidence.numpy(), chosen.correct.numpy(), chosen.flops.numpy())
    result: CalibrationResult = calibrate_thresholds(*arrays, max_drop=budget, bound=z,
                                                     shared=shared)
    final = 100.0 * float(np.mean(arrays[1][:, -1]))
    drop = final - result.accuracy
    error = float(drop_standard_error(*arrays, np.array(result.thresholds)[None])[0])
    return BudgetChoice(result.thresholds, drop, drop + z * error, result.mean_flops,
                        len(rows))
