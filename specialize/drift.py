"""Per-class compute tracking over a stream, and drift alarms.

Online objects in the style of river: build once, feed with ``update``, read with ``get`` or
``drift_detected``, save with ``state_dict`` and restore with ``load_state_dict``. Every state
dict holds plain numbers, strings and lists only, so it can be written with ``json`` or
``torch.save`` and a resumed object continues exactly where the saved one stopped.

* :class:`ClassCostTracker` records, per predicted class (and per true class when an evaluator
  supplies labels), how many samples were seen, their mean FLOPs and the exits they took:
  cumulatively, in the current window, and for every closed window (the drift history).
* :class:`PageHinkley` raises an alarm when the mean of a scalar signal (e.g. each sample's
  FLOPs as a fraction of the full path) shifts up and/or down.
* :class:`ClassMixDriftDetector` raises an alarm when the mix of predicted classes in the last
  ``window`` samples moves away from a reference window's (total variation distance).

FLOPs follow the project's convention: a multiply-add counts 2.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClassCostTracker",
    "ClassMixDriftDetector",
    "DriftDetector",
    "PageHinkley",
]

ArrayLike = Any  # Python scalar, sequence, numpy array or torch tensor (0-D or 1-D)

_STATE_VERSION = 1


def _to_1d(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a 1-D numpy array (torch tensors are detached and moved to the CPU)."""
    if hasattr(value, "detach"):  # a torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {array.shape}")
    return array.reshape(-1)


def _to_index(value: ArrayLike, name: str, size: int) -> np.ndarray:
    """Integer indices in ``[0, size)`` as int64, with an error naming ``name`` otherwise."""
    array = _to_1d(value, name)
    if array.size and array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {array.dtype}")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= size):
        raise ValueError(
            f"{name} must lie in [0, {size}), got values in [{array.min()}, {array.max()}]"
        )
    return array


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _nan_to_none(values: Iterable[float]) -> list[float | None]:
    return [None if math.isnan(v) else float(v) for v in values]


