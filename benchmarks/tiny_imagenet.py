"""The poster's protocol on Tiny-ImageNet: a pretrained Lite0 with exits, specialized on
streams of dogs, insects, vehicles and food, against a supervised ceiling.

For every (strategy, subset, seed) this runs ``specialize run
configs/scenarios/tiny-imagenet/<subset>.yaml seed=K updater.seed=K <strategy>`` in this
process (or ``--jobs N`` worker processes, one torch thread each) through
``benchmarks/specialization.py``'s jobs, and reads the figures from each run's summary. For
every (subset, seed) it measures the supervised ceiling with ``benchmarks/head_ceiling.py
--labels pool``: the early heads trained with the TRUE labels of the images the stream shows
(Adam, 30 epochs, from the original heads), on the same held-out eval_in.

The model is the cached ``configs/backbones/tiny_imagenet_lite0.yaml`` (prepared on first use,
about 10 minutes). Tiny-ImageNet is read from ``$SPECIALIZE_TINY_IMAGENET``.

Columns per (strategy, subset), mean ± std over seeds:

* ``eval_in exit acc``: each exit's accuracy (%) on the subset's held-out images, original heads;
* ``flops_ratio`` / ``gap_closed``: iso-accuracy comparison on eval_in at the before curve's
  peak minus 0.5 pt (after / before mean FLOPs; share of the oracle's saving);
* ``peak``: the eval_in peak accuracy before -> after;
* ``out``: the eval_out accuracy change at the run's thresholds (pt);
* ``stream MFLOPs``: the stream's own mean cost while specializing / frozen, at the run's
  thresholds;
* ``ceiling``: the supervised ceiling's flops_ratio, and ``of ceiling``: (1 - flops_ratio) /
  (1 - ceiling's flops_ratio) of the means, the share of the ceiling's saving reached.

Goals (issue 12, each subset): of ceiling >= 0.7, peak after >= before, out >= -0.5 pt.

Usage:
    python benchmarks/tiny_imagenet.py [--subsets dogs,insects,vehicles,food] [--seeds 0,1,2]
        [--strategies anchored,anchored-prior] [--jobs 1] [--no-ceiling] [--set key=value]
        [--out DIR] [--reuse] [--json] [--save FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

SUBSETS = ("dogs", "insects", "vehicles", "food")
SCENARIO_DIR = Path(__file__).resolve().parents[1] / "configs" / "scenarios" / "tiny-imagenet"
POSTER_EXIT_ACCURACY = (61.8, 72.9, 78.7, 82.1)  # RevCol on ImageNet (the poster)
GOALS = {"of_ceiling": 0.7, "in_peak_change": 0.0, "out_change": -0.5}
COLUMNS = (  # (record key, header, format)
    ("flops_ratio", "flops_ratio", ".3f"),
    ("gap_closed", "gap_closed", ".2f"),
    ("in_peak_change", "peak change (pt)", "+.2f"),
    ("out_change", "out (pt)", "+.2f"),
    ("stream_mflops_specializing", "stream MFLOPs spec", ".1f"),
    ("stream_mflops_frozen", "frozen", ".1f"),
)


def _load(name: str) -> ModuleType:
    """A sibling benchmark script as a module (benchmarks is no package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    spec = _load("specialization")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subsets", type=spec._csv, default=list(SUBSETS))
    parser.add_argument("--seeds", type=spec._seeds, default=[0, 1, 2])
    parser.add_argument("--strategies", type=spec._csv, default=["anchored", "anchored-prior"],
                        help="presets of benchmarks/specialization.py "
                             f"({', '.join(spec.STRATEGIES)})")
    parser.add_argument("--set", dest="sets", action="append", default=[], type=spec._set,
                        help="an extra override for every run, e.g. length=600")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the runs")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the supervised ceiling")
    parser.add_argument("--out", default="runs/bench-tiny-imagenet", help="run folders")
    parser.add_argument("--reuse", action="store_true",
                        help="read run folders that finished the same config instead of rerunning")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", default=None, help="also write the JSON object to this file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def build_jobs(args: argparse.Namespace) -> list[Any]:
    """One ``specialization.Job`` per (strategy, subset, seed)."""
    spec = _load("specialization")
    jobs = []
    for strategy in args.strategies:
        if strategy not in spec.STRATEGIES:
            raise SystemExit(f"tiny_imagenet.py: unknown strategy {strategy!r}; known: "
                             f"{', '.join(spec.STRATEGIES)}")
        for subset in args.subsets:
            for seed in args.seeds:
                out = Path(args.out) / strategy / f"{subset}-seed{seed}"
                jobs.append(spec.Job("main", strategy, str(SCENARIO_DIR / f"{subset}.yaml"), seed,
                                     (*spec.STRATEGIES[strategy], *args.sets), str(out),
                                     reuse=args.reuse))
    return jobs


