"""benchmarks/specialization.py: preset parsing, aggregation, goal marks, the report's shape.

Only the pure parts; no experiment runs here.
"""

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "specialization.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_specialization", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


# -- presets -------------------------------------------------------------------------------

def test_strategy_parsing_splits_at_top_level_commas(bench):
    name, overrides = bench.parse_strategy(
        "mix=updater.target=soft, policy.thresholds=[0.8,0.9,0.95],updater.lr=0.02")
    assert name == "mix"
    assert overrides == ["updater.target=soft", "policy.thresholds=[0.8,0.9,0.95]",
                         "updater.lr=0.02"]
    assert bench.parse_strategy("baseline=") == ("baseline", [])


@pytest.mark.parametrize("text, message", [
    ("no-equals", "expected NAME=key=value"),
    ("=updater.lr=0.1", "expected NAME=key=value"),
    ("bad/name=updater.lr=0.1", "expected NAME=key=value"),
    ("lr=updater.lr", "not of the form key=value"),
    ("lr=updater.lr=0.1,,updater.target=hard", "not of the form key=value"),
])
def test_bad_strategy_gives_a_clear_error(bench, text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        bench.parse_strategy(text)


def test_strategy_selection(bench):
    adhoc = [("hard", ["updater.target=hard"])]
    assert bench.select_strategies(None, []) == bench.STRATEGIES
    assert bench.select_strategies(None, adhoc) == {"hard": ["updater.target=hard"]}
    chosen = bench.select_strategies(["plain", "hard"], adhoc)
    assert list(chosen) == ["plain", "hard"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown strategy 'nope'"):
        bench.select_strategies(["nope"], adhoc)
    with pytest.raises(argparse.ArgumentTypeError, match="given twice"):
        bench.select_strategies(None, adhoc * 2)


def test_command_line_errors_exit_with_usage(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--strategy", "oops"])
    assert "expected NAME=key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--strategies", "missing"])
    assert "unknown strategy 'missing'" in capsys.readouterr().err


def test_jobs_and_switch_selection(bench):
    args = bench.parse_args(["--strategy", "a=updater.lr=0.1", "--scenarios", "tops,switch",
                             "--seeds", "0,1", "--set", "length=300"])
    jobs = bench.build_jobs(args)
    assert [(j.kind, j.scenario, j.seed) for j in jobs] == [
        ("main", "tops", 0), ("main", "tops", 1), ("switch", "switch", 0), ("switch", "switch", 1)]
    assert jobs[0].overrides == ("updater.lr=0.1", "length=300")
    assert jobs[1].out.endswith("a/tops-seed1")
    assert bench.parse_args(["--scenarios", "tops,switch", "--no-switch"]).scenarios == ["tops"]
    assert bench.parse_args(["--scenarios", "tops", "--switch"]).scenarios == ["tops", "switch"]
    assert bench.is_scenario_override("length=300")
    assert bench.is_scenario_override("scenario.length=300")
    assert not bench.is_scenario_override("updater.lr=0.1")
    assert not bench.is_scenario_override("out=x")


# -- aggregation and goals -----------------------------------------------------------------

def test_aggregate_leaves_out_undefined_values(bench):
    stats = bench.aggregate([0.5, None, float("nan"), 0.7])
    assert stats["n"] == 2 and stats["total"] == 4
    assert stats["mean"] == pytest.approx(0.6)
    assert stats["std"] == pytest.approx(math.sqrt(0.02))
    assert bench.aggregate([None, None]) == {"mean": None, "std": None, "n": 0, "total": 2}
    assert bench.aggregate([1.0])["std"] is None


def test_cells_and_goal_marks(bench):
    assert bench.meets_goal("gap_closed", 0.8) is True
    assert bench.meets_goal("gap_closed", 0.79) is False
    assert bench.meets_goal("out_change", -0.4) is True
    assert bench.meets_goal("old_change", -1.2) is False
    assert bench.meets_goal("throughput_ratio", 0.5) is None
    assert bench.meets_goal("gap_closed", None) is None
    full = {"mean": 0.85, "std": 0.05, "n": 3, "total": 3}
    assert bench.format_cell(full, ".2f", True) == "0.85 ± 0.05 (3)*"
    partial = {"mean": -0.25, "std": None, "n": 1, "total": 3}
    assert bench.format_cell(partial, "+.2f", False) == "-0.25 (1/3)"
    none = {"mean": None, "std": None, "n": 0, "total": 2}
    assert bench.format_cell(none, ".2f", None) == "n/a (0/2)"


# -- the report ----------------------------------------------------------------------------

def _main_record(strategy, seed, gap, out_change):
    return {"kind": "main", "strategy": strategy, "scenario": "tops", "seed": seed,
            "checkpoint": "model.pt", "gap_closed": gap, "in_peak_change": 0.5,
            "out_change": out_change, "throughput_ratio": 0.4, "gap_mflops": 1.5}


def _switch_record(seed, ratio):
    return {"kind": "switch", "strategy": "plain", "scenario": "switch", "seed": seed,
            "checkpoint": "model.pt", "switch_saving": 0.1, "fresh_saving": 0.1 / ratio,
            "switch_ratio": ratio, "old_change": -0.3, "new_change": 0.2}


def test_report_json_shape_and_table(bench):
    records = [_main_record("plain", 0, 0.9, -0.2), _main_record("plain", 1, None, -0.4),
               _main_record("soft", 0, 0.5, -1.0),
               {"kind": "main", "strategy": "soft", "scenario": "tops", "seed": 1,
                "overrides": [], "error": "RuntimeError: boom"},
               _switch_record(0, 0.9), _switch_record(1, 0.8)]
    args = bench.parse_args(["--strategies", "plain,soft", "--scenarios", "tops,switch",
                             "--seeds", "0,1"])
    report = bench.build_report("python benchmarks/specialization.py", args, records)
    json.dumps(report, allow_nan=False)
    assert set(report) == {"command", "settings", "strategies", "goals", "table", "switch_table",
                           "runs", "switch_runs", "errors"}
    assert [(r["strategy"], r["scenario"]) for r in report["table"]] == [
        ("plain", "tops"), ("soft", "tops")]
    plain = report["table"][0]["metrics"]
    assert set(plain) == {key for key, _, _ in bench.MAIN_COLUMNS}
    assert plain["gap_closed"] == {"mean": 0.9, "std": None, "n": 1, "total": 2, "goal": 0.8,
                                   "meets_goal": True}
    assert plain["out_change"]["meets_goal"] is True
    assert report["table"][1]["errors"] == 1
    assert report["table"][1]["metrics"]["out_change"]["meets_goal"] is False
    switch = report["switch_table"][0]["metrics"]
    # the ratio of the mean savings, not the mean of the per-seed ratios (0.85)
    assert switch["switch_ratio"]["mean"] == pytest.approx(0.1 / ((0.1 / 0.9 + 0.1 / 0.8) / 2))
    assert switch["switch_ratio"]["std"] is None
    assert switch["switch_ratio"]["meets_goal"] and switch["old_change"]["meets_goal"]
    assert report["errors"] == [{"strategy": "soft", "scenario": "tops", "seed": 1,
                                 "error": "RuntimeError: boom"}]
    text = bench.format_report(report)
    assert text.splitlines()[0] == "command: python benchmarks/specialization.py"
    assert "0.90 (1/2)*" in text
    assert "* meets the goal" in text and "error: soft tops seed 1" in text


def test_main_record_reads_the_summary(bench):
    summary = {
        "model": {"checkpoint": "m.pt"}, "scenario": {"fingerprint": "abc"},
        "iso_accuracy": {"target_accuracy": 88.0, "flops_before": 18e6, "flops_after": 17e6,
                         "flops_ratio": 17 / 18, "flops_oracle": 17.6e6,
                         "gap_closed": float("nan")},
        "eval_in_peak_accuracy": {"before": 88.5, "after": 89.0},
        "eval_out_accuracy_change": -0.3,
        "stream": {"specializing": {"samples_per_second": 100.0, "mean_flops": 2e7,
                                    "updates": 9},
                   "frozen": {"samples_per_second": 250.0, "mean_flops": 3e7}},
    }
    record = bench.main_record(summary, "out")
    assert record["gap_closed"] is None
    assert record["gap_mflops"] == pytest.approx(0.4)
    assert record["in_peak_change"] == pytest.approx(0.5)
    assert record["throughput_ratio"] == pytest.approx(0.4)
    assert record["out_change"] == -0.3 and record["updates"] == 9