def _none_to_nan(values: Iterable[float | None]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ``numerator / denominator``; ``NaN`` where the denominator is 0 or NaN."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.full(np.broadcast_shapes(numerator.shape, denominator.shape), math.nan)
    valid = np.isfinite(denominator) & (denominator != 0)
    np.divide(numerator, denominator, out=out, where=valid)
    return out


@dataclass
class _ClassStats:
    """Counts, FLOPs sums and exit histograms per class over some span of the stream."""

    counts: np.ndarray  # int64 (C,): samples per class
    flops_sum: np.ndarray  # float64 (C,): summed FLOPs per class
    exit_counts: np.ndarray  # int64 (C, K): samples per class and exit

    @classmethod
    def zeros(cls, num_classes: int, num_exits: int) -> _ClassStats:
        return cls(
            np.zeros(num_classes, dtype=np.int64),
            np.zeros(num_classes, dtype=np.float64),
            np.zeros((num_classes, num_exits), dtype=np.int64),
        )

    @property
    def samples(self) -> int:
        return int(self.counts.sum())

    def add(self, classes: np.ndarray, exits: np.ndarray, flops: np.ndarray) -> None:
        num_classes, num_exits = self.exit_counts.shape
        self.counts += np.bincount(classes, minlength=num_classes)
        self.flops_sum += np.bincount(classes, weights=flops, minlength=num_classes)
        cells = np.bincount(classes * num_exits + exits, minlength=num_classes * num_exits)
        self.exit_counts += cells.reshape(num_classes, num_exits)

    def mean_flops(self) -> np.ndarray:
        return _safe_divide(self.flops_sum, self.counts)

    def describe(self) -> dict[str, list]:
        """Per-class ``counts``, ``mean_flops`` (``NaN`` for unseen classes), ``exit_histogram``."""
        return {
            "counts": self.counts.tolist(),
            "mean_flops": self.mean_flops().tolist(),
            "exit_histogram": self.exit_counts.tolist(),
        }

    def state(self) -> dict[str, list]:
        return {
            "counts": self.counts.tolist(),
            "flops_sum": self.flops_sum.tolist(),
            "exit_counts": self.exit_counts.tolist(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], num_classes: int, num_exits: int) -> _ClassStats:
        stats = cls(
            np.asarray(state["counts"], dtype=np.int64),
            np.asarray(state["flops_sum"], dtype=np.float64),
            np.asarray(state["exit_counts"], dtype=np.int64),
        )
        if stats.exit_counts.shape != (num_classes, num_exits) or stats.counts.shape != (
            num_classes,
        ):
            raise ValueError(
                f"state holds statistics of shape {stats.exit_counts.shape}, expected "
                f"({num_classes}, {num_exits}) classes x exits"
            )
        return stats


class ClassCostTracker:
    """Per-class mean FLOPs and exit histograms over a stream: cumulative, windowed, history.

    Every sample is tracked under its predicted class. When ``update`` also receives the true
    class (only an evaluator has it; the engine never does), the sample is tracked under its
    true class as well, in separate statistics. Windows are tumbling: a window closes after
    ``window`` samples (a micro-batch that crosses the boundary is split) and its summary is
    appended to :meth:`history`.

    A baseline (the state before specialization) can be stored with :meth:`freeze_baseline`,
    or taken from another tracker (e.g. a frozen model's run) with :meth:`set_baseline`;
    :meth:`change` then compares the samples seen *since* the baseline was set with it.

    Args:
        num_classes: Number of classes of the model.
        num_exits: Number of exits of the model.
        window: Samples per window of the drift history.

    Example:
        >>> tracker = ClassCostTracker(num_classes=3, num_exits=2, window=2)
        >>> tracker.update([0, 2], [0, 1], [10.0, 30.0])
        >>> tracker.get()["pred"]["mean_flops"]
        [10.0, nan, 30.0]
        >>> tracker.history()[0]["mean_flops"]
        {0: 10.0, 2: 30.0}
    """

    def __init__(self, num_classes: int, num_exits: int, window: int = 500) -> None:
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.num_exits = _positive_int(num_exits, "num_exits")
        self.window = _positive_int(window, "window (samples per window)")
        self.reset()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, num_exits={self.num_exits}, "
            f"window={self.window}) at sample {self._position}"
        )

    def reset(self) -> None:
        """Forget everything: statistics, windows, history and baseline."""
        self._position = 0
        self._window_start = 0
        self._total = self._empty_stats()
        self._current = self._empty_stats()
        self._history: list[dict[str, Any]] = []
        self._baseline: dict[str, Any] | None = None

    def _empty_stats(self) -> dict[str, _ClassStats]:
        shape = (self.num_classes, self.num_exits)
        return {"pred": _ClassStats.zeros(*shape), "true": _ClassStats.zeros(*shape)}

    @property
    def samples(self) -> int:
        """Number of samples seen so far (the current stream position)."""
        return self._position

    # ----------------------------------------------------------------------------- update
    def update(
        self,
        pred_class: ArrayLike,
        exit_index: ArrayLike,
        flops: ArrayLike,
        true_class: ArrayLike | None = None,
    ) -> None:
        """Record one sample or a micro-batch of samples, in stream order.

        Args:
            pred_class: Predicted class per sample, int scalar or ``(B,)``.
            exit_index: Exit that answered per sample, int scalar or ``(B,)``.
            flops: FLOPs spent per sample, scalar or ``(B,)``, finite and ``>= 0``.
            true_class: True class per sample (evaluators only), or ``None``.

        Raises:
            ValueError: Lengths differ, or a value is out of range.
            TypeError: A class or exit index is not an integer.
        """
        batch = self._validate(pred_class, exit_index, flops, true_class)
        size, start = len(batch[0]), 0
        while start < size:
            take = min(size - start, self.window - (self._position - self._window_start))
            self._add(*(None if part is None else part[start : start + take] for part in batch))
            start += take
            if self._position - self._window_start == self.window:
                self._close_window()

    def _validate(
        self,
        pred_class: ArrayLike,
        exit_index: ArrayLike,
        flops: ArrayLike,
        true_class: ArrayLike | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        pred = _to_index(pred_class, "pred_class", self.num_classes)
        exits = _to_index(exit_index, "exit_index", self.num_exits)
        cost = _to_1d(flops, "flops").astype(np.float64)
        true = None if true_class is None else _to_index(true_class, "true_class", self.num_classes)
        lengths = {"pred_class": len(pred), "exit_index": len(exits), "flops": len(cost)}
        if true is not None:
            lengths["true_class"] = len(true)
        if len(set(lengths.values())) > 1:
            raise ValueError(f"update() needs one value per sample in each argument, got {lengths}")
        if not np.isfinite(cost).all() or (cost < 0).any():
            raise ValueError("flops must be finite and >= 0 for every sample")
        return pred, exits, cost, true

    def _add(
        self, pred: np.ndarray, exits: np.ndarray, flops: np.ndarray, true: np.ndarray | None
    ) -> None:
        for stats in (self._total, self._current):
            stats["pred"].add(pred, exits, flops)
            if true is not None:
                stats["true"].add(true, exits, flops)
        self._position += len(pred)

    # ---------------------------------------------------------------------------- windows
    def close_window(self) -> None:
        """Close the current window early (e.g. at the end of the stream) if it has samples.

        The next window then starts at the current position and again holds ``window``
        samples.
        """
        if self._position > self._window_start:
            self._close_window()

    def _close_window(self) -> None:
        self._history.append(self._window_entry())
        self._current = self._empty_stats()
        self._window_start = self._position

    def _window_entry(self) -> dict[str, Any]:
        pred = self._current["pred"]
        entry = {
            "start": self._window_start,
            "end": self._position,
            **_class_means(pred, ""),
            "exit_histogram": pred.exit_counts.sum(axis=0).tolist(),
            "mean_flops_all": float(pred.flops_sum.sum() / pred.samples),
        }
        if self._current["true"].samples:
            entry.update(_class_means(self._current["true"], "_true"))
        return entry

    def history(self) -> list[dict[str, Any]]:
        """Summaries of the closed windows, oldest first.

        Returns:
            One dict per window: ``start`` and ``end`` (stream positions, end exclusive),
            ``mean_flops`` and ``counts`` (``{class_id: value}`` for the predicted classes seen
            in the window), ``exit_histogram`` (samples per exit) and ``mean_flops_all``.
            Windows with labelled samples also carry ``mean_flops_true`` and ``counts_true``
            (by true class).
        """
        return [_copy_entry(entry) for entry in self._history]

    # -------------------------------------------------------------------------------- get
    def get(self) -> dict[str, Any]:
        """Current statistics, cumulative and for the open window.

        Returns:
            ``samples`` (stream position); ``pred``: per predicted class ``counts``,
            ``mean_flops`` (``NaN`` for classes not seen) and ``exit_histogram`` (``C x K``);
            ``true``: the same by true class, or ``None`` if no labelled sample was seen;
            ``exit_histogram`` (samples per exit) and ``mean_flops_all``; ``window``: the same
            keys for the open window, with ``start`` instead of ``samples`` and ``size``.
        """
        size = self._position - self._window_start
        window = {"start": self._window_start, "size": size, **self._describe(self._current)}
        return {"samples": self._position, **self._describe(self._total), "window": window}

    @staticmethod
    def _describe(stats: Mapping[str, _ClassStats]) -> dict[str, Any]:
        pred, true = stats["pred"], stats["true"]
        return {
            "pred": pred.describe(),
            "true": true.describe() if true.samples else None,
            "exit_histogram": pred.exit_counts.sum(axis=0).tolist(),
            "mean_flops_all": float(_safe_divide(pred.flops_sum.sum(), pred.samples)),
        }

    # --------------------------------------------------------------------------- baseline
    def freeze_baseline(self) -> None:
        """Store the current cumulative statistics as the baseline (call before specializing)."""
        self.set_baseline(self.get())

    def set_baseline(self, snapshot: Mapping[str, Any]) -> None:
        """Store a baseline to compare against; samples seen from now on are "after".

        Args:
            snapshot: A :meth:`get` result, of this tracker or of another one over the same
                classes (e.g. the frozen model's tracker); ``None`` entries count as ``NaN``.

        Raises:
            ValueError: The snapshot's per-class lists do not have ``num_classes`` entries.
        """
        before = {key: self._baseline_part(snapshot.get(key), key) for key in ("pred", "true")}
        self._baseline = {
            "position": self._position,
            "before": before,
            "mark": {key: self._total[key].state() for key in ("pred", "true")},
        }

    def _baseline_part(self, part: Mapping[str, Any] | None, key: str) -> dict[str, Any] | None:
        if part is None:
            return None
        means, counts = _none_to_nan(part["mean_flops"]), np.asarray(part["counts"], np.int64)
        if means.shape != (self.num_classes,) or counts.shape != (self.num_classes,):
            raise ValueError(
                f"baseline snapshot[{key!r}] must list {self.num_classes} classes, "
                f"got {means.shape[0]} means and {counts.shape[0]} counts"
            )
        return {"mean_flops": means.tolist(), "counts": counts.tolist()}

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The stored baseline (``position`` it was set at, per-class means), or ``None``."""
        if self._baseline is None:
            return None
        return {"position": self._baseline["position"], **_deep_copy(self._baseline["before"])}

    def change(self, by: str = "pred") -> dict[str, list]:
        """Per-class change in mean FLOPs of the samples seen since the baseline was set.

        Args:
            by: ``"pred"`` (by predicted class) or ``"true"`` (by true class; needs labels on
                both sides).

        Returns:
            Lists of ``num_classes`` entries: ``before`` and ``after`` mean FLOPs, ``delta``
            (after - before), ``ratio`` (after / before), ``count_before`` and
            ``count_after``; ``NaN`` where a side has no sample of a class.

        Raises:
            RuntimeError: No baseline was set.
            ValueError: ``by`` is unknown, or the baseline has no ``"true"`` statistics.
        """
        if self._baseline is None:
            raise RuntimeError(
                "no baseline: call freeze_baseline() before specialization starts, or "
                "set_baseline(frozen_tracker.get())"
            )
        if by not in ("pred", "true"):
            raise ValueError(f"by must be 'pred' or 'true', got {by!r}")
        before = self._baseline["before"][by]
        if before is None:
            raise ValueError(f"the baseline has no {by!r} statistics (no labelled samples)")
        mark = _ClassStats.from_state(self._baseline["mark"][by], self.num_classes, self.num_exits)
        total = self._total[by]
        after = _safe_divide(total.flops_sum - mark.flops_sum, total.counts - mark.counts)
        before_means = np.asarray(before["mean_flops"], dtype=np.float64)
        return {
            "before": before_means.tolist(),
            "after": after.tolist(),
            "delta": (after - before_means).tolist(),
            "ratio": _safe_divide(after, before_means).tolist(),
            "count_before": list(before["counts"]),
            "count_after": (total.counts - mark.counts).tolist(),
        }

    # ------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain numbers and lists (JSON-safe, no NaN)."""
        baseline = None
        if self._baseline is not None:
            baseline = _deep_copy(self._baseline)
            for part in baseline["before"].values():
                if part is not None:
                    part["mean_flops"] = _nan_to_none(part["mean_flops"])
        return {
            "version": _STATE_VERSION,
            "num_classes": self.num_classes,
            "num_exits": self.num_exits,
            "window": self.window,
            "position": self._position,
            "window_start": self._window_start,
            "total": {key: stats.state() for key, stats in self._total.items()},
            "current": {key: stats.state() for key, stats in self._current.items()},
            "history": self.history(),
            "baseline": baseline,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also after a JSON round trip).

        Raises:
            ValueError: The state was saved by a tracker with other classes, exits or window.
        """
        saved = (state["num_classes"], state["num_exits"], state["window"])
        if saved != (self.num_classes, self.num_exits, self.window):
            raise ValueError(
                f"state is for (num_classes, num_exits, window) = {saved}, this tracker has "
                f"{(self.num_classes, self.num_exits, self.window)}; build it with those values "
                "or use ClassCostTracker.from_state_dict"
            )
        shape = (self.num_classes, self.num_exits)
        self._total = {k: _ClassStats.from_state(v, *shape) for k, v in state["total"].items()}
        self._current = {k: _ClassStats.from_state(v, *shape) for k, v in state["current"].items()}
        self._position = int(state["position"])
        self._window_start = int(state["window_start"])
        self._history = [_copy_entry(entry) for entry in state["history"]]
        self._baseline = None
        if state.get("baseline") is not None:
            self._baseline = _deep_copy(state["baseline"])
            for part in self._baseline["before"].values():
                if part is not None:
                    part["mean_flops"] = _none_to_nan(part["mean_flops"]).tolist()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ClassCostTracker:
        """Build a tracker from a :meth:`state_dict`."""
        tracker = cls(state["num_classes"], state["num_exits"], state["window"])
        tracker.load_state_dict(state)
        return tracker


def _class_means(stats: _ClassStats, suffix: str) -> dict[str, dict[int, float | int]]:
    """``{"mean_flops<suffix>": {c: mean}, "counts<suffix>": {c: n}}`` for the seen classes."""
    seen = np.flatnonzero(stats.counts)
    means = stats.flops_sum[seen] / stats.counts[seen]
    return {
        f"mean_flops{suffix}": {int(c): float(m) for c, m in zip(seen, means, strict=True)},
        f"counts{suffix}": {int(c): int(stats.counts[c]) for c in seen},
    }


def _copy_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Copy a history entry; class-keyed dicts get int keys back (JSON turns them into str)."""
    copy = {}
    for key, value in entry.items():
        if isinstance(value, Mapping):
            value = {int(c): v for c, v in value.items()}
        elif isinstance(value, list):
            value = list(value)
        copy[key] = value
    return copy


def _deep_copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _deep_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_deep_copy(item) for item in value]
    return value