def ceilings(args: argparse.Namespace, progress: bool) -> list[dict[str, Any]]:
    """The supervised ceiling of every (subset, seed): head_ceiling's records."""
    ceiling = _load("head_ceiling")
    settings = argparse.Namespace(labels="pool", epochs=30, lr=1e-3, batch_size=128,
                                  checkpoint=None)
    records, models = [], {}
    for subset in args.subsets:
        for seed in args.seeds:
            records += ceiling.run_scenario(str(SCENARIO_DIR / f"{subset}.yaml"), seed, [0],
                                            settings, progress, models)
    return records


def table_rows(runs: Sequence[dict[str, Any]],
               ceiling: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, subset): the aggregated figures and the ceiling's share."""
    spec = _load("specialization")
    rows = spec.table_rows(runs, COLUMNS)
    by_subset: dict[str, list[dict[str, Any]]] = {}
    for record in ceiling:
        by_subset.setdefault(record["scenario"], []).append(record)
    for row in rows:
        group = by_subset.get(row["scenario"], [])
        bound = spec.aggregate([r["flops_ratio"] for r in group])
        accuracy = [spec.aggregate([r["acc_before"][k] for r in group])["mean"]
                    for k in range(len(group[0]["acc_before"]))] if group else []
        mean = row["metrics"]["flops_ratio"]["mean"]
        share = None
        if mean is not None and bound["mean"] is not None and bound["mean"] < 1:
            share = (1 - mean) / (1 - bound["mean"])
        row["ceiling"] = bound
        row["eval_in_exit_accuracy"] = accuracy
        row["of_ceiling"] = share
        row["goals"] = {"of_ceiling": share is not None and share >= GOALS["of_ceiling"],
                        **{key: row["metrics"][key]["meets_goal"]
                           for key in ("in_peak_change", "out_change")}}
    return rows


def model_facts(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Validation accuracy and FLOPs of every exit, from the checkpoint the runs used."""
    from backbones.checkpoint import read_checkpoint

    paths = sorted({r["checkpoint"] for r in runs if "checkpoint" in r})
    if not paths:
        return {}
    metrics = read_checkpoint(paths[0])["metrics"]
    return {"checkpoint": paths[0],
            "exit_accuracy": [100 * a for a in metrics["exit_accuracy"]],
            "exit_mflops": [f / 1e6 for f in metrics["exit_flops"]],
            "final_head": metrics.get("final_head"),
            "final_head_accuracy": metrics.get("final_head_accuracy")}


def format_report(report: dict[str, Any]) -> str:
    """The printed tables: the model beside the poster's, then one row per strategy/subset."""
    spec = _load("specialization")
    facts = report["model"]
    lines = [f"command: {report['command']}"]
    if facts:
        lines += [f"model: {facts['checkpoint']} (final head: {facts['final_head']})",
                  "exit validation accuracy %: " + " / ".join(
                      f"{a:.1f}" for a in facts["exit_accuracy"]) + "  (poster, RevCol on "
                  "ImageNet: " + " / ".join(map(str, POSTER_EXIT_ACCURACY)) + ")",
                  "exit MFLOPs: " + " / ".join(f"{f:.1f}" for f in facts["exit_mflops"])]
    header = ["strategy", "subset", "eval_in exit acc %", *(t for _, t, _ in COLUMNS),
              "ceiling", "of ceiling"]
    body = []
    for row in report["table"]:
        cells = [spec.format_cell(row["metrics"][k], f, row["metrics"][k]["meets_goal"])
                 for k, _, f in COLUMNS]
        share = "n/a" if row["of_ceiling"] is None else f"{row['of_ceiling']:.2f}"
        body.append([row["strategy"], row["scenario"],
                     " / ".join(f"{a:.1f}" for a in row["eval_in_exit_accuracy"]), *cells,
                     spec.format_cell(row["ceiling"], ".3f", None),
                     share + ("*" if row["goals"]["of_ceiling"] else "")])
    lines += ["", *spec.aligned([header, *body])]
    lines += ["", "mean ± std over seeds (n seeds); * meets the goal: of ceiling >= 0.7, peak "
                  "change >= 0, out >= -0.5 pt; FLOPs: a multiply-add counts 2"]
    lines += spec.error_lines(report["errors"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    spec = _load("specialization")
    torch.set_num_threads(1)
    jobs = build_jobs(args)
    spec.validate_jobs(jobs)
    runs = spec.run_all(jobs, args.jobs, not args.no_progress)
    ceiling = [] if args.no_ceiling else ceilings(args, not args.no_progress)
    report = {
        "command": shlex.join(["python", "benchmarks/tiny_imagenet.py", *argv]),
        "model": model_facts(runs),
        "strategies": {name: spec.STRATEGIES[name] for name in args.strategies},
        "goals": GOALS,
        "table": table_rows([r for r in runs if "error" not in r], ceiling),
        "runs": runs,
        "ceiling_runs": ceiling,
        "errors": [{k: r[k] for k in ("strategy", "scenario", "seed", "error")}
                   for r in runs if "error" in r],
    }
    from specialize.report import to_jsonable

    text = json.dumps(to_jsonable(report), indent=2)
    if args.save:
        Path(args.save).write_text(text + "\n")
    print(text if args.json else format_report(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
