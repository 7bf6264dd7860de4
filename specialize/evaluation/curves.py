"""Cost/accuracy curves from one pass of all exits over an evaluation set.

Every function here works from three precomputed arrays of shape ``(N, K)`` (``N`` samples,
``K`` exits), never by re-running a network:

* ``confidence[i, k]``: confidence of exit ``k`` on sample ``i``;
* ``correct[i, k]``: whether exit ``k``'s prediction on sample ``i`` is right (bool);
* ``flops[i, k]``: cost of sample ``i`` answering at exit ``k`` (everything run up to and
  including exit ``k``, gate decisions included).

Torch tensors and numpy arrays are both accepted. Curves are :class:`CurvePoints`: accuracy in
percent and mean FLOPs per sample, one entry per operating point. Thresholds are applied by
:func:`backbones.exit_rule.select_exits` (the rule the engine uses); :func:`sweep` with no
thresholds computes the same results for every distinct shared threshold at once.

Linear interpolation between two operating points (:func:`flops_at_accuracy`,
:func:`accuracy_at_flops`) is achievable by answering a matching fraction of the samples
with each of the two thresholds, so the interpolated curve is a fair comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backbones.exit_rule import normalize_thresholds, rule_values, select_exits

__all__ = [
    "CurvePoints",
    "accuracy_at_flops",
    "as_exit_arrays",
    "evaluate_thresholds",
    "flops_at_accuracy",
    "grid_sweep",
    "iso_accuracy",
    "oracle_curve",
    "oracle_point",
    "pareto_front",
    "sweep",
]

ArrayLike = Any  # numpy array, torch tensor or nested sequence of shape (N, K)

DEFAULT_GRID = np.linspace(0.0, 1.0, 21)


@dataclass(frozen=True)
class CurvePoints:
    """Operating points of an early-exit model on one evaluation set.

    Attributes:
        thresholds: ``(P,)`` shared thresholds, or ``(P, K)`` per-exit schedules (the last
            column is ``-inf``: the last exit always answers); ``NaN`` where a point has no
            threshold (oracle curves). ``+inf`` means no early exit answers.
        accuracy: ``(P,)`` accuracy in percent.
        flops: ``(P,)`` mean FLOPs per sample.
    """

    thresholds: np.ndarray
    accuracy: np.ndarray
    flops: np.ndarray

    def __len__(self) -> int:
        return len(self.accuracy)

    def take(self, index: np.ndarray) -> CurvePoints:
        """The points selected by an integer or boolean index, in that order."""
        return CurvePoints(self.thresholds[index], self.accuracy[index], self.flops[index])

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-ready points: ``[{"threshold": ..., "accuracy": ..., "flops": ...}, ...]``.

        ``threshold`` is a float, a list of floats for per-exit schedules, or ``None`` where
        it is not finite (``+inf``: no early exit; ``-inf``: the last exit; ``NaN``: oracle),
        so the output is strict JSON.
        """
        return [
            {"threshold": _json_threshold(t), "accuracy": float(a), "flops": float(f)}
            for t, a, f in zip(self.thresholds, self.accuracy, self.flops, strict=True)
        ]


def _json_threshold(value: np.ndarray | float) -> float | list[float | None] | None:
    if np.ndim(value) > 0:
        return [_json_threshold(v) for v in value]
    return float(value) if math.isfinite(value) else None


