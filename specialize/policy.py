"""Exit policies (a confidence measure and per-exit thresholds) and their calibration.

The measures and the rule itself live in :mod:`backbones.exit_rule` and are re-exported here;
this module adds :class:`ExitPolicy`, which bundles a measure with thresholds, and
:func:`calibrate_thresholds`, which picks thresholds on a labelled calibration split from one
pass of all exits (the ``confidence``, ``correct`` and ``flops`` arrays of
:mod:`specialize.evaluation.curves`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from backbones.exit_rule import (
    CONFIDENCE_MEASURES,
    accepts,
    confidence,
    normalize_thresholds,
    select_exits,
)
from configkit import ConfigError, check_choice, check_fields, check_int, check_number
from specialize.evaluation.curves import (
    ArrayLike,
    CurvePoints,
    as_exit_arrays,
    drop_standard_error,
    sweep,
)

__all__ = [
    "BUDGET_THRESHOLDS",
    "CONFIDENCE_MEASURES",
    "CalibrationResult",
    "ExitPolicy",
    "MEASURE_MAX",
    "accepts",
    "calibrate_thresholds",
    "confidence",
    "normalize_thresholds",
    "select_exits",
]

CALIBRATION_TARGETS = ("accuracy", "flops")
BUDGET_THRESHOLDS = ("per_exit", "shared")  # how the budget controller sets thresholds

# Largest value each measure can take; a finite threshold above it disables the exit silently.
MEASURE_MAX = {"max_softmax": 1.0, "margin": 1.0, "neg_entropy": 0.0}

# Slack for comparing accuracies in percent computed as 100 * count / N.
_ACCURACY_EPS = 1e-9


@dataclass(frozen=True)
class ExitPolicy:
    """Which confidence measure the exits use and the threshold each early exit must clear.

    Also the ``policy`` section of a run config (``policy.thresholds=[0.9, 0.8]``); invalid
    values raise :class:`configkit.ConfigError`, a ``ValueError``.

    Attributes:
        measure: Confidence measure, one of :data:`CONFIDENCE_MEASURES`.
        thresholds: One threshold shared by all early exits, or one per early exit (a
            sequence of ``K - 1``, or ``K`` whose last entry is ignored). ``+inf`` disables an
            exit. The last exit always answers. The default suits ``max_softmax``/``margin``;
            ``neg_entropy`` values are ``<= 0``.
        budget: Allowed accuracy drop against the final exit, in points: the run's budget
            controller (:mod:`specialize.operating_point`) then chooses the thresholds online,
            label-free, and ``thresholds`` only serves the held-out operating points.
            ``None``: the fixed ``thresholds``.
        budget_thresholds: With a budget: ``per_exit`` (one threshold per early exit, the
            greedy refinement of the shared optimum) or ``shared`` (one for all).
        budget_confidence: One-sided confidence that the estimated drop holds the budget.
        retune_every: With a budget: samples between regular threshold choices.
        history_size: With a budget: threshold choices kept in the summary (the last).
    """

    measure: str = "max_softmax"
    thresholds: float | tuple[float, ...] = 0.9
    budget: float | None = None
    budget_confidence: float = 0.95
    budget_thresholds: str = "per_exit"
    retune_every: int = 500
    history_size: int = 200

    def __post_init__(self) -> None:
        if hasattr(self.thresholds, "tolist"):  # a numpy or torch scalar or array
            object.__setattr__(self, "thresholds", self.thresholds.tolist())
        check_fields(self)  # a YAML list of thresholds becomes a tuple of floats
        check_choice("measure", self.measure, CONFIDENCE_MEASURES)
        _check_threshold_values(self.measure, np.atleast_1d(self.thresholds))
        check_number("budget", self.budget, ge=0, optional=True)
        check_number("budget_confidence", self.budget_confidence, ge=0.5, lt=1)
        check_choice("budget_thresholds", self.budget_thresholds, BUDGET_THRESHOLDS)
        check_int("retune_every", self.retune_every, ge=1)
        check_int("history_size", self.history_size, ge=1)

    def thresholds_tensor(self, num_exits: int) -> Tensor:
        """The thresholds as configured, ``(num_exits,)`` float64, last entry ``-inf``.

        The exit rule compares them as float32 (``backbones.exit_rule.rule_values``).
        """
        return normalize_thresholds(self.thresholds, num_exits)

    def confidence(self, logits: Tensor) -> Tensor:
        """Confidence ``(B,)`` of one exit's logits ``(B, C)`` under this policy's measure."""
        return confidence(logits, self.measure)

    def select(self, confidences: Tensor) -> Tensor:
        """Exit index ``(N,)`` int64 for confidences ``(N, K)`` of every exit."""
        thresholds = self.thresholds_tensor(confidences.shape[1])
        return select_exits(confidences, thresholds)


def _check_threshold_values(measure: str, values: np.ndarray) -> None:
    if values.size == 0:
        raise ConfigError("thresholds: must be one number, or a list of one per early exit "
                          "(e.g. [0.9, 0.8, 0.7]), got []")
    if np.isnan(values).any():
        raise ConfigError(f"thresholds: must not be NaN, got {values.tolist()}")
    upper = MEASURE_MAX[measure]
    if (np.isfinite(values) & (values > upper)).any():
        raise ConfigError(
            f"thresholds: {values.tolist()} include values above {upper}, the largest {measure} "
            "can reach, so that exit could never answer; use +inf to disable an exit on purpose"
        )


@dataclass(frozen=True)
class CalibrationResult:
    """Thresholds chosen on a calibration split and what they achieve there.

    Attributes:
        thresholds: One threshold per early exit (length ``K - 1``); ``+inf`` means the exit
            never answers. Pass to :class:`ExitPolicy` as is.
        accuracy: Accuracy in percent on the calibration split.
        mean_flops: Mean FLOPs per sample on the calibration split.
    """

    thresholds: tuple[float, ...]
    accuracy: float
    mean_flops: float

    def policy(self, measure: str = "max_softmax") -> ExitPolicy:
        """An :class:`ExitPolicy` with these thresholds (``measure``: the one calibrated)."""
        return ExitPolicy(measure, self.thresholds)


def calibrate_thresholds(
    confidence: ArrayLike,
    correct: ArrayLike,
    flops: ArrayLike,
    *,
    target: str = "accuracy",
    max_drop: float = 0.5,
    flops_budget: float | None = None,
    shared: bool = True,
    num_candidates: int = 32,
    max_rounds: int = 4,
    bound: float = 0.0,
) -> CalibrationResult:
    """Choose exit thresholds on a labelled calibration split, or on label-free estimates.

    Targets:

    * ``"accuracy"``: the cheapest thresholds (lowest mean FLOPs) whose accuracy is at most
      ``max_drop`` points below the last exit's accuracy. Always feasible (with no early
      exit the drop is 0).
    * ``"flops"``: the most accurate thresholds whose mean FLOPs are ``<= flops_budget``.

    Ties go to higher accuracy (resp. lower FLOPs), then to the higher threshold.

    With ``shared=True`` one threshold serves all early exits and the choice is exact: every
    distinct threshold is evaluated by :func:`specialize.evaluation.curves.sweep`. With
    ``shared=False`` the shared optimum is refined by greedy coordinate search: for each
    early exit in turn, try ``num_candidates`` quantiles of that exit's confidence (and
    ``+inf``, "never answer here") with the other thresholds fixed, keep the best if it
    improves the objective, and repeat for up to ``max_rounds`` rounds or until no exit
    changes. The result is never worse than the shared optimum on the calibration split.

    ``correct`` may hold expected correctness (probabilities) instead of labels: the budget
    controller (:mod:`specialize.operating_point.search`) passes the calibrated final exit's belief
    in each exit's answer on audited samples. With ``bound > 0`` the drop must hold with
    margin: target ``"accuracy"`` then requires ``drop + bound * standard error <= max_drop``
    (:func:`specialize.evaluation.curves.drop_standard_error`; ``bound=1.645`` is a one-sided 95 %
    upper confidence bound).

    Args:
        confidence: ``(N, K)`` confidence of every exit, under the measure the policy uses.
        correct: ``(N, K)`` bool, whether each exit is right.
        flops: ``(N, K)`` cost of answering at each exit.
        target: ``"accuracy"`` or ``"flops"``.
        max_drop: Allowed accuracy drop in points (target ``"accuracy"``).
        flops_budget: Mean FLOPs per sample allowed (target ``"flops"``; required there).
        shared: One threshold for all early exits (exact), or per-exit thresholds (greedy).
        num_candidates: Quantiles tried per exit and round when ``shared=False``.
        max_rounds: Rounds of coordinate search when ``shared=False``.
        bound: Standard errors added to the estimated drop before comparing it with
            ``max_drop`` (target ``"accuracy"``; 0: the estimate itself).

    Returns:
        The thresholds and their (estimated) accuracy and mean FLOPs on the calibration split.

    Raises:
        ValueError: Unknown ``target``, conflicting or missing arguments, or a FLOPs budget
            below the cheapest operating point.
    """
    _check_calibration_args(target, max_drop, flops_budget)
    if not bound >= 0:
        raise ValueError(f"bound must be >= 0 standard errors, got {bound}")
    conf, correct, flops = as_exit_arrays(confidence, correct, flops)
    objective = _Objective.build(target, correct, max_drop, flops_budget, bound)
    curve = objective.points(conf, correct, flops)
    if not objective.feasible(curve).any():
        raise ValueError(
            f"flops_budget {flops_budget:g} is below the cheapest operating point "
            f"({curve.flops.min():g} mean FLOPs); raise the budget"
        )
    best = objective.best_index(curve, curve.thresholds)
    num_early = conf.shape[1] - 1
    thresholds = np.full(num_early, curve.thresholds[best])
    if not shared and num_early > 1:
        thresholds = _coordinate_search(
            conf, correct, flops, thresholds, objective, num_candidates, max_rounds
        )
    point = sweep(conf, correct, flops, thresholds[None])
    return CalibrationResult(
        tuple(float(t) for t in thresholds), float(point.accuracy[0]), float(point.flops[0])
    )


def _check_calibration_args(target: str, max_drop: float, flops_budget: float | None) -> None:
    if target not in CALIBRATION_TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(CALIBRATION_TARGETS)}")
    if target == "flops" and flops_budget is None:
        raise ValueError("target='flops' needs flops_budget (mean FLOPs per sample allowed)")
    if target == "accuracy" and flops_budget is not None:
        raise ValueError(
            "flops_budget is only used with target='flops'; drop it or set target='flops'"
        )
    if not max_drop >= 0:
        raise ValueError(f"max_drop must be >= 0 accuracy points, got {max_drop}")


@dataclass(frozen=True)
class _Objective:
    """Feasibility and ranking of operating points for one calibration target."""

    target: str
    limit: float  # minimum accuracy (%) or maximum mean FLOPs
    bound: float = 0.0  # standard errors of the drop subtracted from accuracy (target accuracy)

    @classmethod
    def build(
        cls, target: str, correct: np.ndarray, max_drop: float, flops_budget: float | None,
        bound: float = 0.0,
    ) -> _Objective:
        if target == "flops":
            return cls(target, float(flops_budget))
        final_accuracy = 100.0 * correct[:, -1].sum() / len(correct)
        return cls(target, final_accuracy - max_drop - _ACCURACY_EPS, bound)

    def points(self, confidence: np.ndarray, correct: np.ndarray, flops: np.ndarray,
               thresholds: np.ndarray | None = None) -> CurvePoints:
        """The sweep points the objective ranks: accuracy lowered by ``bound`` std errors."""
        points = sweep(confidence, correct, flops, thresholds)
        if self.bound and self.target == "accuracy":
            margin = self.bound * drop_standard_error(confidence, correct, flops, thresholds)
            points = CurvePoints(points.thresholds, points.accuracy - margin, points.flops)
        return points

    def feasible(self, points: CurvePoints) -> np.ndarray:
        if self.target == "flops":
            return points.flops <= self.limit
        return points.accuracy >= self.limit

    def keys(self, points: CurvePoints) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feasible, primary, secondary): larger is better, compared in that order."""
        if self.target == "flops":
            return self.feasible(points), points.accuracy, -points.flops
        return self.feasible(points), -points.flops, points.accuracy

    def best_index(self, points: CurvePoints, tiebreak: np.ndarray) -> int:
        """Index of the best point; ``tiebreak`` (larger preferred) settles exact ties."""
        feasible, primary, secondary = self.keys(points)
        return int(np.lexsort((tiebreak, secondary, primary, feasible))[-1])

    def score(self, points: CurvePoints, index: int) -> tuple[bool, float, float]:
        return tuple(key[index].item() for key in self.keys(points))


