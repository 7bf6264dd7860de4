"""The budget controller: re-chooses the exit thresholds online to hold an accuracy budget.

``policy.budget`` is the accuracy the user allows to lose against the final exit, in points.
The controller is a step hook of the serving thread. It holds every exit's answers on the
checkpoint's labelled validation set (one backbone pass at the start of the run; labels are
fine there, that is training time) and, from the served predictions alone, the stream's class
mix (:class:`~specialize.updater.prior.ClassPrior`). To choose, it recomputes the validation
answers for the heads served now (:func:`~specialize.evaluation.passes.rerun_heads`: heads only, no
backbone), draws validation rows with the stream's class mix
(:func:`~specialize.operating_point.search.stream_mix_rows`) and takes the cheapest thresholds (one
per early exit by default, ``policy.budget_thresholds``) whose drop's upper confidence bound
stays within the budget (:func:`~specialize.operating_point.search.choose_thresholds`, the search
``calibrate_thresholds`` runs). :mod:`specialize.operating_point.search` says why this estimator
and not the audits.

When it re-chooses (``trigger`` in the history):

* ``start``: before the first sample, on the whole validation set (the validation mix: the
  most rows, so the smallest standard error, and the classes the model was trained on in the
  proportions it was trained on; the stream's mix is not known yet);
* ``drift``: on a drift alarm. The class prior starts afresh (the mix changed) and the choice
  goes back to the whole validation set, like ``start``;
* ``rollback``: the health check rolled the heads back (audits);
* ``heads`` / ``periodic``: every ``retune_every`` samples, ``heads`` when the served heads
  changed since the last choice (a sync update or an async publication; re-choosing at every
  publication would rerun the heads every 32 samples, so publications wait for this beat),
  ``periodic`` when only the class mix moved.

The thresholds go to the engine's policy before
the next step. A bounded history (``history_size``, the last choices) says where, what and
why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections import deque
from typing import Any

import torch

from specialize.evaluation.passes import ExitPass, rerun_heads
from specialize.operating_point.search import (
    BudgetChoice,
    choose_thresholds,
    normal_quantile,
    stream_mix_rows,
)
from specialize.updater.prior import ClassPrior

__all__ = ["BudgetController", "TRIGGERS"]

TRIGGERS = ("start", "drift", "rollback", "heads", "periodic")


class BudgetController:
    """Step hook that holds ``budget`` by re-choosing the engine's thresholds.

    Args:
        evidence: Every exit's answers on the validation set with ``head_inputs`` kept
            (:func:`specialize.evaluation.passes.exit_pass` with ``keep_head_inputs=True``).
        budget: Allowed accuracy drop against the final exit, in points.
        confidence: One-sided confidence of the bound (``0.95``: 1.645 standard errors).
        retune_every: Samples between regular re-choices (and the class prior's window).
        history_size: Choices kept in :attr:`history` (the last ones).
        measure: The policy's confidence measure.
        shared: One threshold for all early exits, or one per early exit (the default).

    Attributes:
        history: The last choices, oldest first: dicts of ``position``, ``threshold`` (the
            first early exit's; ``None``: off), ``thresholds`` (every early exit's),
            ``drop`` and ``bound`` (estimated, points),
            ``flops`` (estimated mean per sample on the stream's mix), ``rows``, ``trigger``.
        retunes: Choices made in all (``history`` keeps the last ``history_size``).
    """

    def __init__(self, evidence: ExitPass, budget: float, *, confidence: float = 0.95,
                 retune_every: int = 500, history_size: int = 200,
                 measure: str = "max_softmax", shared: bool = False) -> None:
        if evidence.head_inputs is None:
            raise ValueError("the controller's evidence needs head inputs: run exit_pass(..., "
                             "keep_head_inputs=True) on the validation set")
        self.base_evidence = evidence
        self.evidence = evidence
        self.budget = float(budget)
        self.z = normal_quantile(confidence)
        self.retune_every = int(retune_every)
        self.measure = measure
        self.shared = bool(shared)
        self.num_classes = int(evidence.labels.max()) + 1 if len(evidence) else 1
        self.prior: ClassPrior | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=history_size)
        self.retunes = 0
        self.position = 0
        self.last_choice = 0
        self.heads_changed = False
        self.engine = self.updater = self.alarm = None
        self._version = self._alarms = self._rollbacks = 0

    def bind(self, engine: Any, updater: Any = None, alarm: Any = None) -> None:
        """Attach to the engine whose policy it sets, and make the ``start`` choice.

        Args:
            engine: The :class:`~specialize.engine.Engine` (its ``policy`` and ``model``).
            updater: The ``HeadUpdater`` whose heads are served (``None``: frozen heads).
            alarm: The specializer's drift alarm hook (``count`` of alarms), or ``None``.
        """
        self.engine, self.updater, self.alarm = engine, updater, alarm
        self.prior = ClassPrior(engine.model.num_classes, self.retune_every)
        self._sync_counters()
        self.evidence = self._current_evidence()
        self._choose("start")

    def _sync_counters(self) -> None:
        self._version = self.updater.heads_version if self.updater is not None else 0
        self._alarms = self.alarm.count if self.alarm is not None else 0
        self._rollbacks = self.updater.rollback_count if self.updater is not None else 0

    def on_step(self, output: Any) -> None:
        """Count the served classes; re-choose when a trigger is due."""
        valid = output.valid
        self.prior.update(output.pred[valid])
        self.position += int(valid.shape[0])
        trigger = self._due()
        if trigger is not None:
            if self.heads_changed:
                self.evidence = self._current_evidence()
            self._choose(trigger)

    def _due(self) -> str | None:
        """The trigger of a re-choice due now, or ``None``."""
        if self.updater is not None and self.updater.heads_version != self._version:
            self.heads_changed = True
        alarms = self.alarm.count if self.alarm is not None else 0
        rollbacks = self.updater.rollback_count if self.updater is not None else 0
        if alarms != self._alarms:
            self.prior.reset()
            return "drift"
        if rollbacks != self._rollbacks:
            return "rollback"
        if self.position - self.last_choice >= self.retune_every:
            return "heads" if self.heads_changed else "periodic"
        return None

    def _current_evidence(self) -> ExitPass:
        """The validation answers of the heads served now (heads rerun on cached inputs)."""
        serving = (self.updater.serving() if self.updater is not None
                   else contextlib.nullcontext())
        with serving:  # async: a publication waits until the heads were read
            rerun = rerun_heads(self.engine.model, self.base_evidence, self.measure)
        if rerun is None:
            raise RuntimeError("the served heads no longer split as the validation pass's "
                               "heads did; the controller cannot rerun them")
        return rerun

    def _rows(self, trigger: str) -> torch.Tensor:
        if trigger in ("start", "drift") or float(self.prior.counts.sum()) == 0.0:
            return torch.arange(len(self.evidence))
        return stream_mix_rows(self.evidence.labels, self.prior.probabilities())

    def _choose(self, trigger: str) -> BudgetChoice:
        choice = choose_thresholds(self.evidence, self._rows(trigger), self.budget, self.z,
                                   shared=self.shared)
        engine = self.engine
        engine.policy = dataclasses.replace(engine.policy, thresholds=choice.thresholds)
        values = [t if math.isfinite(t) else None for t in choice.thresholds]
        self.history.append({
            "position": self.position, "threshold": values[0] if values else None,
            "thresholds": values, "drop": choice.drop, "bound": choice.bound,
            "flops": choice.mean_flops, "rows": choice.samples, "trigger": trigger})
        self.retunes += 1
        self.last_choice = self.position
        self.heads_changed = False
        self._sync_counters()
        return choice

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The thresholds the engine serves with now."""
        return tuple(float(t) for t in self.engine.policy.thresholds_tensor(
            self.engine.model.num_exits)[:-1].tolist())

    def state_dict(self) -> dict[str, Any]:
        """Thresholds, class prior, positions and history (plain values and one tensor)."""
        return {"thresholds": list(self.thresholds), "prior": self.prior.state_dict(),
                "history": list(self.history), "retunes": self.retunes,
                "position": self.position, "last_choice": self.last_choice,
                "heads_changed": self.heads_changed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output (after :meth:`bind`, heads loaded)."""
        self.prior.load_state_dict(state["prior"])
        self.history.clear()
        self.history.extend(dict(entry) for entry in state["history"])
        self.retunes, self.position = int(state["retunes"]), int(state["position"])
        self.last_choice = int(state["last_choice"])
        self.heads_changed = bool(state["heads_changed"])
        self.engine.policy = dataclasses.replace(self.engine.policy,
                                                 thresholds=tuple(state["thresholds"]))
        self._sync_counters()
        self.evidence = self._current_evidence()

