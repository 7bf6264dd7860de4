"""The label-free operating point side by side: fixed thresholds, budgets, hindsight.

For every scenario and seed (sync updater, deterministic) this runs ``specialize run`` on the
same stream four times and reads each ``summary.json``:

1. ``fixed``: thresholds 0.9, frozen (``updater.enabled=false``, one replay);
2. and 3. ``budget 0.5``: ``policy.budget=0.5``, frozen and specializing replays (both under
   the controller, with audits at the default 3 %);
4. hindsight: with labels, offline, the cheapest shared threshold whose TRUE stream drop is
   within the budget for the frozen model (``budget.hindsight`` of run 2/3's summary), and the
   same at the frozen controller's own true drop (the limit it is compared with);

plus budgets 0.25 and 1.0, specializing only. Stream MFLOPs include the audits.

Goals (printed as pass/fail): the true drop against the final exit is <= budget + 0.25 pt on
every scenario and seed, on the stream and on eval_in; frozen at 0.5 <= 0.8x fixed 0.9 on tops
and tshirt-vs-shirt; specializing / frozen at 0.5 <= 0.9 there; frozen controller <= 1.15x
hindsight at the same true drop; audits <= 5 % of the stream's FLOPs.

``--dataset tiny_imagenet`` runs the Tiny-ImageNet scenarios instead (configs/scenarios/
tiny-imagenet/; only when ``$SPECIALIZE_TINY_IMAGENET`` exists).

Usage:
    python benchmarks/operating_point.py [--scenarios tops,footwear,tshirt-vs-shirt]
        [--seeds 0,1,2] [--jobs 1] [--json] [--save FILE] [--out DIR]
    python benchmarks/operating_point.py --load FILE   # the table of saved records
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
FMNIST_SCENARIOS = ("tops", "footwear", "tshirt-vs-shirt")
TARGETS = ("tops", "tshirt-vs-shirt")  # where the saving goals apply
# name -> overrides of one run
VARIANTS = {
    "fixed": ["policy.thresholds=0.9", "updater.enabled=false", "evaluation.frozen_replay=false"],
    "budget0.5": ["policy.budget=0.5"],
    "budget0.25": ["policy.budget=0.25", "evaluation.frozen_replay=false"],
    "budget1.0": ["policy.budget=1.0", "evaluation.frozen_replay=false"],
}
SLACK = 0.25  # points a true drop may exceed its budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=None, help="comma-separated (default: per data "
                        "set: tops,footwear,tshirt-vs-shirt)")
    parser.add_argument("--dataset", default="fashion_mnist",
                        choices=("fashion_mnist", "tiny_imagenet"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", type=Path, default=Path("runs/operating_point"))
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--save", type=Path, help="write the records as JSON to this file")
    parser.add_argument("--load", type=Path, help="print the table and goals of records "
                        "saved with --save instead of running")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.dataset == "tiny_imagenet":
        if not os.environ.get("SPECIALIZE_TINY_IMAGENET"):
            parser.error("--dataset tiny_imagenet needs $SPECIALIZE_TINY_IMAGENET")
        folder = ROOT / "configs" / "scenarios" / "tiny-imagenet"
        default = ",".join(sorted(p.stem for p in folder.glob("*.yaml")))
    else:
        default = ",".join(FMNIST_SCENARIOS)
    args.scenarios = [s for s in (args.scenarios or default).split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    return args


def scenario_path(scenario: str, dataset: str) -> str:
    if dataset == "tiny_imagenet":
        return str(ROOT / "configs" / "scenarios" / "tiny-imagenet" / f"{scenario}.yaml")
    return scenario


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(job: tuple[str, str, int, str, str]) -> dict[str, Any]:
    """One run; its summary's figures."""
    from specialize.run import load_run_config, run_experiment

    scenario, dataset, seed, variant, out = job
    overrides = [f"seed={seed}", f"updater.seed={seed}", "updater.mode=sync", "progress=false",
                 *VARIANTS[variant], f"out={out}"]
    summary, _ = run_experiment(load_run_config(scenario_path(scenario, dataset), overrides))
    data = summary.to_json_dict()
    return {"scenario": scenario, "seed": seed, "variant": variant,
            "stream": data["stream"], "budget": data.get("budget")}


