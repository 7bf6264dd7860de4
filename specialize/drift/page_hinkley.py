"""Page-Hinkley test: an alarm when the mean of a scalar signal shifts."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from specialize.drift.base import DriftDetector


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

    Example:
        Each sample's FLOPs as a fraction of the full path: about 0.3 while most samples
        leave at an early exit, about 0.8 from sample 500 on, when they go deep.

        >>> import random
        >>> rng = random.Random(7)
        >>> cost = [0.3 + 0.1 * rng.random() for _ in range(500)]
        >>> cost += [0.8 + 0.1 * rng.random() for _ in range(500)]
        >>> detector = PageHinkley(threshold=5.0, mode="up")
        >>> for i, x in enumerate(cost):
        ...     _ = detector.update(x)  # returns detector.drift_detected too
        ...     if detector.drift_detected:
        ...         print(f"Change detected at sample {i}")
        Change detected at sample 510
        >>> detector.detections
        1
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

    def _statistics(self) -> dict[str, Any]:
        """Running mean and sums; infinities (nothing seen yet) are saved as ``None``."""
        return {
            "count": self._count,
            "mean": self._mean,
            "sum_increase": self._sum_increase,
            "sum_decrease": self._sum_decrease,
            "min_increase": None if math.isinf(self._min_increase) else self._min_increase,
            "max_decrease": None if math.isinf(self._max_decrease) else self._max_decrease,
        }

    def _load_statistics(self, state: Mapping[str, Any]) -> None:
        self._count = int(state["count"])
        self._mean = float(state["mean"])
        self._sum_increase = float(state["sum_increase"])
        self._sum_decrease = float(state["sum_decrease"])
        low, high = state["min_increase"], state["max_decrease"]
        self._min_increase = math.inf if low is None else float(low)
        self._max_decrease = -math.inf if high is None else float(high)