# -------------------------------------------------------------------------------- detectors
class DriftDetector(ABC):
    """A river-style drift detector: ``update`` returns whether a drift was just detected.

    After a detection, the next ``update`` starts the statistics afresh, so each change is
    reported once. ``detections`` counts the alarms since construction or :meth:`reset`.
    """

    def __init__(self) -> None:
        self._drift_detected = False
        self.detections = 0

    @property
    def drift_detected(self) -> bool:
        """Whether the last :meth:`update` detected a drift."""
        return self._drift_detected

    @abstractmethod
    def update(self, x: Any) -> bool:
        """Feed one observation; return :attr:`drift_detected`."""

    def update_many(self, values: Iterable[Any]) -> bool:
        """Feed observations in order; return whether any of them raised an alarm.

        A detection in the middle restarts the statistics, as :meth:`update` does.
        """
        values = _to_1d(values, "values") if hasattr(values, "detach") else values
        detected = False
        for x in values:
            detected |= self.update(x)
        return detected

    def reset(self) -> None:
        """Return to the state just after construction (statistics and alarm count)."""
        self._restart()
        self.detections = 0

    def _restart(self) -> None:
        """Forget the statistics after a detection; the alarm count is kept."""
        self._drift_detected = False

    def _signal(self, detected: bool) -> bool:
        self._drift_detected = bool(detected)
        self.detections += self._drift_detected
        return self._drift_detected

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Configuration and statistics as plain numbers and lists (JSON-safe)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the configuration must match."""

    def _check_config(self, state: Mapping[str, Any]) -> None:
        config = self._config()
        if dict(state["config"]) != config:
            raise ValueError(
                f"state was saved by {type(self).__name__}({state['config']}), this detector is "
                f"{type(self).__name__}({config}); build it with the saved configuration"
            )

    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """Constructor arguments, as saved in the state dict."""


class PageHinkley(DriftDetector):
    """Page-Hinkley test for a shift in the mean of a scalar signal (river's semantics).

    With ``m_t`` the running mean of ``x_1..x_t`` and ``d_t = x_t - m_t``, two sums are kept:
    ``U_t = alpha * U_{t-1} + d_t - delta`` (increases) and ``L_t = alpha * L_{t-1} + d_t +
    delta`` (decreases). An increase is detected when ``U_t - min(U) > threshold``, a decrease
    when ``max(L) - L_t > threshold``, once ``min_instances`` values were seen.

    ``threshold`` and ``delta`` are in the units of the signal: feed values of a known scale,
    e.g. each sample's FLOPs divided by the full-path FLOPs (in ``[0, 1]``).

    Args:
        delta: Magnitude of change tolerated without accumulating evidence.
        threshold: Evidence needed for an alarm (lambda).
        alpha: Forgetting factor of the sums (1: no forgetting).
        min_instances: Values seen before an alarm may be raised.
        mode: ``"up"`` (increases only), ``"down"`` (decreases only) or ``"both"``.
    """

    MODES = ("up", "down", "both")

    def __init__(
        self,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 1 - 1e-4,
        min_instances: int = 30,
        mode: str = "both",
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        if threshold <= 0 or delta < 0:
            raise ValueError(f"need threshold > 0 and delta >= 0, got {threshold} and {delta}")
        if min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {min_instances}")
        self.delta = float(delta)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.min_instances = int(min_instances)
        self.mode = mode
        self._restart()

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({args})"

    def _config(self) -> dict[str, Any]:
        return {
            "delta": self.delta,
            "threshold": self.threshold,
            "alpha": self.alpha,
            "min_instances": self.min_instances,
            "mode": self.mode,
        }

    def _restart(self) -> None:
        super()._restart()
        self._count = 0
        self._mean = 0.0
        self._sum_increase = 0.0
        self._sum_decrease = 0.0
        self._min_increase = math.inf
        self._max_decrease = -math.inf

    @property
    def mean(self) -> float:
        """Running mean of the values since the last restart (``0.0`` before any)."""
        return self._mean

    def update(self, x: float) -> bool:
        """Feed one value.

        Args:
            x: The observation (a number or a one-element tensor), finite.

        Returns:
            Whether a drift was detected at this value.
        """
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"PageHinkley.update needs a finite value, got {x}")
        if self._drift_detected:
            self._restart()
        self._count += 1
        self._mean += (x - self._mean) / self._count
        deviation = x - self._mean
        self._sum_increase = self.alpha * self._sum_increase + deviation - self.delta
        self._sum_decrease = self.alpha * self._sum_decrease + deviation + self.delta
        self._min_increase = min(self._min_increase, self._sum_increase)
        self._max_decrease = max(self._max_decrease, self._sum_decrease)
        if self._count < self.min_instances:
            return False
        increase = self._sum_increase - self._min_increase > self.threshold
        decrease = self._max_decrease - self._sum_decrease > self.threshold
        by_mode = {"up": increase, "down": decrease, "both": increase or decrease}
        return self._signal(by_mode[self.mode])

    def state_dict(self) -> dict[str, Any]:
        """Configuration and statistics; infinities (nothing seen yet) are saved as ``None``."""
        return {
            "config": self._config(),
            "count": self._count,
            "mean": self._mean,
            "sum_increase": self._sum_increase,
            "sum_decrease": self._sum_decrease,
            "min_increase": None if math.isinf(self._min_increase) else self._min_increase,
            "max_decrease": None if math.isinf(self._max_decrease) else self._max_decrease,
            "drift_detected": self._drift_detected,
            "detections": self.detections,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: The state was saved with another configuration.
        """
        self._check_config(state)
        self._count = int(state["count"])
        self._mean = float(state["mean"])
        self._sum_increase = float(state["sum_increase"])
        self._sum_decrease = float(state["sum_decrease"])
        low, high = state["min_increase"], state["max_decrease"]
        self._min_increase = math.inf if low is None else float(low)
        self._max_decrease = -math.inf if high is None else float(high)
        self._drift_detected = bool(state["drift_detected"])
        self.detections = int(state["detections"])


class ClassMixDriftDetector(DriftDetector):
    """Alarm when the mix of predicted classes moves away from a reference mix.

    The first ``window`` predictions after a (re)start form the reference histogram; the
    detector then keeps the histogram of the last ``window`` predictions and raises an alarm
    when the total variation distance between the two, ``0.5 * sum_c |p_c - q_c|`` in
    ``[0, 1]``, exceeds ``threshold``. The distance is maintained in O(1) per prediction.

    Args:
        num_classes: Number of classes of the model.
        window: Predictions in the reference and in the recent window.
        threshold: Total variation distance that raises an alarm, in ``(0, 1)``. Two windows
            drawn from the same mix of ``C`` classes differ by about
            ``sqrt(C / (2 * pi * window))`` in total variation; keep the threshold well above.
    """

    def __init__(self, num_classes: int, window: int = 200, threshold: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a total variation distance in (0, 1), got {threshold}")
        self.num_classes = _positive_int(num_classes, "num_classes")
        self.window = _positive_int(window, "window (samples per window)")
        self.threshold = float(threshold)
        self._restart()

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({args})"

    def _config(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "window": self.window, "threshold": self.threshold}

    def _restart(self) -> None:
        super()._restart()
        self._reference = [0] * self.num_classes
        self._reference_size = 0
        self._recent: deque[int] = deque(maxlen=self.window)
        self._recent_counts = [0] * self.num_classes
        self._l1 = 0  # sum_c |reference_c - recent_c|, in samples

    @property
    def distance(self) -> float:
        """Total variation distance between the windows; ``NaN`` until both are full."""
        if len(self._recent) < self.window:
            return math.nan
        return self._l1 / (2 * self.window)

    def update(self, x: int) -> bool:
        """Feed one predicted class.

        Args:
            x: The predicted class, an int (or one-element tensor) in ``[0, num_classes)``.

        Returns:
            Whether a drift was detected at this prediction.
        """
        cls = int(_to_index(x, "pred_class", self.num_classes)[0])
        if self._drift_detected:
            self._restart()
        if self._reference_size < self.window:
            self._reference[cls] += 1
            self._reference_size += 1
            self._l1 += 1  # the recent window is still empty
            return False
        if len(self._recent) == self.window:
            self._move(self._recent[0], -1)
        self._recent.append(cls)
        self._move(cls, +1)
        return self._signal(self.distance > self.threshold)

    def _move(self, cls: int, step: int) -> None:
        self._l1 -= abs(self._reference[cls] - self._recent_counts[cls])
        self._recent_counts[cls] += step
        self._l1 += abs(self._reference[cls] - self._recent_counts[cls])

    def state_dict(self) -> dict[str, Any]:
        """Configuration, the reference histogram and the recent predictions (oldest first)."""
        return {
            "config": self._config(),
            "reference": list(self._reference),
            "reference_size": self._reference_size,
            "recent": list(self._recent),
            "drift_detected": self._drift_detected,
            "detections": self.detections,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: The state was saved with another configuration.
        """
        self._check_config(state)
        self._restart()
        self._reference = [int(n) for n in state["reference"]]
        self._reference_size = int(state["reference_size"])
        self._l1 = sum(self._reference)
        for cls in state["recent"]:
            self._recent.append(int(cls))
            self._move(int(cls), +1)
        self._drift_detected = bool(state["drift_detected"])
        self.detections = int(state["detections"])