def collect(results: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (scenario, seed): the figures of every variant, side by side."""
    table: dict[tuple[str, int], dict[str, Any]] = {}
    for result in results:
        row = table.setdefault((result["scenario"], result["seed"]), {})
        variant, budget = result["variant"], result["budget"]
        if variant == "fixed":
            row["fixed_frozen"] = result["stream"]["specializing"]["mean_flops"]
            continue
        level = variant.removeprefix("budget")
        for replay in ("frozen", "specializing"):
            entry = budget.get(replay) if budget else None
            if entry:
                row[f"{replay}_{level}"] = entry
        if level == "0.5" and budget.get("hindsight"):
            row["hindsight"] = budget["hindsight"]
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def figures(row: dict[str, Any]) -> dict[str, Any]:
    """One (scenario, seed): the benchmark's columns."""
    frozen, special = row.get("frozen_0.5"), row.get("specializing_0.5")
    hindsight = row.get("hindsight", {})
    out = {"fixed_mflops": _m(row.get("fixed_frozen"))}
    for key, entry in row.items():
        if key.startswith(("frozen_", "specializing_")):
            out[key] = {"mflops": _m(entry["mean_flops"]),
                        "audit_share": entry.get("audit_flops_share"),
                        "true_drop_stream": entry.get("true_drop_stream"),
                        "true_drop_eval_in": entry.get("true_drop_eval_in"),
                        "estimated_drop": entry.get("estimated_drop"),
                        "bound": entry.get("estimated_bound"),
                        "disagreement": entry.get("disagreement"),
                        "belief": entry.get("belief_drop"),
                        "belief_se": entry.get("belief_drop_se")}
    same = hindsight.get("same_drop") or {}
    out["hindsight_mflops"] = _m((hindsight.get("budget") or {}).get("mean_flops"))
    out["hindsight_same_drop_mflops"] = _m(same.get("mean_flops"))
    out["frozen_vs_fixed"] = _ratio(_m(frozen and frozen["mean_flops"]), out["fixed_mflops"])
    out["special_vs_frozen"] = _ratio(_m(special and special["mean_flops"]),
                                      _m(frozen and frozen["mean_flops"]))
    out["controller_vs_hindsight"] = _ratio(_m(frozen and frozen["mean_flops"]),
                                            out["hindsight_same_drop_mflops"])
    return out


def _m(flops: float | None) -> float | None:
    return None if flops is None else flops / 1e6


def goals(per_seed: dict[tuple[str, int], dict[str, Any]]) -> list[tuple[str, bool]]:
    """Every goal with pass/fail."""
    checks = []
    drops, audits = [], []
    for row in per_seed.values():
        for key, entry in row.items():
            if isinstance(entry, dict) and "true_drop_stream" in entry:
                budget = float(key.rsplit("_", 1)[1])
                for where in ("true_drop_stream", "true_drop_eval_in"):
                    if entry[where] is not None:
                        drops.append(entry[where] <= budget + SLACK)
                if entry["audit_share"] is not None:
                    audits.append(entry["audit_share"] <= 0.05)
    checks.append((f"true drop <= budget + {SLACK} pt, every scenario/seed/budget "
                   f"({sum(drops)}/{len(drops)})", all(drops) and bool(drops)))
    for name, key, limit in (("frozen@0.5 / fixed 0.9 frozen", "frozen_vs_fixed", 0.8),
                             ("specializing / frozen @0.5", "special_vs_frozen", 0.9)):
        for scenario in TARGETS:
            values = [r[key] for (s, _), r in per_seed.items() if s == scenario and r[key]]
            if values:
                mean = statistics.fmean(values)
                checks.append((f"{name} on {scenario}: {mean:.3f} <= {limit}", mean <= limit))
    ratios = [r["controller_vs_hindsight"] for r in per_seed.values()
              if r["controller_vs_hindsight"]]
    if ratios:
        worst = max(ratios)
        checks.append((f"frozen controller / hindsight at the same true drop: worst {worst:.3f}"
                       " <= 1.15", worst <= 1.15))
    checks.append((f"audits <= 5 % of stream FLOPs ({sum(audits)}/{len(audits)})",
                   all(audits) and bool(audits)))
    return checks


def _cell(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def print_table(per_seed: dict[tuple[str, int], dict[str, Any]]) -> None:
    columns = ["scenario", "run", "stream MFLOPs", "audit share %", "true drop stream",
               "true drop eval_in", "est. drop", "bound", "disagreement %", "belief (pt)"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    scenarios = list(dict.fromkeys(s for s, _ in per_seed))
    for scenario in scenarios:
        rows = [r for (s, _), r in per_seed.items() if s == scenario]
        print(f"| {scenario} | fixed 0.9 frozen | {_cell([r['fixed_mflops'] for r in rows])} "
              "| | | | | | | |")
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict)
                       and k.startswith(("frozen_", "specializing_"))})
        for key in keys:
            entries = [r[key] for r in rows if key in r]
            cells = [_cell([e[f] for e in entries]) for f in (
                "mflops", "audit_share", "true_drop_stream", "true_drop_eval_in",
                "estimated_drop", "bound", "disagreement", "belief")]
            cells[1] = _cell([None if e["audit_share"] is None else 100 * e["audit_share"]
                              for e in entries])
            print(f"| | {key.replace('_', ' @')} | " + " | ".join(cells) + " |")
        print(f"| | hindsight @0.5 (labels) | {_cell([r['hindsight_mflops'] for r in rows])} "
              "| | | | | | | |")
        for label, key in (("frozen@0.5 / fixed", "frozen_vs_fixed"),
                           ("specializing / frozen @0.5", "special_vs_frozen"),
                           ("controller / hindsight (same drop)", "controller_vs_hindsight")):
            print(f"| | {label} | {_cell([r[key] for r in rows], 3)} | | | | | | | |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load:
        records = json.loads(args.load.read_text())
        per_seed = {(r.pop("scenario"), r.pop("seed")): r for r in records}
        return report(per_seed, args)
    jobs = [(scenario, args.dataset, seed, variant,
             str(args.out / f"{scenario}-seed{seed}-{variant}"))
            for scenario in args.scenarios for seed in args.seeds for variant in VARIANTS]
    results = []
    with tqdm(total=len(jobs), desc="runs", unit="run", file=sys.stderr) as bar:
        if args.jobs == 1:
            init_worker()
            for job in jobs:
                results.append(run_one(job))
                bar.update()
        else:
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.jobs, mp_context=context,
                                     initializer=init_worker) as pool:
                for future in as_completed([pool.submit(run_one, job) for job in jobs]):
                    results.append(future.result())
                    bar.update()
    per_seed = {key: figures(row) for key, row in sorted(collect(results).items())}
    records = [{"scenario": s, "seed": seed, **row} for (s, seed), row in per_seed.items()]
    if args.save:
        args.save.write_text(json.dumps(records, indent=2) + "\n")
    return report(per_seed, args)


def report(per_seed: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace) -> int:
    """Print the records (``--json``) or the table and the goals."""
    if args.json:
        records = [{"scenario": s, "seed": seed, **row} for (s, seed), row in per_seed.items()]
        print(json.dumps(records, indent=2))
        return 0
    print_table(per_seed)
    print()
    for text, passed in goals(per_seed):
        print(f"[{'pass' if passed else 'FAIL'}] {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
