"""Audits: a seeded random share of served samples run on to the final exit, label-free.

An audited sample is answered as usual; then the engine keeps computing up to the final exit
(``backbones.executor.AuditTrace``) and the final exit's answer becomes the reference. No label
is read. Audits are the one source of two things:

* the updater's **health check** (``HeadUpdater.audit``): early answers that disagree with the
  final exit more than at the start roll the heads back;
* the **label-free estimates** in the summary: disagreement with the final exit, and the
  belief estimate of the accuracy drop, the mean over audited samples of
  ``q(final answer) - q(served answer)`` with ``q`` the final exit's softmax at a temperature
  fitted on validation data
  (:func:`specialize.operating_point.calibration.fit_temperature`), with its standard error.
  Answers of the final exit itself count as 0 for both, so both are means over the stream.

Audit compute is real: its FLOPs count in the stream's FLOPs and are reported apart
(``EngineResult.audit_flops_sum``). It runs in the serving thread, inside the step that
answered the sample, so in async mode it delays serving by its own cost only.

Example:
    >>> sampler = AuditSampler(rate=0.5, seed=0)
    >>> sampler.draw(torch.ones(8, dtype=torch.bool)).int().tolist()
    [1, 0, 1, 1, 1, 0, 1, 0]
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["AuditLog", "AuditSampler"]


class AuditSampler:
    """Draws which samples are audited: each valid one with probability ``rate``.

    One uniform number per batch row, valid or not, from a seeded generator, so the same
    stream positions are audited in every replay of a stream at the same batch size.

    Args:
        rate: Probability that a sample is audited, in ``[0, 1]``.
        seed: Seed of the generator.
    """

    def __init__(self, rate: float, seed: int = 0) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"audit rate must lie in [0, 1], got {rate}")
        self.rate = float(rate)
        self.generator = torch.Generator().manual_seed(int(seed))

    def draw(self, valid: Tensor) -> Tensor | None:
        """The audited rows of a batch (bool ``(B,)``), or ``None`` when no row is."""
        audit = (torch.rand(valid.shape[0], generator=self.generator) < self.rate) & valid
        return audit if bool(audit.any()) else None

    def state_dict(self) -> dict[str, Any]:
        """The rate and the generator's state."""
        return {"rate": self.rate, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.rate = float(state["rate"])
        self.generator.set_state(state["generator"])


class AuditLog:
    """Step hook: label-free figures from the audited samples; feeds the health check.

    Args:
        num_exits: Exits of the model.
        updater: A ``HeadUpdater`` whose ``audit()`` receives every audit (``None``: frozen).
        temperature: Divides the final exit's logits before its softmax ``q``.
    """

    def __init__(self, num_exits: int, updater: Any = None, temperature: float = 1.0) -> None:
        self.updater = updater
        self.temperature = float(temperature)
        self.count = 0
        self.disagree = 0
        self.belief_sum = 0.0
        self.belief_squares = 0.0
        self.exit_agree = torch.zeros(num_exits, dtype=torch.long)
        self.rollbacks = 0

    def on_step(self, output: Any) -> None:
        """Fold in the step's audits (``output.audit``); no-op when none was audited."""
        audit = output.audit
        if audit is None:
            return
        rows = audit.rows
        served_exit, served = output.exit_index[rows], output.pred[rows]
        final = audit.pred[:, -1]
        q = torch.softmax(audit.final_logits.double() / self.temperature, dim=1)
        belief = (q.gather(1, final[:, None]) - q.gather(1, served[:, None])).squeeze(1)
        self.count += int(rows.numel())
        self.disagree += int((served != final).sum())
        self.belief_sum += float(belief.sum())
        self.belief_squares += float((belief * belief).sum())
        self.exit_agree += (audit.pred == final[:, None]).sum(0)
        if self.updater is not None and self.updater.audit(served_exit, served, final):
            self.rollbacks += 1

    @property
    def disagreement(self) -> float:
        """Share (%) of audited answers that differ from the final exit's (NaN: none)."""
        return 100.0 * self.disagree / self.count if self.count else math.nan

    @property
    def belief_drop(self) -> tuple[float, float]:
        """The belief estimate of the accuracy drop and its standard error, in points."""
        if not self.count:
            return math.nan, math.nan
        mean = self.belief_sum / self.count
        variance = max(self.belief_squares / self.count - mean * mean, 0.0)
        return 100.0 * mean, 100.0 * math.sqrt(variance / self.count)

    @property
    def exit_agreement(self) -> list[float]:
        """Per exit, the share (%) of audited samples where it agrees with the final exit."""
        return [100.0 * a / self.count if self.count else math.nan
                for a in self.exit_agree.tolist()]

    def state_dict(self) -> dict[str, Any]:
        """Counts and sums (plain values and one tensor)."""
        return {"count": self.count, "disagree": self.disagree, "belief_sum": self.belief_sum,
                "belief_squares": self.belief_squares, "exit_agree": self.exit_agree.clone(),
                "rollbacks": self.rollbacks, "temperature": self.temperature}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.count, self.disagree = int(state["count"]), int(state["disagree"])
        self.belief_sum = float(state["belief_sum"])
        self.belief_squares = float(state["belief_squares"])
        self.exit_agree = state["exit_agree"].clone().long()
        self.rollbacks = int(state["rollbacks"])
        self.temperature = float(state["temperature"])
