"""The health check at its defaults: false rollbacks over seeds, and an injected bad head.

Runs only the specializing replay of ``specialize run configs/runs/demo.yaml`` (the default
Fashion-MNIST model on the 3,000-sample tops stream under ``policy.budget=0.5``, so 2 % of
the samples are audited) for each ``--seeds`` value (the scenario's seed: stream, audits),
once as configured (healthy heads: every rollback is a false one) and once with
``updater.inject_bad_head_at=--inject-at`` (every run should roll back after that sample).
Prints one line per replay and the rates.

Usage:
    python benchmarks/health_windows.py [--seeds 0 1 2 ...] [--inject-at 1000] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from specialize.run.budget import BudgetInputs
from specialize.run.checks import check_model_fits, check_run_inputs
from specialize.run.config import load_run_config
from specialize.run.experiment import _replay, fit_inputs, load_model
from specialize.run.state import RunSession

DEMO = "configs/runs/demo.yaml"


def replay_health(overrides: list[str]) -> dict[str, Any]:
    """The specializing replay of the demo run with ``overrides``: its health figures."""
    config = load_run_config(DEMO, [*overrides, "progress=false"])
    stream = check_run_inputs(config)
    model, checkpoint = load_model(config.model, dataset=config.dataset, progress=False)
    check_model_fits(config, model, stream)
    stream = fit_inputs(stream, model)
    budget = BudgetInputs(model, checkpoint, stream.transform, config)
    replay = _replay(model, stream, config, RunSession.open(None, {}), specialize=True,
                     budget=budget)
    stats = replay.updater
    return {"audited": stats.audited, "healthy": stats.healthy_windows,
            "degraded": stats.degraded_windows, "rollbacks": stats.rollbacks,
            "events": stats.rollback_events, "resets": stats.resets,
            "alarms": list(replay.alarms), "accuracy": replay.record.accuracy}


def main(argv: list[str] | None = None) -> int:
    """Run the replays and print the false-rollback and caught rates."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--inject-at", type=int, default=1010,
                        help="sample of the injection (a negative value: no injected runs)")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides")
    args = parser.parse_args(argv)
    false, caught = 0, 0
    for seed in args.seeds:
        for inject in (None, args.inject_at) if args.inject_at >= 0 else (None,):
            extra = [] if inject is None else [f"updater.inject_bad_head_at={inject}"]
            result = replay_health([f"seed={seed}", *args.overrides, *extra])
            print(json.dumps({"seed": seed, "inject_at": inject, **result}), flush=True)
            if inject is None:
                false += result["rollbacks"] > 0
            else:
                caught += any(e["observed"] >= inject for e in result["events"] or [])
    runs = len(args.seeds)
    print(f"healthy replays with a rollback: {false}/{runs}; injected bad heads rolled back: "
          f"{caught}/{runs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
