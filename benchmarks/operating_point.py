"""The label-free operating point side by side: fixed thresholds, budgets, hindsight.

For every scenario and seed (sync updater, deterministic) this runs ``specialize run`` on the
same stream four times and reads each ``summary.json``:

1. ``fixed``: thresholds 0.9, frozen (``updater.enabled=false``, one replay);
2. and 3. ``budget 0.5``: ``policy.budget=0.5``, frozen and specializing replays (both under
   the controller, with audits at the default 3 %);
4. hindsight: with labels, offline, the cheapest shared threshold whose TRUE stream drop is
   within the budget for the frozen model (``budget.hindsight`` of run 2/3's summary), the
   same at the frozen controller's own true drop, and the cheapest within the budget for the
   specializing replay's final heads (``specialized``; shared and per exit);

plus budgets 0.25 and 1.0, specializing only. Stream MFLOPs include the audits.

Goals (printed as pass/fail), Fashion-MNIST: the true drop against the final exit is <= budget
+ 0.25 pt on every scenario and seed, on the stream and on eval_in; frozen at 0.5 <= 0.8x
fixed 0.9 on tops and tshirt-vs-shirt; specializing / frozen at 0.5 <= 0.9 there; frozen
controller <= 1.15x hindsight at the same true drop; audits <= 5 % of the stream's FLOPs.

``--dataset tiny_imagenet`` runs the Tiny-ImageNet scenarios instead (configs/scenarios/
tiny-imagenet/; only when ``$SPECIALIZE_TINY_IMAGENET`` exists): the four subsets, the same
subsets with 20 % of the stream from the other 194 classes (``<subset>-mixed``, budget 0.5
only) and a Zipf stream over all 200 classes (``zipf``, budget 0.5 only). Goals there: true
drops within budget + 0.25 pt in >= 95 % of the runs; on every subset specializing <= 0.80x
frozen and <= 0.85x fixed 0.9 frozen at 0.5; the specializing controller within 1.15x of the
specialized hindsight (mean; 1.25x worst seed); mixed streams specializing <= 1.0x frozen;
audits <= 5 %.

Usage:
    python benchmarks/operating_point.py [--dataset fashion_mnist|tiny_imagenet]
        [--scenarios tops,footwear,tshirt-vs-shirt] [--seeds 0,1,2] [--variants LIST]
        [--jobs 1] [--json] [--save FILE] [--out DIR]
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
TINY_SUBSETS = ("dogs", "food", "insects", "vehicles")
MIXED_SUFFIX = "-mixed"  # a subset with 20 % of its stream from the other classes
MIXED_OVERRIDES = ["other_rate=0.2"]
MIXED_SCENARIOS = (*(f"{name}{MIXED_SUFFIX}" for name in TINY_SUBSETS), "zipf")
MIXED_VARIANTS = ("budget0.5",)  # mixed streams: the same-budget comparison only
# name -> overrides of one run
VARIANTS = {
    "fixed": ["policy.thresholds=0.9", "updater.enabled=false", "evaluation.frozen_replay=false"],
    "budget0.5": ["policy.budget=0.5"],
    "budget0.25": ["policy.budget=0.25", "evaluation.frozen_replay=false"],
    "budget1.0": ["policy.budget=1.0", "evaluation.frozen_replay=false"],
    # the same budget with one threshold for every early exit (the setting before per-exit)
    "budget0.5-shared": ["policy.budget=0.5", "policy.budget_thresholds=shared"],
}
SLACK = 0.25  # points a true drop may exceed its budget


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default=None, help="comma-separated (default: per data "
                        "set: tops,footwear,tshirt-vs-shirt)")
    parser.add_argument("--dataset", default="fashion_mnist",
                        choices=("fashion_mnist", "tiny_imagenet"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {','.join(VARIANTS)}")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", type=Path, default=Path("runs/operating_point"))
    parser.add_argument("--json", action="store_true", help="print the records as JSON")
    parser.add_argument("--save", type=Path, help="write the records as JSON to this file")
    parser.add_argument("--load", type=Path, nargs="+", help="print the table and goals of "
                        "records saved with --save instead of running (several files: rows of "
                        "the same scenario and seed are merged)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be >= 1")
    if args.dataset == "tiny_imagenet":
        if not args.load and not os.environ.get("SPECIALIZE_TINY_IMAGENET"):
            parser.error("--dataset tiny_imagenet needs $SPECIALIZE_TINY_IMAGENET (or --load)")
        default = ",".join((*TINY_SUBSETS, *MIXED_SCENARIOS))
    else:
        default = ",".join(FMNIST_SCENARIOS)
    args.scenarios = [s for s in (args.scenarios or default).split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; allowed: {', '.join(VARIANTS)}")
    return args


def is_mixed(scenario: str) -> bool:
    return scenario in MIXED_SCENARIOS


def jobs_of(args: argparse.Namespace) -> list[tuple[str, str, int, str, str]]:
    """Every run: mixed streams only at the same-budget comparison."""
    return [(scenario, args.dataset, seed, variant,
             str(args.out / f"{scenario}-seed{seed}-{variant}"))
            for scenario in args.scenarios for seed in args.seeds for variant in args.variants
            if not is_mixed(scenario) or variant in MIXED_VARIANTS]


def scenario_path(scenario: str, dataset: str) -> tuple[str, list[str]]:
    """The scenario file (or shipped name) and the overrides a ``-mixed`` name adds."""
    overrides = []
    if scenario.endswith(MIXED_SUFFIX):
        scenario, overrides = scenario.removesuffix(MIXED_SUFFIX), MIXED_OVERRIDES
    if dataset == "tiny_imagenet":
        scenario = str(ROOT / "configs" / "scenarios" / "tiny-imagenet" / f"{scenario}.yaml")
    return scenario, list(overrides)


def init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def run_one(job: tuple[str, str, int, str, str]) -> dict[str, Any]:
    """One run; its summary's figures."""
    from specialize.run import load_run_config, run_experiment

    scenario, dataset, seed, variant, out = job
    path, extra = scenario_path(scenario, dataset)
    overrides = [f"seed={seed}", f"updater.seed={seed}", "updater.mode=sync", "progress=false",
                 *extra, *VARIANTS[variant], f"out={out}"]
    summary, _ = run_experiment(load_run_config(path, overrides))
    data = summary.to_json_dict()
    return {"scenario": scenario, "seed": seed, "variant": variant,
            "stream": data["stream"], "budget": data.get("budget"),
            "held_out": held_out_figures(data)}


