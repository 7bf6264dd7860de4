"""The run summary as types: what ``specialize run`` measured, and its ``summary.json``.

Each section of ``summary.json`` (the README's "summary.json" table) is a dataclass here.
:meth:`RunSummary.to_json_dict` gives the JSON object, keys in field order (which is the
file's order); :meth:`RunSummary.from_json_dict` reads one back, so a report can be rendered
from a ``summary.json`` on disk. Reading is lenient: a missing or empty section is ``None``
(a missing list is empty), a missing field keeps its default, unknown keys are ignored.

Values are plain Python; NaN may stand for "undefined" in memory and is written as ``null``
(:func:`to_jsonable`). FLOPs: a multiply-add counts 2, as ``backbones.cost`` counts them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backbones.cost import FLOPS_CONVENTION
from specialize.summary.records import (
    BeforeAfter,
    EvalSplits,
    JsonRecord,
    as_is,
    before_after,
    class_keyed,
    eval_splits,
    json_field,
    record,
    records,
    to_jsonable,
)

__all__ = [
    "BudgetReplay",
    "BudgetSection",
    "ClassRow",
    "Curve",
    "CurvePoint",
    "DriftSummary",
    "DriftWindow",
    "IsoAccuracy",
    "ModelSummary",
    "OperatingPoint",
    "RunSummary",
    "ScenarioSummary",
    "StreamRecord",
    "StreamSection",
    "UpdaterStats",
    "Versions",
    "as_run_summary",
]

# ------------------------------------------------------------------------------ sections
@dataclass
class ScenarioSummary(JsonRecord):
    """The resolved scenario and the exact stream it built.

    ``settings`` holds the scenario's config fields (``ScenarioConfig.to_dict()``) in their
    order; a key also held by a typed field below is overridden in place by that field.
    """

    settings: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # the stream's name
    classes: list[int] | None = None  # the stream's classes
    length: int | None = None  # samples in the stream
    fingerprint: str | None = None  # hash of the exact sample sequence
    phase_boundaries: list[int] | None = None  # start position of each phase

    def to_json_dict(self) -> dict[str, Any]:
        """``settings`` with the typed fields put in (left out when ``None`` and unset)."""
        out = dict(self.settings)
        for item in dataclasses.fields(self)[1:]:
            value = getattr(self, item.name)
            if value is not None:
                out[item.name] = value
        return out

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any] | None) -> ScenarioSummary:
        """Every key goes to ``settings``; the typed fields read theirs from it too."""
        data = dict(data or {})
        return cls(data, **{item.name: data.get(item.name)
                            for item in dataclasses.fields(cls)[1:]})


@dataclass
class ModelSummary(JsonRecord):
    """The specialized model; FLOPs per exit are for the full path to it, gates open."""

    name: str | None = None  # backbone name
    num_exits: int | None = None
    exit_flops: list[int] = json_field(default_factory=list)
    # the same with the served heads (anchored heads add a linear layer)
    exit_flops_specialized: list[int] = json_field(default_factory=list)
    gating: bool | None = None  # whether the backbone has gates
    gate_mode: str | None = None  # parallel | sequential
    checkpoint: str | None = None
    flops_unit: str = FLOPS_CONVENTION  # what the FLOPs figures count
    # accuracy (%) of each exit, when known (runs do not record it; the report shows n/a)
    exit_accuracy: list[float] | None = json_field(omit_if_none=True)
    # ``dataset/split`` names that taught the model, and whether the stream's split shares an
    # image with them (None: not known for this data set)
    trained_on: list[str] | None = json_field(omit_if_none=True)
    stream_shares_training_images: bool | None = json_field(omit_if_none=True)


@dataclass
class CurvePoint(JsonRecord):
    """One point of a cost/accuracy curve."""

    # the shared threshold (a list for per-exit schedules; None where not finite, e.g. on
    # the oracle curve)
    threshold: float | list[float | None] | None = None
    accuracy: float | None = None  # percent
    flops: float | None = None  # mean per sample


Curve = list[CurvePoint]


def _curve(points: list[Mapping[str, Any]]) -> Curve:
    return [CurvePoint.from_json_dict(point) for point in points]


@dataclass
class OperatingPoint(JsonRecord):
    """Accuracy (%) and mean FLOPs per sample at the run's thresholds."""

    accuracy: float | None = None
    flops: float | None = None