def _to_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _check_outcomes(correct: ArrayLike, flops: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``correct`` and ``flops``; integer FLOPs stay int64 so sums are exact."""
    correct, flops = _to_numpy(correct), _to_numpy(flops)
    if correct.ndim != 2 or correct.shape[0] < 1 or correct.shape[1] < 1:
        raise ValueError(f"correct must have shape (N, K) with N, K >= 1, got {correct.shape}")
    if flops.shape != correct.shape:
        raise ValueError(f"flops has shape {flops.shape} but correct has {correct.shape}")
    if correct.dtype != np.bool_:
        if np.isin(correct, (0, 1)).all():
            correct = correct.astype(bool)
        elif not (np.isfinite(correct).all() and (correct >= 0).all() and (correct <= 1).all()):
            raise ValueError("correct must be bool (whether exit k got sample i right) or a "
                             "probability in [0, 1] (its expected correctness)")
        else:
            correct = correct.astype(np.float64)
    if np.issubdtype(flops.dtype, np.integer) or flops.dtype == np.bool_:
        return correct, flops.astype(np.int64)
    flops = flops.astype(np.float64)
    if not np.isfinite(flops).all():
        raise ValueError("flops contains NaN or inf; every exit needs a finite cost")
    return correct, flops


def as_exit_arrays(
    confidence: ArrayLike, correct: ArrayLike, flops: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate the three ``(N, K)`` inputs of a sweep and convert them to numpy.

    Args:
        confidence: Confidence of every exit (finite).
        correct: Whether each exit is right (bool or 0/1), or its expected correctness, a
            probability in [0, 1] (label-free estimates).
        flops: Cost of answering at each exit.

    Returns:
        ``(confidence, correct bool, flops)``. Confidence becomes float32, the one dtype
        the exit rule compares in (:func:`~backbones.exit_rule.rule_values`), so every sweep
        places ties exactly as the engine does. Integer FLOPs become int64 so that sums are
        exact, others float64.

    Raises:
        ValueError: Shapes differ or are not ``(N, K)`` with ``N, K >= 1``, a confidence or
            cost is not finite, or ``correct`` is not boolean.
    """
    correct, flops = _check_outcomes(correct, flops)
    confidence = rule_values(_to_numpy(confidence).astype(np.float64)).numpy()
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence has shape {confidence.shape} but correct has {correct.shape}")
    if not np.isfinite(confidence).all():
        raise ValueError("confidence contains NaN or inf; curves need finite confidences")
    return confidence, correct, flops


def _point(correct: np.ndarray, flops: np.ndarray, exit_index: np.ndarray) -> tuple[float, float]:
    """Accuracy (%) and mean FLOPs when sample ``i`` answers at ``exit_index[i]``."""
    rows = np.arange(len(exit_index))
    n = len(exit_index)
    return (
        float(100.0 * correct[rows, exit_index].sum() / n),
        float(flops[rows, exit_index].sum() / n),
    )


def evaluate_thresholds(
    confidence: ArrayLike,
    correct: ArrayLike,
    flops: ArrayLike,
    thresholds: float | Sequence[float] | np.ndarray,
) -> tuple[float, float]:
    """Accuracy and mean FLOPs of one threshold setting, via :func:`select_exits`.

    Args:
        confidence: ``(N, K)`` confidence of every exit.
        correct: ``(N, K)`` bool, whether each exit is right.
        flops: ``(N, K)`` cost of answering at each exit.
        thresholds: A shared threshold or one per (early) exit, as
            :func:`~backbones.exit_rule.normalize_thresholds` accepts.

    Returns:
        ``(accuracy in %, mean FLOPs per sample)``.
    """
    confidence, correct, flops = as_exit_arrays(confidence, correct, flops)
    return _evaluate(confidence, correct, flops, thresholds)


def _evaluate(
    confidence: np.ndarray,
    correct: np.ndarray,
    flops: np.ndarray,
    thresholds: float | Sequence[float] | np.ndarray,
) -> tuple[float, float]:
    per_exit = normalize_thresholds(thresholds, confidence.shape[1])
    exit_index = select_exits(torch.from_numpy(confidence), per_exit).numpy()
    return _point(correct, flops, exit_index)


def sweep(
    confidence: ArrayLike,
    correct: ArrayLike,
    flops: ArrayLike,
    thresholds: ArrayLike | None = None,
) -> CurvePoints:
    """Cost/accuracy points for many thresholds from one pass of all exits.

    Args:
        confidence: ``(N, K)`` confidence of every exit.
        correct: ``(N, K)`` bool, whether each exit is right.
        flops: ``(N, K)`` cost of answering at each exit.
        thresholds: ``None`` for the exact curve of a threshold shared by all early exits
            (one point per distinct threshold that changes some sample's exit, see
            :func:`_exact_shared_sweep`); a ``(P,)`` grid of shared thresholds; or ``(P, K)``
            / ``(P, K - 1)`` per-exit schedules, one row per point.

    Returns:
        The points, in the order of ``thresholds`` (ascending thresholds when ``None``).
    """
    confidence, correct, flops = as_exit_arrays(confidence, correct, flops)
    if thresholds is None:
        return _exact_shared_sweep(confidence, correct, flops)
    grid = _to_numpy(thresholds).astype(np.float64)
    if grid.ndim not in (1, 2):
        raise ValueError(
            f"thresholds must be (P,) shared values or (P, K) per-exit schedules, got {grid.shape}"
        )
    points = np.array([_evaluate(confidence, correct, flops, t) for t in grid]).reshape(-1, 2)
    if grid.ndim == 2:
        grid = np.stack([normalize_thresholds(t, confidence.shape[1]).numpy() for t in grid])
    return CurvePoints(grid, points[:, 0], points[:, 1])


def grid_sweep(
    confidence: ArrayLike,
    correct: ArrayLike,
    flops: ArrayLike,
    grid: ArrayLike | None = None,
) -> CurvePoints:
    """:func:`sweep` over a fixed grid of thresholds (for tables), in grid order.

    The arrays are :func:`sweep`'s; ``grid`` is ``(P,)`` shared thresholds or ``(P, K)``
    per-exit schedules, by default ``np.linspace(0, 1, 21)``.
    """
    return sweep(confidence, correct, flops, DEFAULT_GRID if grid is None else grid)


def _exact_shared_sweep(
    confidence: np.ndarray, correct: np.ndarray, flops: np.ndarray
) -> CurvePoints:
    """Exact curve of a shared early-exit threshold ``t`` in O(NK log NK).

    Sample ``i`` answers at the first early exit ``k`` whose prefix maximum
    ``M_ik = max_{j<=k} c_ij`` is ``>= t``, else at the last exit. Its exit changes only when
    ``t`` passes a *record* of the prefix maximum (an exit whose confidence beats all earlier
    ones): once ``t <= c_ik`` for a record ``k``, the sample moves from the next record's
    exit (or the last exit) to ``k``. Sorting all records by value and cumulating the changes
    of (correct, flops) gives every point of the curve, the same as :func:`select_exits` at
    each threshold (bit for bit with integer FLOPs; float FLOPs agree up to rounding). The
    first point (threshold ``min_i c_i0``) sends every sample to exit 0; the last (threshold
    ``+inf``) sends every sample to the last exit.
    """
    n, k = confidence.shape
    if k == 1:  # no early exit: one operating point
        return CurvePoints(np.array([np.inf]), 100.0 * correct[:, :1].sum(0) / n, flops.sum(0) / n)
    early = confidence[:, : k - 1].astype(np.float64)  # exact: the rule's float32 values
    rows, cols, moves_from = _prefix_max_records(early)
    order = np.argsort(-early[rows, cols], kind="stable")
    rows, cols, moves_from = rows[order], cols[order], moves_from[order]
    values = early[rows, cols]
    counts = np.int64 if correct.dtype == np.bool_ else np.float64  # exact sums of bools
    d_correct = correct[rows, cols].astype(counts) - correct[rows, moves_from]
    d_flops = flops[rows, cols] - flops[rows, moves_from]

    # Descending thresholds from +inf (every sample at the last exit); one point per distinct
    # value, taken after all records >= that value have moved; then reversed to ascending.
    last_of_group = np.flatnonzero(np.append(values[1:] != values[:-1], True))
    base_correct, base_flops = correct[:, -1].sum(dtype=counts), flops[:, -1].sum()
    thresholds = np.concatenate(([np.inf], values[last_of_group]))[::-1]
    correct_count = base_correct + np.concatenate(([0], np.cumsum(d_correct)[last_of_group]))
    total_flops = base_flops + np.concatenate(([0], np.cumsum(d_flops)[last_of_group]))
    return CurvePoints(thresholds, 100.0 * correct_count[::-1] / n, total_flops[::-1] / n)


def _prefix_max_records(early: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records of each row's prefix maximum over the early exits ``(N, K - 1)``.

    Returns:
        ``(rows, cols, moves_from)``: the record positions and, for each, the exit the sample
        answered at before the threshold dropped to this record's value (the next record in
        the row, or the last exit ``K - 1``).
    """
    num_early = early.shape[1]
    prefix_max = np.maximum.accumulate(early, axis=1)
    record = np.ones(early.shape, dtype=bool)
    record[:, 1:] = prefix_max[:, 1:] > prefix_max[:, :-1]
    record_exit = np.where(record, np.arange(num_early), num_early)
    next_record = np.full(early.shape, num_early)
    next_record[:, :-1] = np.minimum.accumulate(record_exit[:, :0:-1], axis=1)[:, ::-1]
    rows, cols = np.nonzero(record)
    return rows, cols, next_record[rows, cols]


def pareto_front(points: CurvePoints) -> CurvePoints:
    """The non-dominated points: no other point is at most as costly and more accurate.

    Among points with equal FLOPs only the most accurate is kept; points that do not raise
    accuracy above every cheaper point are dropped.

    Args:
        points: Any curve.

    Returns:
        The front, sorted by ascending FLOPs (accuracy strictly increasing along it).
    """
    order = np.lexsort((-points.accuracy, points.flops))
    accuracy = points.accuracy[order]
    best_before = np.maximum.accumulate(np.concatenate(([-np.inf], accuracy[:-1])))
    return points.take(order[accuracy > best_before])


def _first_correct_flops(correct: np.ndarray, flops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: whether some exit is right, and the cost of the first (cheapest) one."""
    if (np.diff(flops, axis=1) < 0).any():
        raise ValueError(
            "flops must not decrease along the exits (answering later runs everything before); "
            "pass flops[i, k] = the cost of answering at exit k"
        )
    solvable = correct.any(axis=1)
    first = correct.argmax(axis=1)
    cost = np.where(solvable, flops[np.arange(len(first)), first], flops[:, 0])
    return solvable, cost


def oracle_point(correct: ArrayLike, flops: ArrayLike) -> tuple[float, float]:
    """Accuracy and mean FLOPs when each sample is answered by its cheapest correct exit.

    Samples that no exit gets right are answered (wrongly) at exit 0, the cheapest exit.
    No threshold rule can be more accurate at this cost, or cheaper at this accuracy.

    Args:
        correct: ``(N, K)`` bool, whether each exit is right.
        flops: ``(N, K)`` cost of answering at each exit, non-decreasing along the exits.

    Returns:
        ``(accuracy in %, mean FLOPs per sample)``.
    """
    correct, flops = _check_outcomes(correct, flops)
    solvable, cost = _first_correct_flops(correct, flops)
    return float(100.0 * solvable.sum() / len(cost)), float(cost.sum() / len(cost))


def oracle_curve(correct: ArrayLike, flops: ArrayLike) -> CurvePoints:
    """The best accuracy reachable at each FLOPs budget by any per-sample exit choice.

    Every sample costs at least its exit-0 FLOPs; answering it correctly costs the FLOPs of
    its cheapest correct exit, i.e. an extra ``cost - flops[:, 0]``. Each correct answer is
    worth the same, so taking samples in order of increasing extra cost is optimal: point
    ``j`` answers the ``j`` cheapest-to-fix samples correctly and every other sample at exit
    0 (wrong unless exit 0 is right, which costs no extra). Samples no exit gets right stay
    at exit 0 and are wrong. Points are exact; linear interpolation between them is what
    mixing two neighbouring points achieves. The last point is :func:`oracle_point`.

    Args:
        correct: ``(N, K)`` bool, whether each exit is right.
        flops: ``(N, K)`` cost of answering at each exit, non-decreasing along the exits.

    Returns:
        A Pareto front sorted by FLOPs, thresholds ``NaN``.
    """
    correct, flops = _check_outcomes(correct, flops)
    n = correct.shape[0]
    solvable, cost = _first_correct_flops(correct, flops)
    extra = np.sort((cost - flops[:, 0])[solvable])
    total_flops = np.concatenate(([0], np.cumsum(extra))) + flops[:, 0].sum()
    # Keep the last point of each run of equal FLOPs (the most accurate at that cost).
    keep = np.append(total_flops[1:] != total_flops[:-1], True)
    correct_count = np.arange(len(total_flops))[keep]
    return CurvePoints(
        np.full(len(correct_count), np.nan), 100.0 * correct_count / n, total_flops[keep] / n
    )


def flops_at_accuracy(curve: CurvePoints, target: float) -> float:
    """Mean FLOPs needed to reach ``target`` accuracy, interpolated on the Pareto front.

    Args:
        curve: Any curve (its Pareto front is used).
        target: Accuracy in percent.

    Returns:
        The interpolated FLOPs; the cheapest point's FLOPs when ``target`` is at or below
        its accuracy; ``NaN`` when ``target`` is above the curve's peak accuracy (the
        model cannot reach it at any cost).
    """
    front = pareto_front(curve)
    if len(front) == 0 or target > front.accuracy[-1]:
        return math.nan
    return float(np.interp(target, front.accuracy, front.flops))


def accuracy_at_flops(curve: CurvePoints, budget: float) -> float:
    """Best accuracy within a mean FLOPs budget, interpolated on the Pareto front.

    Args:
        curve: Any curve (its Pareto front is used).
        budget: Mean FLOPs per sample.

    Returns:
        The interpolated accuracy in percent; the peak accuracy when ``budget`` is at or
        above the most accurate point's FLOPs; ``NaN`` when ``budget`` is below the
        cheapest point (no operating point is that cheap).
    """
    front = pareto_front(curve)
    if len(front) == 0 or budget < front.flops[0]:
        return math.nan
    return float(np.interp(budget, front.flops, front.accuracy))


def iso_accuracy(
    before: CurvePoints,
    after: CurvePoints,
    oracle: CurvePoints | None,
    target: float | None = None,
    drop: float = 0.5,
) -> dict[str, float]:
    """Compute saved at equal accuracy: before vs after specialization vs the oracle.

    Args:
        before: Curve before specialization.
        after: Curve after specialization, on the same evaluation set.
        oracle: Oracle curve (:func:`oracle_curve`) of the model before specialization,
            or ``None`` to skip the oracle figures.
        target: Accuracy in percent to compare at; default ``drop`` points below the peak
            accuracy of ``before``.
        drop: Points below ``before``'s peak used when ``target`` is ``None``.

    Returns:
        ``target_accuracy``; ``flops_before``, ``flops_after``, ``flops_oracle`` (mean FLOPs
        at that accuracy, ``NaN`` when a curve does not reach it); ``flops_ratio`` =
        after / before; ``gap_closed`` = (before - after) / (before - oracle), the share of
        the possible saving that specialization realised (1: as good as the oracle, 0: no
        gain, negative: worse). Both ratios are ``NaN`` when an input is ``NaN`` or the
        denominator is not positive (in particular when ``before`` already matches the
        oracle, so there is no gap to close).
    """
    if target is None:
        target = float(pareto_front(before).accuracy.max()) - drop
    flops_before = flops_at_accuracy(before, target)
    flops_after = flops_at_accuracy(after, target)
    flops_oracle = math.nan if oracle is None else flops_at_accuracy(oracle, target)
    return {
        "target_accuracy": float(target),
        "flops_before": flops_before,
        "flops_after": flops_after,
        "flops_ratio": _safe_ratio(flops_after, flops_before),
        "flops_oracle": flops_oracle,
        "gap_closed": _safe_ratio(flops_before - flops_after, flops_before - flops_oracle),
    }


def _safe_ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, or ``NaN`` if either is NaN or the denominator <= 0."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator <= 0:
        return math.nan
    return numerator / denominator


def drop_standard_error(
    confidence: ArrayLike, correct: ArrayLike, flops: ArrayLike,
    thresholds: ArrayLike | None = None,
) -> np.ndarray:
    """Standard error (points) of the accuracy drop against the last exit, per sweep point.

    The drop of sample ``i`` is ``d_i = correct_i,last - correct_i,exit(i)``; its mean over the
    set is what :func:`sweep`'s accuracy gives as ``last exit's accuracy - accuracy``. The
    standard error of that mean, ``std(d) / sqrt(N)``, follows from three sweeps of the same
    thresholds (sums of ``c``, ``c**2`` and ``c * c_last`` at each sample's exit), so it is
    exact for every point, aligned with ``sweep(confidence, correct, flops, thresholds)``.

    Args:
        confidence: ``(N, K)`` confidence of every exit.
        correct: ``(N, K)`` correctness, bool or expected (probabilities).
        flops: ``(N, K)`` cost of answering at each exit.
        thresholds: As for :func:`sweep`.

    Returns:
        ``(P,)`` standard errors in points (100 x the fraction).
    """
    confidence, correct, flops = as_exit_arrays(confidence, correct, flops)
    c = correct.astype(np.float64)
    last = c[:, -1:]
    n = c.shape[0]

    def total(values: np.ndarray) -> np.ndarray:
        return sweep(confidence, values, flops, thresholds).accuracy * n / 100.0

    sum_d = last.sum() - total(c)
    sum_d2 = (last**2).sum() - 2.0 * total(c * last) + total(c**2)
    variance = np.maximum(sum_d2 / n - (sum_d / n) ** 2, 0.0)
    return 100.0 * np.sqrt(variance / n)