def held_out_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """A run's held-out figures: iso-accuracy on eval_in, eval_out before and after."""
    points = summary.get("operating_points") or {}

    def out_at(phase: str) -> dict[str, Any]:
        return (points.get(phase) or {}).get("out") or {}

    return {"iso_flops_ratio": (summary.get("iso_accuracy") or {}).get("flops_ratio"),
            "eval_out_accuracy_change": summary.get("eval_out_accuracy_change"),
            "eval_out_mflops_before": _m(out_at("before").get("flops")),
            "eval_out_mflops_after": _m(out_at("after").get("flops"))}


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
        if level == "0.5" and result.get("held_out"):
            row["held_out"] = result["held_out"]
    return table


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def figures(row: dict[str, Any]) -> dict[str, Any]:
    """One (scenario, seed): the benchmark's columns."""
    frozen, special = row.get("frozen_0.5"), row.get("specializing_0.5")
    hindsight = row.get("hindsight", {})
    out = {"fixed_mflops": _m(row.get("fixed_frozen")), **row.get("held_out", {})}
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
    def limit(key: str) -> float | None:
        return _m((hindsight.get(key) or {}).get("mean_flops"))

    out["hindsight_mflops"] = limit("budget")
    out["hindsight_same_drop_mflops"] = limit("same_drop")
    out["hindsight_per_exit_mflops"] = limit("budget_per_exit")
    out["hindsight_specialized_mflops"] = limit("specialized")
    out["hindsight_specialized_per_exit_mflops"] = limit("specialized_per_exit")
    out["hindsight_specialized_eval_in_mflops"] = limit("specialized_eval_in")
    out["hindsight_specialized_eval_in_per_exit_mflops"] = limit("specialized_eval_in_per_exit")
    frozen_mflops = _m(frozen and frozen["mean_flops"])
    special_mflops = _m(special and special["mean_flops"])
    out["frozen_vs_fixed"] = _ratio(frozen_mflops, out["fixed_mflops"])
    out["special_vs_frozen"] = _ratio(special_mflops, frozen_mflops)
    out["special_vs_fixed"] = _ratio(special_mflops, out["fixed_mflops"])
    out["controller_vs_hindsight"] = _ratio(frozen_mflops, out["hindsight_same_drop_mflops"])
    out["special_vs_specialized_hindsight"] = _ratio(special_mflops,
                                                     out["hindsight_specialized_mflops"])
    return out | shared_ratios(out)


