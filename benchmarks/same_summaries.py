"""Behaviour check for refactors: fixed-seed sync runs must give the same ``summary.json``.

Runs ``specialize run`` (in this process, through ``specialize.run``) on named scenarios with
the synchronous updater and fixed seeds, and writes each run's ``summary.json`` with the
wall-clock fields removed (``timings``, every ``samples_per_second``) and the run folder's
``checkpoint`` path kept as is. ``--record DIR`` stores them; ``--compare DIR`` runs again and
reports every key path whose value differs from the stored run (exit code 1 if any does).

Usage:
    python benchmarks/same_summaries.py --record /tmp/before
    python benchmarks/same_summaries.py --compare /tmp/before [--scenarios tops,footwear]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_SCENARIOS = ("tops", "footwear", "tshirt-vs-shirt")
WALL_CLOCK_KEYS = ("timings", "samples_per_second")


def strip_wall_clock(value: Any) -> Any:
    """``value`` without the keys that measure time (recursively)."""
    if isinstance(value, dict):
        return {k: strip_wall_clock(v) for k, v in value.items() if k not in WALL_CLOCK_KEYS}
    if isinstance(value, list):
        return [strip_wall_clock(v) for v in value]
    return value


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Key paths where ``old`` and ``new`` differ (types, keys, lengths or values)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = [f"{path}.{k}: only in one run" for k in sorted(set(old) ^ set(new), key=str)]
        for key in old.keys() & new.keys():
            out += differences(old[key], new[key], f"{path}.{key}")
        return out
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{path}: length {len(old)} != {len(new)}"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b,
                                                                              f"{path}[{i}]")]
    return [] if old == new and type(old) is type(new) else [f"{path}: {old!r} != {new!r}"]


def run_summary(scenario: str, seed: int, out: Path) -> dict[str, Any]:
    """One fixed-seed sync run; its summary.json without wall-clock fields."""
    from specialize.run import load_run_config, run_experiment

    overrides = [f"seed={seed}", f"updater.seed={seed}", "updater.mode=sync",
                 "progress=false", f"out={out}"]
    config = load_run_config(scenario, overrides)
    run_experiment(config)
    return strip_wall_clock(json.loads((out / "summary.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="store the summaries in this folder")
    mode.add_argument("--compare", type=Path, help="compare with summaries stored here")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    failed = False
    with tempfile.TemporaryDirectory() as scratch:
        for scenario in args.scenarios.split(","):
            summary = run_summary(scenario, args.seed, Path(scratch) / scenario)
            name = f"{scenario}-seed{args.seed}.json"
            if args.record:
                args.record.mkdir(parents=True, exist_ok=True)
                (args.record / name).write_text(json.dumps(summary, indent=1, sort_keys=True))
                print(f"{scenario}: recorded {args.record / name}")
                continue
            stored = json.loads((args.compare / name).read_text())
            diffs = differences(stored, json.loads(json.dumps(summary)))
            failed |= bool(diffs)
            print(f"{scenario}: {'same' if not diffs else f'{len(diffs)} differences'}")
            for line in diffs[:20]:
                print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
