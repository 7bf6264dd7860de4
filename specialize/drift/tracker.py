"""Per-class compute over a stream: cumulative, in the current window, and per closed window.

:class:`ClassCostTracker` records, per predicted class (and per true class when an evaluator
supplies labels), how many samples were seen, their mean FLOPs and the exits they took:
cumulatively, in the current window, and for every closed window (the drift history).
The history holds at most ``max_windows`` entries: beyond that the oldest windows are merged
in pairs, so memory is set by configuration while the whole stream stays visible, recent
windows at full resolution and older ones coarser.

FLOPs follow the project's convention: a multiply-add counts 2.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from specialize.drift._inputs import ArrayLike, positive_int, to_1d, to_index
from specialize.drift.history import copy_entry, merge_entries, pair_to_merge

_STATE_VERSION = 1
DEFAULT_MAX_WINDOWS = 500  # history entries: 125,000 samples at full resolution (window 250)


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
    appended to :meth:`history`. When the history would exceed ``max_windows`` entries, two
    adjacent entries are merged into one: the oldest adjacent pair of equal span, the finest
    such span first (as in an exponential histogram: recent windows stay at full resolution,
    spans double with age); without two adjacent entries of equal span, the adjacent pair
    of the smallest total span.

    A baseline (the state before specialization) can be stored with :meth:`freeze_baseline`,
    or taken from another tracker (e.g. a frozen model's run) with :meth:`set_baseline`;
    :meth:`change` then compares the samples seen *since* the baseline was set with it.

    Args:
        num_classes: Number of classes of the model.
        num_exits: Number of exits of the model.
        window: Samples per window of the drift history.
        max_windows: Entries the history keeps (>= 2); older windows are merged beyond it.

    Example:
        >>> tracker = ClassCostTracker(num_classes=3, num_exits=2, window=2)
        >>> tracker.update([0, 2], [0, 1], [10.0, 30.0])
        >>> tracker.get()["pred"]["mean_flops"]
        [10.0, nan, 30.0]
        >>> tracker.history()[0]["mean_flops"]
        {0: 10.0, 2: 30.0}

        Freeze a baseline, then read how each class's cost changed since:

        >>> tracker.freeze_baseline()
        >>> tracker.update([0, 0], [1, 1], [20.0, 20.0])
        >>> tracker.change()["delta"]
        [10.0, nan, nan]
    """

    def __init__(self, num_classes: int, num_exits: int, window: int = 500,
                 max_windows: int = DEFAULT_MAX_WINDOWS) -> None:
        self.num_classes = positive_int(num_classes, "num_classes")
        self.num_exits = positive_int(num_exits, "num_exits")
        self.window = positive_int(window, "window (samples per window)")
        self.max_windows = positive_int(max_windows, "max_windows (history entries)")
        if self.max_windows < 2:
            raise ValueError(f"max_windows must be >= 2 (older windows merge in pairs), got "
                             f"{max_windows}")
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
        pred = to_index(pred_class, "pred_class", self.num_classes)
        exits = to_index(exit_index, "exit_index", self.num_exits)
        cost = to_1d(flops, "flops").astype(np.float64)
        true = None if true_class is None else to_index(true_class, "true_class", self.num_classes)
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
        self._coarsen()
        self._current = self._empty_stats()
        self._window_start = self._position

    def _coarsen(self) -> None:
        """Merge adjacent history entries until at most ``max_windows`` remain."""
        while len(self._history) > self.max_windows:
            index = pair_to_merge([entry["end"] - entry["start"] for entry in self._history])
            first, second = self._history[index], self._history[index + 1]
            self._history[index : index + 2] = [merge_entries(first, second)]

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
        """Summaries of the closed windows, oldest first (at most ``max_windows``).

        An entry that merged older windows spans several of them; its means are the
        sample-weighted means of the merged windows.

        Returns:
            One dict per window: ``start`` and ``end`` (stream positions, end exclusive),
            ``mean_flops`` and ``counts`` (``{class_id: value}`` for the predicted classes seen
            in the window), ``exit_histogram`` (samples per exit) and ``mean_flops_all``.
            Windows with labelled samples also carry ``mean_flops_true`` and ``counts_true``
            (by true class).
        """
        return [copy_entry(entry) for entry in self._history]

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
        return {"position": self._baseline["position"], **copy.deepcopy(self._baseline["before"])}

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
            baseline = copy.deepcopy(self._baseline)
            for part in baseline["before"].values():
                if part is not None:
                    part["mean_flops"] = _nan_to_none(part["mean_flops"])
        return {
            "version": _STATE_VERSION,
            "num_classes": self.num_classes,
            "num_exits": self.num_exits,
            "window": self.window,
            "max_windows": self.max_windows,
            "position": self._position,
            "window_start": self._window_start,
            "total": {key: stats.state() for key, stats in self._total.items()},
            "current": {key: stats.state() for key, stats in self._current.items()},
            "history": self.history(),
            "baseline": baseline,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (also after a JSON round trip).

        A state with more history entries than this tracker's ``max_windows`` is coarsened.

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
        self._history = [copy_entry(entry) for entry in state["history"]]
        self._coarsen()
        self._baseline = None
        if state.get("baseline") is not None:
            self._baseline = copy.deepcopy(state["baseline"])
            for part in self._baseline["before"].values():
                if part is not None:
                    part["mean_flops"] = _none_to_nan(part["mean_flops"]).tolist()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> ClassCostTracker:
        """Build a tracker from a :meth:`state_dict`."""
        tracker = cls(state["num_classes"], state["num_exits"], state["window"],
                      state.get("max_windows", DEFAULT_MAX_WINDOWS))
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
