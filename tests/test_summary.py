"""Tests of specialize.summary: the typed run summary and its summary.json form.

A real run's summary round-trips in tests/test_run.py; these use hand-made summaries.
"""

from __future__ import annotations

import json
import math

import pytest

from backbones.cost import FLOPS_CONVENTION
from specialize.summary import (
    BeforeAfter,
    ClassRow,
    CurvePoint,
    DriftSummary,
    DriftWindow,
    EvalSplits,
    ModelSummary,
    OperatingPoint,
    RunSummary,
    ScenarioSummary,
    StreamRecord,
    StreamSection,
    as_run_summary,
    to_jsonable,
)
from tests.test_report import example_summary

RUN_KEYS = [
    "scenario", "model", "class_names", "thresholds", "measure", "curves", "operating_points",
    "oracle", "iso_accuracy", "eval_out_accuracy_change", "eval_in_peak_accuracy", "per_class",
    "stream", "drift", "updater", "timings", "versions",
]


def small_summary() -> RunSummary:
    """A summary as a run with every class in the stream and no frozen replay builds it."""
    curve = [CurvePoint(0.5, 80.0, 1e6), CurvePoint(None, 90.0, 2e6)]
    return RunSummary(
        scenario=ScenarioSummary({"scenario": "iid", "name": "cfg", "length": 9, "seed": 1},
                                 name="all", classes=[0, 1], length=4, fingerprint="ab",
                                 phase_boundaries=[0]),
        model=ModelSummary(name="tiny", num_exits=2, exit_flops=[1_000_000, 2_000_000]),
        class_names=["a", "b"],
        thresholds=[0.9, None],
        measure="max_softmax",
        curves=BeforeAfter(EvalSplits(curve, None), EvalSplits(curve, None)),
        operating_points=BeforeAfter(EvalSplits(OperatingPoint(85.0, 1.5e6)),
                                     EvalSplits(OperatingPoint(86.0, 1.4e6))),
        oracle=EvalSplits(curve, None),
        per_class=[ClassRow(0, "a", True, 1e6, 1e6, 90.0, 91.0, math.nan, None)],
        stream=StreamSection(StreamRecord(90.0, 1.2e6, [3, 1], 100.0, 0, updates=2)),
        drift=DriftSummary(2, [DriftWindow(0, 2, {1: 1.5e6}, {1: 2}, [1, 1], 1.5e6)], []),
        timings={"load": 0.5},
    )


def test_json_keys_follow_the_documented_order_and_names():
    data = small_summary().to_json_dict()
    assert list(data) == RUN_KEYS
    assert list(data["scenario"]) == ["scenario", "name", "length", "seed", "classes",
                                      "fingerprint", "phase_boundaries"]
    assert data["scenario"]["name"] == "all" and data["scenario"]["length"] == 4
    assert data["model"]["flops_unit"] == FLOPS_CONVENTION and "exit_accuracy" not in data["model"]
    assert data["curves"]["before"] == {"in": [{"threshold": 0.5, "accuracy": 80.0,
                                                "flops": 1e6},
                                               {"threshold": None, "accuracy": 90.0,
                                                "flops": 2e6}],
                                        "out": None}
    assert data["iso_accuracy"] == {}, "not computed is written as {}"
    assert list(data["per_class"][0])[0] == "class"
    assert list(data["stream"]) == ["specializing"], "no frozen replay: no key"
    assert data["stream"]["specializing"]["updates"] == 2
    assert data["drift"]["history"][0]["mean_flops"] == {1: 1.5e6}
    assert "mean_flops_true" not in data["drift"]["history"][0]
    assert data["updater"] is None and data["versions"] is None


def test_json_round_trip_is_exact():
    text = json.dumps(to_jsonable(small_summary()), indent=2)
    loaded = json.loads(text)
    assert loaded["per_class"][0]["stream_flops_first_window"] is None, "NaN -> null"
    again = RunSummary.from_json_dict(loaded)
    assert again.drift.history[0].mean_flops == {1: 1.5e6}, "class keys back to int"
    assert json.dumps(to_jsonable(again), indent=2) == text


def test_reading_is_lenient():
    empty = RunSummary.from_json_dict({})
    assert empty.scenario is None and empty.iso_accuracy is None and empty.per_class == []
    assert empty.timings == {} and empty.thresholds == []
    summary = RunSummary.from_json_dict({
        "model": {"exit_flops": None, "unknown": 1},
        "iso_accuracy": {},
        "operating_points": {"before": {"in": {}, "out": None}},
        "stream": {"specializing": {"accuracy": 50.0}},
    })
    assert summary.model.exit_flops == [] and summary.iso_accuracy is None
    assert summary.operating_points.before == EvalSplits(None, None)
    assert summary.operating_points.after is None
    assert summary.stream.frozen is None and summary.stream.specializing.updates is None


def test_the_report_fixture_reads_back_to_the_same_types():
    loaded = json.loads(json.dumps(to_jsonable(example_summary())))
    typed = RunSummary.from_json_dict(loaded)
    assert typed.model.exit_accuracy == [78.1, 86.4, 90.2, 92.3]
    assert typed.scenario.to_json_dict() == loaded["scenario"]
    assert typed.per_class[5].class_id == 5 and typed.per_class[5].in_stream
    assert typed.curves.after.at("eval_out")[0].accuracy == loaded["curves"]["after"]["out"][0][
        "accuracy"]
    assert RunSummary.from_json_dict(to_jsonable(typed)) == typed


def test_as_run_summary():
    summary = small_summary()
    assert as_run_summary(summary) is summary
    assert as_run_summary({"measure": "margin"}).measure == "margin"
    with pytest.raises(TypeError, match="RunSummary or a mapping"):
        as_run_summary([1, 2])