@dataclass
class IsoAccuracy(JsonRecord):
    """Compute at equal accuracy on eval_in (``specialize.evaluation.curves.iso_accuracy``)."""

    target_accuracy: float | None = None  # the before curve's peak minus evaluation.iso_drop
    flops_before: float | None = None  # mean FLOPs at the target before specializing
    flops_after: float | None = None  # ... and after
    flops_ratio: float | None = None  # after / before (below 1 is a saving)
    flops_oracle: float | None = None  # the oracle exit choice's mean FLOPs at the target
    gap_closed: float | None = None  # (before - after) / (before - oracle)


@dataclass
class ClassRow(JsonRecord):
    """One class: held-out figures at the run's thresholds, and stream windows' FLOPs."""

    class_id: int | None = json_field(key="class")
    name: str | None = None
    in_stream: bool = False  # whether the stream holds the class
    flops_before: float | None = None  # mean FLOPs on its held-out samples, before
    flops_after: float | None = None  # ... after specializing
    accuracy_before: float | None = None  # accuracy (%) on its held-out samples, before
    accuracy_after: float | None = None  # ... after specializing
    # mean FLOPs of the samples predicted as the class in the specializing stream's first
    # and last tracker windows
    stream_flops_first_window: float | None = None
    stream_flops_last_window: float | None = None


@dataclass
class StreamRecord(JsonRecord):
    """One replay of the stream."""

    accuracy: float | None = None  # online accuracy (%)
    mean_flops: float | None = None  # per sample
    exit_histogram: list[int] | None = None  # samples answered at each exit
    samples_per_second: float | None = None  # throughput (wall clock)
    skipped: int | None = None  # inputs skipped as invalid
    updates: int | None = json_field(omit_if_none=True)  # head updates (specializing only)


@dataclass
class StreamSection(JsonRecord):
    """The stream replayed while specializing and, unless disabled, frozen."""

    specializing: StreamRecord | None = json_field(read=record(StreamRecord))
    frozen: StreamRecord | None = json_field(read=record(StreamRecord), omit_if_none=True)


@dataclass
class DriftWindow(JsonRecord):
    """One closed window of the per-class cost tracker (``ClassCostTracker.history()``)."""

    start: int | None = None  # first stream position of the window
    end: int | None = None  # stream position after it
    mean_flops: dict[int, float] = json_field(read=class_keyed, default_factory=dict)  # by pred
    counts: dict[int, int] = json_field(read=class_keyed, default_factory=dict)  # by pred
    exit_histogram: list[int] | None = None  # samples per exit
    mean_flops_all: float | None = None  # over all samples of the window
    # by true class, in windows with labelled samples only
    mean_flops_true: dict[int, float] | None = json_field(read=class_keyed, omit_if_none=True)
    counts_true: dict[int, int] | None = json_field(read=class_keyed, omit_if_none=True)


@dataclass
class DriftSummary(JsonRecord):
    """Per-class compute over the specializing stream, and the drift alarms."""

    window: int | None = None  # samples per tracker window
    history: list[DriftWindow] = json_field(read=records(DriftWindow), default_factory=list)
    alarms: list[int] = json_field(default_factory=list)  # stream positions where it fired
    # alarms fired in all; only when more fired than ``alarms`` keeps (drift.max_alarms)
    alarm_count: int | None = json_field(omit_if_none=True)


