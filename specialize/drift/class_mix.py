"""Class-mix drift: an alarm when the mix of predicted classes moves away from a reference."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from specialize.drift._inputs import positive_int, to_index
from specialize.drift.base import DriftDetector


class ClassMixDriftDetector(DriftDetector):
    """Alarm when the mix of predicted classes moves away from a reference mix.

    The first ``window`` predictions after a (re)start form the reference histogram; the
    detector then keeps the histogram of the last ``window`` predictions and raises an alarm
    when the total variation distance between the two, ``0.5 * sum_c |p_c - q_c|`` in
    ``[0, 1]``, exceeds the distance two windows of the reference mix show by chance
    (:attr:`chance`) by more than ``threshold``. The chance distance grows with the number of
    classes the predictions spread over: about 0.1 for 4 classes in windows of 100, about 0.4
    for a 200-class model whose errors scatter, so a fixed threshold either misses drift on
    the first or fires every few hundred samples on the second. The distance is maintained in
    O(1) per prediction.

    Args:
        num_classes: Number of classes of the model.
        window: Predictions in the reference and in the recent window.
        threshold: Total variation distance above chance that raises an alarm, in ``(0, 1)``.

    Example:
        A stream of tops (classes 0, 2, 4) turns into a stream of footwear (5, 7, 9) at
        prediction 300.

        >>> import random
        >>> rng = random.Random(0)
        >>> predictions = [rng.choice([0, 2, 4]) for _ in range(300)]
        >>> predictions += [rng.choice([5, 7, 9]) for _ in range(300)]
        >>> detector = ClassMixDriftDetector(num_classes=10, window=100, threshold=0.3)
        >>> for i, pred_class in enumerate(predictions):
        ...     _ = detector.update(pred_class)  # returns detector.drift_detected too
        ...     if detector.drift_detected:
        ...         print(f"Change detected at prediction {i}")
        Change detected at prediction 337
        >>> round(detector.chance, 3)  # two windows of the footwear mix differ this much by chance
        0.079
        >>> detector.distance  # after the alarm, footwear is the reference mix
        0.09
    """

    def __init__(self, num_classes: int, window: int = 200, threshold: float = 0.3) -> None:
        super().__init__()
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold is a total variation distance in (0, 1), got {threshold}")
        self.num_classes = positive_int(num_classes, "num_classes")
        self.window = positive_int(window, "window (samples per window)")
        self.threshold = float(threshold)
        self._restart()

    def _restart(self) -> None:
        super()._restart()
        self._reference = [0] * self.num_classes
        self._reference_size = 0
        self._recent: deque[int] = deque(maxlen=self.window)
        self._recent_counts = [0] * self.num_classes
        self._l1 = 0  # sum_c |reference_c - recent_c|, in samples
        self._chance = math.nan

    @property
    def distance(self) -> float:
        """Total variation distance between the windows; ``NaN`` until both are full."""
        if len(self._recent) < self.window:
            return math.nan
        return self._l1 / (2 * self.window)

    @property
    def chance(self) -> float:
        """Expected distance of two windows drawn from the reference mix; ``NaN`` until it is full.

        Per class, the difference of two window frequencies is about normal with variance
        ``2 p (1 - p) / window``, so ``E|.| = sqrt(4 p (1 - p) / (pi * window))``; for rare
        classes (a count near 0) it is at most ``2 p``, the Poisson limit.
        """
        return self._chance

    def _close_reference(self) -> None:
        n = self.window
        expected = 0.0
        for count in self._reference:
            p = count / n
            expected += min(math.sqrt(4.0 * p * (1.0 - p) / (math.pi * n)), 2.0 * p)
        self._chance = 0.5 * expected

    def update(self, x: int) -> bool:
        """Feed one predicted class.

        Args:
            x: The predicted class, an int (or one-element tensor) in ``[0, num_classes)``.

        Returns:
            Whether a drift was detected at this prediction.
        """
        cls = int(to_index(x, "pred_class", self.num_classes)[0])
        if self._drift_detected:
            self._restart()
        if self._reference_size < self.window:
            self._reference[cls] += 1
            self._reference_size += 1
            self._l1 += 1  # the recent window is still empty
            if self._reference_size == self.window:
                self._close_reference()
            return False
        if len(self._recent) == self.window:
            self._move(self._recent[0], -1)
        self._recent.append(cls)
        self._move(cls, +1)
        return self._signal(self.distance > self._chance + self.threshold)

    def _move(self, cls: int, step: int) -> None:
        self._l1 -= abs(self._reference[cls] - self._recent_counts[cls])
        self._recent_counts[cls] += step
        self._l1 += abs(self._reference[cls] - self._recent_counts[cls])

    def _statistics(self) -> dict[str, Any]:
        """The reference histogram and the recent predictions (oldest first)."""
        return {
            "reference": list(self._reference),
            "reference_size": self._reference_size,
            "recent": list(self._recent),
        }

    def _load_statistics(self, state: Mapping[str, Any]) -> None:
        self._restart()
        self._reference = [int(n) for n in state["reference"]]
        self._reference_size = int(state["reference_size"])
        self._l1 = sum(self._reference)
        if self._reference_size == self.window:
            self._close_reference()
        for cls in state["recent"]:
            self._recent.append(int(cls))
            self._move(int(cls), +1)
