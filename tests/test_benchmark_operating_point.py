"""benchmarks/operating_point.py: side-by-side figures and goal marks from summaries.

Only the pure parts; no experiment runs here.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "operating_point.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_operating_point", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def entry(mflops: float, drop: float, share: float = 0.03) -> dict:
    return {"mean_flops": mflops * 1e6, "audit_flops_share": share, "true_drop_stream": drop,
            "true_drop_eval_in": drop, "estimated_drop": 0.2, "estimated_bound": 0.5,
            "disagreement": 3.0, "belief_drop": 1.0, "belief_drop_se": 0.5}


def results(frozen: float, special: float, drop: float) -> list[dict]:
    budget = {"frozen": entry(frozen, drop), "specializing": entry(special, drop),
              "hindsight": {"budget": {"mean_flops": 19e6},
                            "same_drop": {"mean_flops": 20e6}}}
    return [
        {"scenario": "tops", "seed": 0, "variant": "fixed", "budget": None,
         "stream": {"specializing": {"mean_flops": 30e6}}},
        {"scenario": "tops", "seed": 0, "variant": "budget0.5", "budget": budget,
         "stream": {}},
        {"scenario": "tops", "seed": 0, "variant": "budget1.0", "stream": {},
         "budget": {"specializing": entry(special - 1, 0.8)}},
    ]


def test_figures_give_the_ratios_of_the_goals(bench):
    per_seed = {k: bench.figures(r) for k, r in bench.collect(results(22.0, 19.8, 0.4)).items()}
    row = per_seed[("tops", 0)]
    assert row["fixed_mflops"] == 30.0
    assert row["frozen_vs_fixed"] == pytest.approx(22 / 30)
    assert row["special_vs_frozen"] == pytest.approx(0.9)
    assert row["controller_vs_hindsight"] == pytest.approx(22 / 20)
    assert row["specializing_1.0"]["true_drop_stream"] == 0.8
    marks = dict(bench.goals(per_seed))
    assert all(marks.values())


def test_the_table_prints_every_run(bench, capsys):
    per_seed = {k: bench.figures(r) for k, r in bench.collect(results(22.0, 19.8, 0.4)).items()}
    bench.print_table(per_seed)
    text = capsys.readouterr().out
    for label in ("fixed 0.9 frozen", "frozen @0.5", "specializing @0.5", "specializing @1.0",
                  "hindsight @0.5"):
        assert label in text


def test_a_drop_beyond_budget_plus_slack_fails(bench):
    per_seed = {k: bench.figures(r) for k, r in bench.collect(results(22.0, 19.8, 0.76)).items()}
    marks = bench.goals(per_seed)
    assert [passed for text, passed in marks if text.startswith("true drop")] == [False]


def tiny_results(scenario: str, frozen: float, special: float, drop: float) -> list[dict]:
    budget = {"frozen": entry(frozen, drop), "specializing": entry(special, drop),
              "hindsight": {"budget": {"mean_flops": 229e6}, "same_drop": {"mean_flops": 230e6},
                            "specialized": {"mean_flops": special * 1e6 / 1.1}}}
    return [
        {"scenario": scenario, "seed": 0, "variant": "fixed", "budget": None,
         "stream": {"specializing": {"mean_flops": 242e6}}},
        {"scenario": scenario, "seed": 0, "variant": "budget0.5", "budget": budget,
         "stream": {}},
    ]


def test_tiny_imagenet_goals_cover_subsets_mixed_streams_and_the_specialized_hindsight(bench):
    rows = tiny_results("dogs", 240.0, 188.0, 0.3) + tiny_results("zipf", 230.0, 225.0, 0.3)
    per_seed = {k: bench.figures(r) for k, r in bench.collect(rows).items()}
    marks = dict(bench.goals(per_seed, "tiny_imagenet"))
    assert marks["specializing / frozen @0.5 on dogs: 0.783 <= 0.8"]
    assert marks["specializing @0.5 / fixed 0.9 frozen on dogs: 0.777 <= 0.85"]
    assert marks["specializing / frozen @0.5 on zipf: 0.978 <= 1.0"]
    assert marks["specializing controller / specialized hindsight: mean 1.100 <= 1.15"]
    worse = tiny_results("dogs", 240.0, 200.0, 0.3)
    per_seed = {k: bench.figures(r) for k, r in bench.collect(worse).items()}
    assert not dict(bench.goals(per_seed, "tiny_imagenet"))[
        "specializing / frozen @0.5 on dogs: 0.833 <= 0.8"]


def test_saved_records_of_two_commands_merge_by_scenario_and_seed(bench, tmp_path):
    import json

    per_seed = {k: bench.figures(r) for k, r in bench.collect(results(22.0, 19.8, 0.4)).items()}
    first = [{"scenario": s, "seed": seed, **row} for (s, seed), row in per_seed.items()]
    extra = {k: bench.figures(r) for k, r in bench.collect(
        [{"scenario": "tops", "seed": 0, "variant": "budget0.25", "stream": {},
          "budget": {"specializing": entry(21.0, 0.1)}}]).items()}
    second = [{"scenario": s, "seed": seed, **row} for (s, seed), row in extra.items()]
    (tmp_path / "a.json").write_text(json.dumps(first))
    (tmp_path / "b.json").write_text(json.dumps(second))
    merged = bench.load_records([tmp_path / "a.json", tmp_path / "b.json"])
    row = merged[("tops", 0)]
    assert row["fixed_mflops"] == 30.0 and row["special_vs_frozen"] == pytest.approx(0.9)
    assert row["specializing_0.25"]["mflops"] == 21.0


def test_held_out_figures_of_the_budget_run_reach_the_record(bench):
    summary = {"iso_accuracy": {"flops_ratio": 0.8}, "eval_out_accuracy_change": -0.25,
               "operating_points": {"before": {"out": {"flops": 17e6}},
                                    "after": {"out": {"flops": 22e6}}}}
    runs = results(22.0, 19.8, 0.4)
    runs[1]["held_out"] = bench.held_out_figures(summary)
    row = bench.figures(bench.collect(runs)[("tops", 0)])
    assert (row["iso_flops_ratio"], row["eval_out_accuracy_change"]) == (0.8, -0.25)
    assert (row["eval_out_mflops_before"], row["eval_out_mflops_after"]) == (17.0, 22.0)
    assert bench.held_out_figures({})["iso_flops_ratio"] is None  # a run without curves


def test_the_shared_threshold_variant_sits_beside_the_per_exit_one(bench):
    runs = results(22.0, 19.8, 0.4)
    shared = {"frozen": entry(20.0, 0.3), "specializing": entry(19.0, 0.6)}
    runs.append({"scenario": "tops", "seed": 0, "variant": "budget0.5-shared",
                 "budget": shared, "stream": {}})
    per_seed = {k: bench.figures(r) for k, r in bench.collect(runs).items()}
    row = per_seed[("tops", 0)]
    assert row["shared_special_vs_frozen"] == pytest.approx(19 / 20)
    assert row["per_exit_vs_shared_frozen"] == pytest.approx(22 / 20)
    assert "frozen @0.5-shared" in bench.format_table(per_seed)
    drops = [text for text, _ in bench.goals(per_seed) if text.startswith("true drop")]
    assert "(10/10)" in drops[0]  # the shared runs' drops count against the same budget