@dataclass
class UpdaterStats(JsonRecord):
    """The head updater's counters (``HeadUpdater.stats()`` documents each)."""

    mode: str | None = None  # sync | async
    enabled: bool | None = None
    observed: int | None = None  # valid samples seen
    accepted: int | None = None  # samples that taught
    low_confidence: int | None = None  # not taught: below min_confidence
    nonfinite_samples: int | None = None  # not taught: non-finite logits or confidence
    dropped: int | None = None  # lost to a full queue (async)
    published: int | None = None  # head versions published to the engine
    rollbacks: int | None = None  # degraded audit windows that rolled the heads back
    degraded_windows: int | None = None  # audit windows above baseline + audit_margin
    healthy_windows: int | None = None  # ... and within it
    resets: int | None = None  # returns to the base heads (drift alarm)
    samples_trained: int | None = None  # samples in the training batches
    updates: int | None = None  # training rounds
    steps: int | None = None  # optimizer steps
    skipped_losses: int | None = None  # non-finite losses or gradients
    nonfinite_params: int | None = None  # steps undone for non-finite weights
    buffer_fill: list[int] | None = None  # per early exit
    buffer_capacity: list[int] | None = None  # per early exit
    buffer_bytes: int | None = None  # memory of all buffers
    audited: int | None = None  # early answers compared with the final exit's
    baseline_disagreement: float | None = None  # early vs final exit, audit baseline
    last_window_disagreement: float | None = None  # ... in the last window
    bad_heads_injected: int | None = None  # 1: updater.inject_bad_head_at served bad heads
    # the last rollbacks: observed (samples then), audited (early answers audited when the
    # window closed), to (last_good | base), window_disagreement, baseline_disagreement
    rollback_events: list[dict[str, Any]] | None = None
    error: str | None = None  # the updater's error, if it failed


@dataclass
class BudgetReplay(JsonRecord):
    """One replay under the budget controller and audits (:mod:`specialize.operating_point`)."""

    mean_flops: float | None = None  # per sample on the stream, audits included
    thresholds: list[float | None] = json_field(default_factory=list)  # at the end (None: off)
    retunes: int | None = None  # threshold choices made
    history: list[dict[str, Any]] = json_field(default_factory=list)  # the last choices
    estimated_drop: float | None = None  # the last choice's estimate (validation, points)
    estimated_bound: float | None = None  # ... plus z standard errors
    audits: int | None = None  # samples audited
    audit_flops_share: float | None = None  # audit FLOPs / all FLOPs of the stream
    disagreement: float | None = None  # audited answers != final exit's (%)
    belief_drop: float | None = None  # mean q(final answer) - q(answer), points
    belief_drop_se: float | None = None  # its standard error
    exit_agreement: list[float] | None = None  # per exit: agrees with the final exit (%)
    audit_rollbacks: int | None = None  # audits that rolled the heads back
    # evaluation side, with labels: final exit's accuracy minus served accuracy (points)
    true_drop_stream: float | None = None
    true_drop_eval_in: float | None = None  # the same on eval_in at the final thresholds


@dataclass
class BudgetSection(JsonRecord):
    """The label-free operating point: budget, audits, and the truth beside the estimates."""

    budget: float | None = None  # allowed drop against the final exit (points); None: fixed
    confidence: float | None = None  # one-sided confidence of the bound
    z: float | None = None  # standard errors of the bound
    retune_every: int | None = None
    audit_rate: float | None = None
    temperature: float | None = None  # final exit's, fitted on validation data (1: none)
    validation_samples: int | None = None  # the controller's labelled validation set
    final_exit_stream_accuracy: float | None = None  # evaluation side (%)
    specializing: BudgetReplay | None = json_field(read=record(BudgetReplay))
    frozen: BudgetReplay | None = json_field(read=record(BudgetReplay), omit_if_none=True)
    flops_ratio: float | None = None  # specializing / frozen stream FLOPs
    # labels, offline, frozen heads: the cheapest shared threshold whose true stream drop is
    # within the budget (and within the frozen controller's true drop)
    hindsight: dict[str, Any] | None = json_field(omit_if_none=True)


