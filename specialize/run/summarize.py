"""From what a run measured to its :class:`~specialize.summary.RunSummary`.

:func:`specialize.run.run_experiment` collects its measurements in :class:`RunRecords`
(held-out passes before and after, the stream replays as :class:`Replay`, timings) and
:func:`build_summary` turns them into the typed summary written as ``summary.json``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import timm
import torch

import specialize
from backbones.cost import FLOPS_CONVENTION
from specialize.drift import ClassCostTracker
from specialize.engine import EngineResult
from specialize.evaluation import curves
from specialize.evaluation.passes import (
    ExitPass,
    curve_points,
    operating_point,
    oracle_points,
    per_class_at,
)
from specialize.summary import (
    BeforeAfter,
    BudgetReplay,
    BudgetSection,
    ClassRow,
    CurvePoint,
    DriftSummary,
    DriftWindow,
    EvalSplits,
    IsoAccuracy,
    ModelSummary,
    OperatingPoint,
    RunSummary,
    ScenarioSummary,
    StreamRecord,
    StreamSection,
    UpdaterStats,
    Versions,
)
from streams.datasets import shares_images
from streams.replay import Stream

if TYPE_CHECKING:
    from specialize.run.config import RunConfig


# ---------------------------------------------------------------------------- the records
@dataclass
class Replay:
    """One replay of the stream, frozen or specializing, and what the run keeps from it.

    Attributes:
        record: Its line of the summary's ``stream`` section.
        tracker: The per-class cost tracker (windows closed).
        heads: ``heads_state(model)`` after the replay (``specialized_heads.pt``).
        exit_flops: FLOPs to reach each exit with the served heads.
        alarms: Stream positions of the last ``drift.max_alarms`` drift alarms.
        updater: The updater's counters (specializing replay only).
        alarm_count: Drift alarms fired in all (more than ``alarms`` lists when truncated).
        budget: The budget controller's and the audits' report (``None``: neither ran).
    """

    record: StreamRecord
    tracker: ClassCostTracker
    heads: dict[str, Any]
    exit_flops: list[int]
    alarms: list[int]
    updater: UpdaterStats | None = None
    alarm_count: int = 0
    budget: BudgetReplay | None = None

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain data (a run state holds it; :meth:`from_state_dict` reads it)."""
        return {"record": self.record.to_json_dict(), "tracker": self.tracker.state_dict(),
                "heads": self.heads, "exit_flops": list(self.exit_flops),
                "alarms": list(self.alarms), "alarm_count": self.alarm_count,
                "updater": None if self.updater is None else self.updater.to_json_dict(),
                "budget": None if self.budget is None else self.budget.to_json_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Replay:
        """The replay a :meth:`state_dict` describes."""
        updater = state["updater"]
        return cls(record=StreamRecord.from_json_dict(state["record"]),
                   tracker=ClassCostTracker.from_state_dict(state["tracker"]),
                   heads=state["heads"], exit_flops=list(state["exit_flops"]),
                   alarms=list(state["alarms"]), alarm_count=int(state["alarm_count"]),
                   updater=None if updater is None else UpdaterStats.from_json_dict(updater),
                   budget=BudgetReplay.from_json_dict(state["budget"])
                   if state.get("budget") else None)


class OnlineScore:
    """Evaluation-side step hook: scores each answer against the stream's labels, online.

    Only the evaluator holds the labels; the engine calls this hook like any other and
    never reads them, and the updater never sees them.

    Args:
        labels: The stream's labels (``StreamEvaluator.labels``), position by position.
    """

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.position = 0
        self.correct = 0

    def on_step(self, output) -> None:
        """Count the step's correct answers (skipped samples never count)."""
        count = int(output.pred.shape[0])
        truth = self.labels[self.position : self.position + count]
        self.correct += int(((output.pred == truth) & output.valid).sum())
        self.position += count

    def state_dict(self) -> dict[str, int]:
        """Position and count of correct answers."""
        return {"position": self.position, "correct": self.correct}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state_dict` output."""
        self.position, self.correct = int(state["position"]), int(state["correct"])


def stream_record(result: EngineResult, score: OnlineScore,
                  stats: UpdaterStats | None) -> StreamRecord:
    """The summary's line for one replay: online accuracy, FLOPs, exits, throughput.

    Args:
        result: The engine's aggregates over the whole stream.
        score: The replay's online score (correct answers).
        stats: The updater's counters, for a specializing replay.
    """
    answered = result.answered
    return StreamRecord(
        accuracy=100.0 * (score.correct / answered) if answered else float("nan"),
        mean_flops=result.mean_flops,
        exit_histogram=result.exit_histogram(),
        samples_per_second=result.samples_per_second,
        skipped=result.skipped,
        updates=None if stats is None else stats.updates,
    )


@dataclass
class RunRecords:
    """What :func:`run_experiment` measured, for :func:`build_summary`.

    Attributes:
        checkpoint: The model's checkpoint file.
        measure: The confidence measure.
        thresholds: Per-exit thresholds (``(K,)``, the last ``-inf``).
        before: Every exit's pass over the held-out sets before specializing.
        after: The same with the specialized heads.
        specializing: The replay that specialized the heads.
        frozen: The replay with the model frozen (``None`` if not run).
        timings: Seconds per step.
        trained_on: The ``dataset/split`` names that taught the model (``zoo.training_data``).
        budget: The summary's ``budget`` section (``specialize.run.budget``), or ``None``.
    """

    checkpoint: str
    measure: str
    thresholds: torch.Tensor
    before: EvalSplits[ExitPass]
    after: EvalSplits[ExitPass]
    specializing: Replay
    frozen: Replay | None
    timings: dict[str, float]
    trained_on: list[str] = field(default_factory=list)
    budget: BudgetSection | None = None


def build_summary(config: RunConfig, model, stream: Stream, records: RunRecords) -> RunSummary:
    """The run's summary (``summary.json``) from what it measured.

    Args:
        config: The run config (its drift window and iso-accuracy drop are read).
        model: The multi-exit model, still with the served heads (unanchored).
        stream: The stream that was replayed.
        records: The measurements.

    Returns:
        The typed summary; the README's "summary.json" table documents each section.
    """
    before, after, thresholds = records.before, records.after, records.thresholds
    points = BeforeAfter(*(passes.map(lambda p: OperatingPoint(**operating_point(p, thresholds)))
                           for passes in (before, after)))
    history = [DriftWindow.from_json_dict(w) for w in records.specializing.tracker.history()]
    return RunSummary(
        scenario=_scenario_summary(stream),
        model=_model_summary(model, records, stream),
        class_names=list(stream.class_names),
        thresholds=[float(t) if np.isfinite(t) else None for t in thresholds.tolist()],
        measure=records.measure,
        curves=BeforeAfter(before.map(_curve), after.map(_curve)),
        operating_points=points,
        oracle=before.map(lambda p: [CurvePoint(**point) for point in oracle_points(p)]),
        iso_accuracy=_iso_accuracy(before.eval_in, after.eval_in, config.evaluation.iso_drop),
        eval_out_accuracy_change=_accuracy_change(points.before.eval_out, points.after.eval_out),
        eval_in_peak_accuracy=BeforeAfter(_peak(before.eval_in), _peak(after.eval_in)),
        per_class=_per_class(stream, records, history),
        stream=StreamSection(records.specializing.record,
                             records.frozen.record if records.frozen else None),
        drift=_drift_summary(config, records.specializing, history),
        updater=records.specializing.updater,
        timings=records.timings,
        versions=Versions(specialize=specialize.__version__, torch=torch.__version__,
                          timm=timm.__version__, python=platform.python_version()),
        budget=records.budget,
    )


def _drift_summary(config: RunConfig, replay: Replay, history: list[DriftWindow]) -> DriftSummary:
    truncated = replay.alarm_count > len(replay.alarms)
    return DriftSummary(config.drift.window, history, replay.alarms,
                        alarm_count=replay.alarm_count if truncated else None)


def _scenario_summary(stream: Stream) -> ScenarioSummary:
    return ScenarioSummary(
        settings=stream.config.to_dict(), name=stream.name, classes=list(stream.classes),
        length=len(stream), fingerprint=stream.fingerprint,
        phase_boundaries=list(stream.phase_boundaries),
    )


def _model_summary(model, records: RunRecords, stream: Stream) -> ModelSummary:
    shared = None
    if records.trained_on:
        dataset, split = stream.config.dataset, stream.config.split
        overlaps = [shares_images(dataset, split, name.split("/", 1)[1])
                    if name.split("/")[0] == dataset else False for name in records.trained_on]
        shared = None if None in overlaps else any(overlaps)
    return ModelSummary(
        name=model.name, num_exits=model.num_exits,
        exit_flops=[int(info["flops"]) for info in model.exit_info],
        exit_flops_specialized=records.specializing.exit_flops,
        gating=bool(model.gating), gate_mode=model.gate_mode, checkpoint=records.checkpoint,
        flops_unit=FLOPS_CONVENTION, trained_on=records.trained_on or None,
        stream_shares_training_images=shared,
    )


def _curve(result: ExitPass) -> list[CurvePoint]:
    return [CurvePoint(**point) for point in curve_points(result)]


def _iso_accuracy(before: ExitPass | None, after: ExitPass | None,
                  drop: float) -> IsoAccuracy | None:
    if before is None or after is None:
        return None
    oracle = curves.oracle_curve(before.correct.numpy(), before.flops.numpy())
    fronts = (curves.pareto_front(_sweep(before)), curves.pareto_front(_sweep(after)))
    return IsoAccuracy(**curves.iso_accuracy(*fronts, oracle, drop=drop))


def _accuracy_change(before: OperatingPoint | None,
                     after: OperatingPoint | None) -> float | None:
    return None if before is None else after.accuracy - before.accuracy


def _peak(result: ExitPass | None) -> float | None:
    return None if result is None else float(_sweep(result).accuracy.max())


def _sweep(result: ExitPass) -> curves.CurvePoints:
    return curves.sweep(result.confidence.numpy(), result.correct.numpy(), result.flops.numpy())


def _per_class(stream: Stream, records: RunRecords, history: list[DriftWindow]) -> list[ClassRow]:
    tables = {phase: _per_class_table(passes, records.thresholds, stream.num_classes)
              for phase, passes in (("before", records.before), ("after", records.after))}
    first, last = (history[0], history[-1]) if history else (DriftWindow(), DriftWindow())
    return [
        ClassRow(
            class_id=c, name=stream.class_names[c], in_stream=c in stream.classes,
            flops_before=_num(tables["before"]["flops"][c]),
            flops_after=_num(tables["after"]["flops"][c]),
            accuracy_before=_num(tables["before"]["accuracy"][c]),
            accuracy_after=_num(tables["after"]["accuracy"][c]),
            stream_flops_first_window=_num(first.mean_flops.get(c)),
            stream_flops_last_window=_num(last.mean_flops.get(c)),
        )
        for c in range(stream.num_classes)
    ]


def _per_class_table(passes: EvalSplits[ExitPass], thresholds: torch.Tensor,
                     num_classes: int) -> dict[str, np.ndarray]:
    """Per true class at the thresholds, over both held-out sets together."""
    parts = [p for p in (passes.eval_in, passes.eval_out) if p is not None]
    merged = ExitPass(*(torch.cat([getattr(p, name) for p in parts])
                        for name in ("confidence", "pred", "flops", "labels")))
    return per_class_at(merged, thresholds, num_classes)


def _num(value: Any) -> float | None:
    """A finite float, or ``None`` (for NaN, infinities and ``None``)."""
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None
