"""Soak test: one long async specializing stream; memory, throughput and publications over time.

Runs the default Fashion-MNIST model over the tops scenario stretched to ``--length`` samples
(200,000 by default) with the asynchronous updater, as the specializing replay of ``specialize
run`` does (executor, drift tracker and alarm, no per-sample records), and every ``--every``
samples (10,000) records the process's resident memory (VmRSS), the throughput of the block,
the head publications so far, samples dropped from a full queue, online accuracy (scored on
the evaluation side) and the updater's error. The stream draws from the tops of the
Fashion-MNIST test split that are not held out for evaluation (2,000 images), so a long
stream repeats each image about length / 2,000 times; the report says how often.

Goals: RSS growth after the first block <= 100 MB; throughput of the last block within 10 % of
the second block's; no updater error. Exit code 1 if a goal is missed.

Usage:
    python benchmarks/soak.py [--length 200000] [--every 10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RSS_GROWTH_GOAL_MB = 100.0
THROUGHPUT_TOLERANCE = 0.10


def rss_mb() -> float:
    """Resident set size of this process in MiB (VmRSS; peak RSS where /proc is missing)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Block:
    """One row of the table: the state after ``samples`` samples."""

    samples: int
    rss_mb: float
    samples_per_second: float
    accuracy: float
    published: int
    dropped: int
    error: str | None


class SoakProbe:
    """Step hook on the evaluation side: one :class:`Block` every ``every`` samples."""

    def __init__(self, labels, updater, every: int) -> None:
        from specialize.run.summarize import OnlineScore

        self.score = OnlineScore(labels)
        self.updater = updater
        self.every = every
        self.blocks: list[Block] = []
        self._clock = time.perf_counter()
        self._block_start = (0, 0)  # position, correct

    def on_step(self, output) -> None:
        self.score.on_step(output)
        if self.score.position - self._block_start[0] >= self.every:
            self._close_block()

    def _close_block(self) -> None:
        now = time.perf_counter()
        size = self.score.position - self._block_start[0]
        stats = self.updater.stats()
        self.blocks.append(Block(
            samples=self.score.position, rss_mb=rss_mb(),
            samples_per_second=size / max(now - self._clock, 1e-9),
            accuracy=100.0 * (self.score.correct - self._block_start[1]) / size,
            published=int(stats["published"]), dropped=int(stats["dropped"]),
            error=stats["error"]))
        self._clock, self._block_start = now, (self.score.position, self.score.correct)


def run(length: int, every: int, scenario: str, threads: int | None) -> dict[str, Any]:
    """The soak run; returns the blocks, the goals and the setup."""
    from specialize.run import (
        build_run_stream,
        build_specializer,
        load_model,
        load_run_config,
        serve_stream,
    )
    from specialize.updater import HeadUpdater

    overrides = [f"length={length}", "updater.mode=async", "progress=false"]
    if threads is not None:
        overrides.append(f"engine.num_threads={threads}")
    config = load_run_config(scenario, overrides)
    model, checkpoint = load_model(config.model, dataset=config.dataset, progress=False)
    stream = build_run_stream(config, model)
    start_rss = rss_mb()
    updater = HeadUpdater(model, config.updater)
    probe = SoakProbe(stream.evaluator().labels, updater, every)
    specializer = build_specializer(model, config, updater, hooks=[probe])
    started = time.perf_counter()
    result = serve_stream(specializer, stream, config, keep_records=False)
    seconds = time.perf_counter() - started
    distinct = len(set(stream.evaluator().indices.tolist()))
    return {"scenario": stream.name, "length": length, "every": every,
            "distinct_images": distinct, "repeats_per_image": length / distinct,
            "checkpoint": str(checkpoint),
            "rss_before_stream_mb": start_rss, "seconds": seconds,
            "samples_per_second": result.samples_per_second,
            "alarms": specializer.alarm_hook.count if specializer.alarm_hook else 0,
            "updater": {k: v for k, v in updater.stats().items()
                        if k in ("updates", "published", "dropped", "resets", "error")},
            "blocks": [asdict(block) for block in probe.blocks],
            "goals": goals(probe.blocks)}


def goals(blocks: list[Block]) -> dict[str, Any]:
    """The three goals, each with its measured value and whether it is met."""
    if len(blocks) < 3:
        return {"note": "fewer than three blocks: no goal can be measured"}
    growth = max(b.rss_mb for b in blocks[1:]) - blocks[0].rss_mb
    ratio = blocks[-1].samples_per_second / blocks[1].samples_per_second
    errors = sorted({b.error for b in blocks if b.error})
    return {
        "rss_growth_after_first_block_mb": {"value": growth,
                                            "met": growth <= RSS_GROWTH_GOAL_MB},
        "throughput_last_over_second_block": {
            "value": ratio, "met": abs(ratio - 1.0) <= THROUGHPUT_TOLERANCE},
        "updater_errors": {"value": errors, "met": not errors},
    }


def format_report(report: dict[str, Any]) -> str:
    """The table and the goals, as text."""
    lines = [
        f"soak: {report['scenario']}, {report['length']:,} samples, async updater, "
        f"{report['checkpoint']}",
        f"the stream shows {report['distinct_images']:,} distinct images (the scenario's "
        f"pool), each about {report['repeats_per_image']:.0f} times",
        f"RSS before the stream: {report['rss_before_stream_mb']:.1f} MB; "
        f"{report['seconds'] / 60:.1f} min, {report['samples_per_second']:.1f} samples/s overall; "
        f"drift alarms: {report['alarms']}; updater: {report['updater']}",
        "",
        "| samples | RSS (MB) | RSS growth since first block (MB) | samples/s (block) "
        "| online accuracy (block, %) | head publications | dropped | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    first = report["blocks"][0]["rss_mb"] if report["blocks"] else 0.0
    for b in report["blocks"]:
        lines.append(f"| {b['samples']:,} | {b['rss_mb']:.1f} | {b['rss_mb'] - first:+.1f} | "
                     f"{b['samples_per_second']:.1f} | {b['accuracy']:.2f} | {b['published']} | "
                     f"{b['dropped']} | {b['error'] or '-'} |")
    lines.append("")
    for name, goal in report["goals"].items():
        if isinstance(goal, dict):
            value = goal["value"]
            shown = f"{value:.3f}" if isinstance(value, float) else str(value)
            lines.append(f"{name}: {shown} ({'met' if goal['met'] else 'MISSED'})")
        else:
            lines.append(f"{name}: {goal}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=200_000, help="samples in the stream")
    parser.add_argument("--every", type=int, default=10_000, help="samples per table row")
    parser.add_argument("--scenario", default="tops", help="scenario (configs/scenarios)")
    parser.add_argument("--threads", type=int, default=None,
                        help="engine.num_threads (default: the run config's, 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = run(args.length, args.every, args.scenario, args.threads)
    print(json.dumps(report) if args.json else format_report(report))
    met = [g["met"] for g in report["goals"].values() if isinstance(g, dict)]
    return 0 if all(met) else 1


if __name__ == "__main__":
    sys.exit(main())