@dataclass
class Versions(JsonRecord):
    """Library versions of the run."""

    specialize: str | None = None
    torch: str | None = None
    timm: str | None = None
    python: str | None = None


# ----------------------------------------------------------------------------- the summary
@dataclass
class RunSummary(JsonRecord):
    """Everything a run measured: the content of ``summary.json``, in its key order.

    Attributes:
        scenario: The scenario and its stream.
        model: The model, its exits' FLOPs and checkpoint.
        class_names: Names of the data set's classes.
        thresholds: Per-exit thresholds (the last is ``None``: the final exit answers).
        measure: The confidence measure.
        curves: Pareto fronts of the shared-threshold sweep, before/after x eval_in/eval_out.
        operating_points: Accuracy and FLOPs at the run's thresholds, the same way.
        oracle: The oracle curve with the base heads, per held-out set.
        iso_accuracy: Compute at equal accuracy on eval_in (``None``: not computed; written
            as ``{}``).
        eval_out_accuracy_change: Accuracy change (points) on eval_out at the thresholds.
        eval_in_peak_accuracy: Peak accuracy of the before and after curves on eval_in.
        per_class: One row per class.
        stream: The stream replays.
        drift: The tracker's windows and the drift alarms.
        updater: The head updater's counters.
        timings: Seconds per step of the run.
        versions: Library versions.
        budget: The budget controller and audits (``None``: neither was on).
    """

    scenario: ScenarioSummary | None = json_field(read=record(ScenarioSummary))
    model: ModelSummary | None = json_field(read=record(ModelSummary))
    class_names: list[str] = json_field(default_factory=list)
    thresholds: list[float | None] = json_field(default_factory=list)
    measure: str | None = None
    curves: BeforeAfter[EvalSplits[Curve]] | None = json_field(
        read=before_after(eval_splits(_curve)))
    operating_points: BeforeAfter[EvalSplits[OperatingPoint]] | None = json_field(
        read=before_after(eval_splits(record(OperatingPoint))))
    oracle: EvalSplits[Curve] | None = json_field(read=eval_splits(_curve))
    iso_accuracy: IsoAccuracy | None = json_field(read=record(IsoAccuracy))
    eval_out_accuracy_change: float | None = None
    eval_in_peak_accuracy: BeforeAfter[float] | None = json_field(read=before_after(as_is))
    per_class: list[ClassRow] = json_field(read=records(ClassRow), default_factory=list)
    stream: StreamSection | None = json_field(read=record(StreamSection))
    drift: DriftSummary | None = json_field(read=record(DriftSummary))
    updater: UpdaterStats | None = json_field(read=record(UpdaterStats))
    timings: dict[str, float] = json_field(default_factory=dict)
    versions: Versions | None = json_field(read=record(Versions))
    # only with policy.budget or engine.audit_rate > 0
    budget: BudgetSection | None = json_field(read=record(BudgetSection), omit_if_none=True)

    def to_json_dict(self) -> dict[str, Any]:
        """The ``summary.json`` object (``iso_accuracy`` not computed is ``{}``)."""
        out = super().to_json_dict()
        if self.iso_accuracy is None:
            out["iso_accuracy"] = {}
        return out


def as_run_summary(summary: RunSummary | Mapping[str, Any]) -> RunSummary:
    """A :class:`RunSummary` as is, or one read from a mapping (e.g. a loaded summary.json).

    Raises:
        TypeError: ``summary`` is neither.
    """
    if isinstance(summary, RunSummary):
        return summary
    if isinstance(summary, Mapping):
        return RunSummary.from_json_dict(to_jsonable(summary))
    raise TypeError(f"summary must be a RunSummary or a mapping, got {type(summary).__name__}")
