"""The run summary as types: what ``specialize run`` measured, and its ``summary.json``.

Owns :mod:`~specialize.summary.schema` (one dataclass per section of ``summary.json``, with
:class:`RunSummary` on top) and :mod:`~specialize.summary.records` (how a record reads and
writes JSON). The run builds a summary; the report only reads one, so the two never meet.

May import: ``backbones`` (the FLOPs convention); nothing else of ``specialize``.
"""

from specialize.summary.records import BeforeAfter, EvalSplits, JsonRecord, Split, to_jsonable
from specialize.summary.schema import (
    BudgetReplay,
    BudgetSection,
    ClassRow,
    Curve,
    CurvePoint,
    DriftSummary,
    DriftWindow,
    IsoAccuracy,
    ModelSummary,
    OperatingPoint,
    RunSummary,
    ScenarioSummary,
    StreamRecord,
    StreamSection,
    UpdaterStats,
    Versions,
    as_run_summary,
)

__all__ = [
    "BeforeAfter",
    "BudgetReplay",
    "BudgetSection",
    "ClassRow",
    "Curve",
    "CurvePoint",
    "DriftSummary",
    "DriftWindow",
    "EvalSplits",
    "IsoAccuracy",
    "JsonRecord",
    "ModelSummary",
    "OperatingPoint",
    "RunSummary",
    "ScenarioSummary",
    "Split",
    "StreamRecord",
    "StreamSection",
    "UpdaterStats",
    "Versions",
    "as_run_summary",
    "to_jsonable",
]