def _candidates(confidence: np.ndarray, num_candidates: int) -> np.ndarray:
    """Quantiles of one exit's confidences (actual values) plus ``+inf``."""
    levels = np.linspace(0.0, 1.0, num_candidates)
    return np.unique(np.append(np.quantile(confidence, levels, method="lower"), np.inf))


def _coordinate_search(
    confidence: np.ndarray,
    correct: np.ndarray,
    flops: np.ndarray,
    thresholds: np.ndarray,
    objective: _Objective,
    num_candidates: int,
    max_rounds: int,
) -> np.ndarray:
    """Greedy per-exit refinement of ``thresholds`` (one per early exit), see the caller."""
    thresholds = thresholds.copy()
    current = objective.points(confidence, correct, flops, thresholds[None])
    best_score = objective.score(current, 0)
    for _ in range(max_rounds):
        improved = False
        for k in range(len(thresholds)):
            values = _candidates(confidence[:, k], num_candidates)
            trials = np.repeat(thresholds[None], len(values), axis=0)
            trials[:, k] = values
            points = objective.points(confidence, correct, flops, trials)
            index = objective.best_index(points, values)
            if objective.score(points, index) > best_score:
                thresholds, best_score = trials[index], objective.score(points, index)
                improved = True
        if not improved:
            break
    return thresholds