def shared_ratios(figures: dict[str, Any]) -> dict[str, float | None]:
    """The shared-threshold variant against fixed and per-exit (records may come apart)."""
    shared = {replay: (figures.get(f"{replay}_0.5-shared") or {}).get("mflops")
              for replay in ("frozen", "specializing")}
    if shared["frozen"] is None:
        return {}
    return {"shared_frozen_vs_fixed": _ratio(shared["frozen"], figures.get("fixed_mflops")),
            "shared_special_vs_frozen": _ratio(shared["specializing"], shared["frozen"]),
            "per_exit_vs_shared_frozen": _ratio((figures.get("frozen_0.5") or {}).get("mflops"),
                                                shared["frozen"])}


def _m(flops: float | None) -> float | None:
    return None if flops is None else flops / 1e6


def goals(per_seed: dict[tuple[str, int], dict[str, Any]],
          dataset: str = "fashion_mnist") -> list[tuple[str, bool]]:
    """Every goal of ``dataset`` with pass/fail."""
    drops, audits = [], []
    for row in per_seed.values():
        for key, entry in row.items():
            if isinstance(entry, dict) and "true_drop_stream" in entry:
                budget = float(key.rsplit("_", 1)[1].removesuffix("-shared"))
                for where in ("true_drop_stream", "true_drop_eval_in"):
                    if entry[where] is not None:
                        drops.append(entry[where] <= budget + SLACK)
                if entry["audit_share"] is not None:
                    audits.append(entry["audit_share"] <= 0.05)
    share = sum(drops) / len(drops) if drops else 0.0
    if dataset == "tiny_imagenet":
        checks = [(f"true drop <= budget + {SLACK} pt in >= 95 % of runs ({sum(drops)}/"
                   f"{len(drops)}, {100 * share:.0f} %)", share >= 0.95)]
        checks += _mean_goals(per_seed, TINY_SUBSETS, (
            ("specializing / frozen @0.5", "special_vs_frozen", 0.80),
            ("specializing @0.5 / fixed 0.9 frozen", "special_vs_fixed", 0.85)))
        checks += _mean_goals(per_seed, MIXED_SCENARIOS, (
            ("specializing / frozen @0.5", "special_vs_frozen", 1.0),))
        checks += _hindsight_goal(per_seed, "special_vs_specialized_hindsight",
                                  "specializing controller / specialized hindsight", 1.15, 1.25)
    else:
        checks = [(f"true drop <= budget + {SLACK} pt, every scenario/seed/budget "
                   f"({sum(drops)}/{len(drops)})", all(drops) and bool(drops))]
        checks += _mean_goals(per_seed, TARGETS, (
            ("frozen@0.5 / fixed 0.9 frozen", "frozen_vs_fixed", 0.8),
            ("specializing / frozen @0.5", "special_vs_frozen", 0.9)))
        checks += _hindsight_goal(per_seed, "controller_vs_hindsight",
                                  "frozen controller / hindsight at the same true drop",
                                  None, 1.15)
    checks.append((f"audits <= 5 % of stream FLOPs ({sum(audits)}/{len(audits)})",
                   all(audits) and bool(audits)))
    return checks


def _mean_goals(per_seed: dict[tuple[str, int], dict[str, Any]], scenarios: tuple[str, ...],
                specs: tuple[tuple[str, str, float], ...]) -> list[tuple[str, bool]]:
    """Per scenario, the mean over seeds of each ratio against its limit."""
    checks = []
    for name, key, limit in specs:
        for scenario in scenarios:
            values = [r[key] for (s, _), r in per_seed.items() if s == scenario and r.get(key)]
            if values:
                mean = statistics.fmean(values)
                checks.append((f"{name} on {scenario}: {mean:.3f} <= {limit}", mean <= limit))
    return checks


def _hindsight_goal(per_seed: dict[tuple[str, int], dict[str, Any]], key: str, name: str,
                    mean_limit: float | None, worst_limit: float) -> list[tuple[str, bool]]:
    ratios = [r[key] for r in per_seed.values() if r.get(key)]
    if not ratios:
        return []
    checks = []
    if mean_limit is not None:
        mean = statistics.fmean(ratios)
        checks.append((f"{name}: mean {mean:.3f} <= {mean_limit}", mean <= mean_limit))
    worst = max(ratios)
    checks.append((f"{name}: worst {worst:.3f} <= {worst_limit}", worst <= worst_limit))
    return checks


