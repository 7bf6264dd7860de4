"""Health of the specialized heads: audit windows of disagreement and rollback verdicts.

The engine audits some early answers by running the final exit as well. The first
``audit_baseline`` audited early answers set the baseline rate of disagreement with the final
exit (fed before the heads move); every following ``audit_window`` answers form a window. A
window whose rate exceeds ``baseline + audit_margin`` is degraded: with ``rollback`` on, the
heads go back to the last good snapshot, or to the base heads when the previous window rolled
back as well. :class:`HealthMonitor` keeps the counts and says what to do;
``HeadUpdater`` does it.

Example:
    >>> from specialize.updater import UpdaterConfig
    >>> health = HealthMonitor(UpdaterConfig(audit_baseline=4, audit_window=4,
    ...                                      audit_margin=0.1))
    >>> health.update(torch.tensor([False, False, False, True]))  # the baseline: 1/4
    []
    >>> health.update(torch.tensor([True, False, False, False]))  # 1/4: the heads are fine
    [<Verdict.HEALTHY: 'healthy'>]
    >>> health.update(torch.tensor([True, True, False, False, True, True, True, False]))
    [<Verdict.ROLL_BACK: 'roll_back'>, <Verdict.ROLL_BACK_TO_BASE: 'roll_back_to_base'>]
    >>> health.baseline_rate, health.last_window_rate, health.audited
    (0.25, 0.75, 16)
"""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
from torch import Tensor

from specialize.updater.config import UpdaterConfig

__all__ = ["HealthMonitor", "Verdict"]


class Verdict(enum.Enum):
    """What a closed audit window asks of the updater."""

    HEALTHY = "healthy"  # keep the heads; they become the last good snapshot
    DEGRADED = "degraded"  # count it only (rollback is off)
    ROLL_BACK = "roll_back"  # restore the last good snapshot
    ROLL_BACK_TO_BASE = "roll_back_to_base"  # the previous window rolled back too: base heads


class HealthMonitor:
    """The baseline/window state machine of the audit (plain numbers; not thread-safe).

    Args:
        config: The updater configuration (``audit_baseline``, ``audit_window``,
            ``audit_margin``, ``rollback``; read live).
    """

    def __init__(self, config: UpdaterConfig) -> None:
        self.config = config
        self._state: dict[str, Any] = {
            "baseline_n": 0, "baseline_disagree": 0, "window_n": 0, "window_disagree": 0,
            "audited": 0, "rolled_back_last": 0, "last_window_rate": math.nan,
        }
        self.closed_at: list[int] = []  # the last update's closed windows: audited answers then

    @property
    def audited(self) -> int:
        """Audited early answers so far."""
        return self._state["audited"]

    @property
    def baseline_rate(self) -> float | None:
        """The baseline disagreement rate, or ``None`` while the baseline is still filling."""
        state = self._state
        if state["baseline_n"] != self.config.audit_baseline:
            return None
        return state["baseline_disagree"] / state["baseline_n"]

    @property
    def last_window_rate(self) -> float | None:
        """The disagreement rate of the last closed window, or ``None`` before the first."""
        rate = self._state["last_window_rate"]
        return None if math.isnan(rate) else rate

    def update(self, disagree: Tensor) -> list[Verdict]:
        """Count audited early answers; return one verdict per window they close, in order.

        ``closed_at`` then holds, per verdict, the audited answers counted when it closed.

        Args:
            disagree: ``(n,)`` bool, whether each audited early answer disagreed with the
                final exit.
        """
        cumulative = torch.cumsum(disagree.long(), 0)
        total = cumulative.shape[0]
        state, cfg, done, verdicts = self._state, self.config, 0, []
        start, self.closed_at = state["audited"], []
        state["audited"] += total
        while done < total:  # one pass per baseline/window boundary inside the batch
            phase = "baseline" if state["baseline_n"] < cfg.audit_baseline else "window"
            room = (cfg.audit_baseline if phase == "baseline" else cfg.audit_window)
            take = min(room - state[f"{phase}_n"], total - done)
            state[f"{phase}_n"] += take
            state[f"{phase}_disagree"] += int(cumulative[done + take - 1]) - (
                int(cumulative[done - 1]) if done else 0)
            done += take
            if phase == "window" and state["window_n"] == cfg.audit_window:
                verdicts.append(self._close_window())
                self.closed_at.append(start + done)
        return verdicts

    def _close_window(self) -> Verdict:
        state = self._state
        baseline = state["baseline_disagree"] / state["baseline_n"]
        rate = state["window_disagree"] / state["window_n"]
        state.update(window_n=0, window_disagree=0, last_window_rate=rate)
        if rate <= baseline + self.config.audit_margin:
            state["rolled_back_last"] = 0
            return Verdict.HEALTHY
        if not self.config.rollback:
            return Verdict.DEGRADED
        verdict = Verdict.ROLL_BACK_TO_BASE if state["rolled_back_last"] else Verdict.ROLL_BACK
        state["rolled_back_last"] = 1
        return verdict

    def reset(self) -> None:
        """Drop the open window and the rollback streak (the heads were reset); keep the rest."""
        self._state.update(window_n=0, window_disagree=0, rolled_back_last=0)

    def state_dict(self) -> dict[str, Any]:
        """The counts as plain Python values (``last_window_rate`` ``None`` before a window)."""
        state = dict(self._state)
        if math.isnan(state["last_window_rate"]):
            state["last_window_rate"] = None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        state = dict(state)
        if state["last_window_rate"] is None:
            state["last_window_rate"] = math.nan
        self._state.update(state)
