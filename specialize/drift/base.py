"""The small base class every drift detector builds on (river's ``DriftDetector`` shape)."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from specialize.drift._inputs import to_1d


class DriftDetector(ABC):
    """A river-style drift detector: ``update`` returns whether a drift was just detected.

    After a detection, the next ``update`` starts the statistics afresh, so each change is
    reported once. ``detections`` counts the alarms since construction or :meth:`reset`.

    A subclass keeps each constructor argument as an attribute of the same name (its
    configuration, as in river) and implements :meth:`update` (ending with ``return
    self._signal(alarm)``), ``_restart`` (calling ``super()._restart()``), ``_statistics`` and
    ``_load_statistics``; the base class saves, restores and prints it.

    Example:
        >>> class AboveOne(DriftDetector):
        ...     def update(self, x):
        ...         return self._signal(x > 1)
        ...     def _statistics(self):
        ...         return {}
        ...     def _load_statistics(self, state):
        ...         pass
        >>> detector = AboveOne()
        >>> detector.update_many([0.5, 2.0, 0.7])
        True
        >>> detector.drift_detected, detector.detections
        (False, 1)
        >>> detector.state_dict()
        {'config': {}, 'drift_detected': False, 'detections': 1}
    """

    def __init__(self) -> None:
        self._drift_detected = False
        self.detections = 0

    def __repr__(self) -> str:
        args = ", ".join(f"{key}={value!r}" for key, value in self._config().items())
        return f"{type(self).__name__}({args})"

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
        values = to_1d(values, "values") if hasattr(values, "detach") else values
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

    # ------------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """Configuration, statistics and alarm state as plain numbers and lists (JSON-safe)."""
        return {
            "config": self._config(),
            **self._statistics(),
            "drift_detected": self._drift_detected,
            "detections": self.detections,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises:
            ValueError: The state was saved with another configuration.
        """
        config = self._config()
        if dict(state["config"]) != config:
            raise ValueError(
                f"state was saved by {type(self).__name__}({state['config']}), this detector is "
                f"{type(self).__name__}({config}); build it with the saved configuration"
            )
        self._load_statistics(state)
        self._drift_detected = bool(state["drift_detected"])
        self.detections = int(state["detections"])

    def _config(self) -> dict[str, Any]:
        """Constructor arguments (read from the attributes of the same name), in their order."""
        parameters = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in list(parameters)[1:]}

    @abstractmethod
    def _statistics(self) -> dict[str, Any]:
        """The statistics since the last restart, as plain numbers and lists."""

    @abstractmethod
    def _load_statistics(self, state: Mapping[str, Any]) -> None:
        """Restore the statistics saved by :meth:`_statistics` (the config already matches)."""