def _cell(values: list[float | None], digits: int = 2) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(per_seed: dict[tuple[str, int], dict[str, Any]]) -> str:
    """The records as one markdown table: every run, then the ratios, per scenario."""
    lines = []
    columns = ["scenario", "run", "stream MFLOPs", "audit share %", "true drop stream",
               "true drop eval_in", "est. drop", "bound", "disagreement %", "belief (pt)"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "---|" * len(columns))
    scenarios = list(dict.fromkeys(s for s, _ in per_seed))
    for scenario in scenarios:
        rows = [r for (s, _), r in per_seed.items() if s == scenario]
        fixed = _cell([r["fixed_mflops"] for r in rows])
        lines.append(f"| {scenario} | fixed 0.9 frozen | {fixed} | | | | | | | |")
        keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, dict)
                       and k.startswith(("frozen_", "specializing_"))})
        for key in keys:
            entries = [r[key] for r in rows if key in r]
            cells = [_cell([e[f] for e in entries]) for f in (
                "mflops", "audit_share", "true_drop_stream", "true_drop_eval_in",
                "estimated_drop", "bound", "disagreement", "belief")]
            cells[1] = _cell([None if e["audit_share"] is None else 100 * e["audit_share"]
                              for e in entries])
            lines.append(f"| | {key.replace('_', ' @')} | " + " | ".join(cells) + " |")
        for label, key in (("hindsight @0.5 (labels)", "hindsight_mflops"),
                           ("hindsight @0.5 per exit", "hindsight_per_exit_mflops"),
                           ("specialized hindsight @0.5", "hindsight_specialized_mflops"),
                           ("specialized hindsight @0.5 per exit",
                            "hindsight_specialized_per_exit_mflops"),
                           ("specialized hindsight on eval_in @0.5 (MFLOPs there)",
                            "hindsight_specialized_eval_in_mflops"),
                           ("specialized hindsight on eval_in @0.5 per exit",
                            "hindsight_specialized_eval_in_per_exit_mflops")):
            if any(r.get(key) for r in rows):
                lines.append(f"| | {label} | {_cell([r.get(key) for r in rows])} | | | | | | | |")
        for label, key in (("frozen@0.5 / fixed", "frozen_vs_fixed"),
                           ("specializing / frozen @0.5", "special_vs_frozen"),
                           ("specializing @0.5 / fixed", "special_vs_fixed"),
                           ("controller / hindsight (same drop)", "controller_vs_hindsight"),
                           ("specializing / specialized hindsight",
                            "special_vs_specialized_hindsight"),
                           ("shared: frozen@0.5 / fixed", "shared_frozen_vs_fixed"),
                           ("shared: specializing / frozen @0.5", "shared_special_vs_frozen"),
                           ("frozen@0.5: per exit / shared", "per_exit_vs_shared_frozen")):
            if key.startswith(("shared", "per_exit")) and not any(r.get(key) for r in rows):
                continue
            lines.append(f"| | {label} | {_cell([r.get(key) for r in rows], 3)} | | | | | | | |")
    return "\n".join(lines)


def print_table(per_seed: dict[tuple[str, int], dict[str, Any]]) -> None:
    """Print :func:`format_table`."""
    print(format_table(per_seed))


def format_goals(per_seed: dict[tuple[str, int], dict[str, Any]], dataset: str) -> str:
    """One ``[pass]`` / ``[FAIL]`` line per goal of ``dataset``."""
    return "\n".join(f"[{'pass' if passed else 'FAIL'}] {text}"
                     for text, passed in goals(per_seed, dataset))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.load:
        return report(load_records(args.load), args)
    jobs = jobs_of(args)
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


def load_records(paths: list[Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """Saved records by (scenario, seed); a later file's figures fill in or replace."""
    per_seed: dict[tuple[str, int], dict[str, Any]] = {}
    for path in paths:
        for record in json.loads(path.read_text()):
            key = (record.pop("scenario"), record.pop("seed"))
            row = per_seed.setdefault(key, {})
            row.update({k: v for k, v in record.items() if v is not None or k not in row})
    for row in per_seed.values():  # ratios across files
        row.update(shared_ratios(row))
    return dict(sorted(per_seed.items()))


def report(per_seed: dict[tuple[str, int], dict[str, Any]], args: argparse.Namespace) -> int:
    """Print the records (``--json``) or the table and the goals."""
    if args.json:
        records = [{"scenario": s, "seed": seed, **row} for (s, seed), row in per_seed.items()]
        print(json.dumps(records, indent=2))
        return 0
    print(format_table(per_seed))
    print()
    print(format_goals(per_seed, args.dataset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
