"""Updater strategies side by side on named scenarios and seeds: the goal figures, mean ± std.

For every (strategy, scenario, seed) this runs ``specialize.run.run_experiment`` on
``configs/scenarios/<scenario>.yaml`` (the same config loading as ``specialize run``) and
reads from its summary: ``iso_accuracy.gap_closed`` (goal >= 0.8; its denominator, the
before curve's FLOPs minus the oracle's at the target, is shown too because it can be tiny:
footwear), the eval_in peak accuracy after minus before (goal >= 0 pt), the eval_out accuracy
change at the run's thresholds (goal >= -0.5 pt) and the stream's samples/s while specializing
over samples/s frozen. One table row per (strategy, scenario): ``mean ± std (n)`` over seeds,
std being the sample standard deviation; ``(n/N)`` when only n of N seeds defined the value
(gap_closed is undefined when a curve misses the target or there is no gap).

The scenario name ``switch`` (in the default ``--scenarios``; ``--switch`` adds it,
``--no-switch`` drops it) runs the switch protocol instead of a main-table row (goal 3): the
``switch`` stream cut to ``--switch-after`` (500) samples after the switch, the original model
and the specialized one evaluated on the held-out samples of the new classes (the last phase's)
and of the old ones (the phase before). ``saving`` = 1 - flops_ratio of the iso-accuracy
comparison on the new classes (before curve, after curve, oracle of the original model);
``fresh`` specializes a fresh copy of the model on ``--fresh-length`` (2000) samples of the new
classes alone (same seed, same held-out split). Goals: switch saving / fresh saving >= 0.8,
old-class accuracy at the run's thresholds after minus before >= -1 pt.

Strategies are presets of dotted run-config overrides (``STRATEGIES`` below; ``--strategy
NAME=key=value,key=value`` adds one). Overrides of one run, later ones win: ``seed=K
updater.seed=K``, the strategy's, ``--set``'s, then ``evaluation.frozen_replay=true
progress=false out=<--out>/<strategy>/<scenario>-seed<K>``. Scenario overrides in ``--set``
(``length=300``, ``scenario.length=300``) apply to the main-table runs only; the switch
protocol's lengths come from ``--switch-before/--switch-after/--fresh-length``.

Runs are deterministic given the seed (``updater.mode=sync``); ``--jobs N`` runs them in N
spawned worker processes (one torch thread each) and gives the same figures except
throughput.

Usage:
    python benchmarks/specialization.py [--strategies plain,soft,anchored]
        [--scenarios tops,footwear,tshirt-vs-shirt,switch] [--seeds 0,1,2] [--jobs 1]
        [--strategy NAME=key=value,...] [--set key=value] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import re
import shlex
import statistics
import sys
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# The first recipe, as the engine and curves issues shipped it: SGD on the plain heads.
_FIRST_RECIPE = ["updater.optimizer=sgd", "updater.lr=0.01", "updater.batch_size=32"]
# pseudo-labels: the answering exit's own (the default before pseudo_label=prior)
_SELECTED = "updater.pseudo_label=selected"
STRATEGIES: dict[str, list[str]] = {
    "plain": ["updater.strategy=plain", _SELECTED, *_FIRST_RECIPE],
    "soft": ["updater.strategy=plain", "updater.target=soft", _SELECTED, *_FIRST_RECIPE],
    "plain-adam": ["updater.strategy=plain", _SELECTED],
    "anchored-sgd": ["updater.strategy=anchored", _SELECTED, *_FIRST_RECIPE],
    "anchored": ["updater.strategy=anchored", _SELECTED],
    # pseudo-labels under the stream's class prior (specialize.updater.prior): the default
    "anchored-prior": ["updater.strategy=anchored", "updater.pseudo_label=prior"],
}
DEFAULT_SCENARIOS = ("tops", "footwear", "tshirt-vs-shirt", "switch")
SWITCH = "switch"
# Every goal is "mean over seeds >= value".
GOALS: dict[str, float] = {
    "gap_closed": 0.8,
    "in_peak_change": 0.0,
    "out_change": -0.5,
    "switch_ratio": 0.8,
    "old_change": -1.0,
}
# (record key, column header, number format)
MAIN_COLUMNS = (
    ("gap_closed", "gap_closed", ".2f"),
    ("in_peak_change", "in-peak change (pt)", "+.2f"),
    ("out_change", "out change (pt)", "+.2f"),
    ("throughput_ratio", "samples/s spec/frozen", ".2f"),
    ("gap_mflops", "before-oracle MFLOPs", ".2f"),
)
SWITCH_COLUMNS = (
    ("switch_saving", "switch saving", ".3f"),
    ("fresh_saving", "fresh saving", ".3f"),
    ("switch_ratio", "switch/fresh", ".2f"),
    ("old_change", "old change (pt)", "+.2f"),
    ("new_change", "new change (pt)", "+.2f"),
)
# Table cells computed from other columns' means: a ratio of means, not a mean of per-seed
# ratios (a seed whose fresh saving is near zero would make the latter meaningless).
RATIO_OF_MEANS: dict[str, tuple[str, str]] = {"switch_ratio": ("switch_saving", "fresh_saving")}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Job:
    """One run: a strategy's overrides on one scenario and seed."""

    kind: str  # "main" (run_experiment) or "switch" (the switch protocol)
    strategy: str
    scenario: str
    seed: int
    overrides: tuple[str, ...]  # the strategy's, then --set's
    out: str
    switch_before: int | None = None
    switch_after: int = 500
    fresh_length: int = 2000
    reuse: bool = False  # read a finished run folder of the same config instead of running


# -- argument parsing ----------------------------------------------------------------------

def split_overrides(text: str) -> list[str]:
    """Split ``a=1,b=[1,2]`` at the commas outside brackets and braces.

    Args:
        text: Comma-separated ``key=value`` overrides (values are YAML).

    Returns:
        The overrides, stripped; ``[]`` for an empty text.
    """
    parts, depth, current = [], 0, []
    for char in text:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [] if parts == [""] else parts


def check_override(text: str, where: str) -> str:
    """Return ``text`` if it is a ``key=value`` override, else raise a clear error."""
    from configkit import ConfigError, parse_override

    try:
        parse_override(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"{where}: {err}") from None
    return text


def parse_strategy(text: str) -> tuple[str, list[str]]:
    """Parse ``NAME=key=value,key=value`` (an ad-hoc preset; ``NAME=`` is the defaults).

    Args:
        text: The ``--strategy`` argument.

    Returns:
        ``(name, overrides)``.

    Raises:
        argparse.ArgumentTypeError: No ``=``, a bad name, or an override without ``key=``.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not _NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"--strategy {text!r}: expected NAME=key=value[,key=value...], e.g. "
            "hard=updater.target=hard,updater.lr=0.02 (NAME: letters, digits, _ . + -)")
    overrides = split_overrides(rest)
    for item in overrides:
        check_override(item, f"--strategy {name}")
    return name, overrides


def select_strategies(names: Sequence[str] | None,
                      adhoc: Sequence[tuple[str, list[str]]]) -> dict[str, list[str]]:
    """The presets to run, in order.

    Args:
        names: ``--strategies`` (``None``: the ad-hoc presets if any, else all of STRATEGIES).
        adhoc: ``--strategy`` presets; one replaces a built-in preset of the same name.

    Returns:
        Name -> overrides.

    Raises:
        argparse.ArgumentTypeError: A name is defined twice ad hoc, or is unknown.
    """
    extra: dict[str, list[str]] = {}
    for name, overrides in adhoc:
        if name in extra:
            raise argparse.ArgumentTypeError(f"--strategy {name} is given twice")
        extra[name] = list(overrides)
    known = {**STRATEGIES, **extra}
    chosen = list(names) if names is not None else list(extra or STRATEGIES)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {unknown[0]!r}; known: {', '.join(known)} (add one with "
            "--strategy NAME=key=value,...)")
    return {name: known[name] for name in dict.fromkeys(chosen)}


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds {text!r}: expected integers, e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds {text!r}: expected integers >= 0")
    return seeds


def _set(text: str) -> str:
    return check_override(text.strip(), "--set")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", type=_csv, default=None,
                        help="comma-separated preset names (default: the --strategy presets "
                             f"if any, else {','.join(STRATEGIES)})")
    parser.add_argument("--strategy", type=parse_strategy, action="append", default=[],
                        metavar="NAME=key=value,...", help="add an ad-hoc preset (repeatable)")
    parser.add_argument("--scenarios", type=_csv, default=list(DEFAULT_SCENARIOS),
                        help="comma-separated scenario files or names in configs/scenarios; "
                             f"'{SWITCH}' runs the switch protocol")
    parser.add_argument("--switch", action=argparse.BooleanOptionalAction, default=None,
                        help=f"add (or with --no-switch drop) the '{SWITCH}' protocol")
    parser.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="e.g. 0,1,2")
    parser.add_argument("--set", dest="sets", type=_set, action="append", default=[],
                        metavar="key=value", help="override for every run (repeatable)")
    parser.add_argument("--switch-before", type=int, default=None,
                        help="samples before the switch (default: the scenario file's)")
    parser.add_argument("--switch-after", type=int, default=500,
                        help="samples after the switch")
    parser.add_argument("--fresh-length", type=int, default=2000,
                        help="samples of the fresh specialization on the new classes")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--out", default="runs/benchmark-specialization",
                        help="folder of the run folders")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--save", default=None, help="also write the JSON object to this file")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        args.presets = select_strategies(args.strategies, args.strategy)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.switch is not None:
        args.scenarios = [s for s in args.scenarios if s != SWITCH] + [SWITCH] * args.switch
    if args.jobs < 1 or min(args.switch_after, args.fresh_length, args.switch_before or 1) < 1:
        parser.error("--jobs, --switch-before, --switch-after and --fresh-length must be >= 1")
    return args


# -- jobs and run configs ------------------------------------------------------------------

def is_scenario_override(text: str) -> bool:
    """Whether an override changes the scenario (``scenario.x=...`` or a plain field)."""
    from streams.scenarios import ScenarioConfig

    key = text.partition("=")[0].strip()
    if "." in key:
        return key.split(".")[0] == "scenario"
    return key in {f.name for f in dataclasses.fields(ScenarioConfig)}


def scenario_label(scenario: str) -> str:
    """The name of a scenario file without folder and ``.yaml``."""
    return Path(scenario).stem


def build_jobs(args: argparse.Namespace) -> list[Job]:
    """One job per (strategy, scenario, seed), in table order."""
    jobs = []
    for strategy, preset in args.presets.items():
        for scenario in args.scenarios:
            kind = "switch" if scenario_label(scenario) == SWITCH else "main"
            for seed in args.seeds:
                out = Path(args.out) / strategy / f"{scenario_label(scenario)}-seed{seed}"
                jobs.append(Job(kind, strategy, scenario, seed, (*preset, *args.sets), str(out),
                                args.switch_before, args.switch_after, args.fresh_length))
    return jobs


def run_overrides(job: Job, overrides: Sequence[str]) -> list[str]:
    """A run's overrides: the seed, then ``overrides``, then what the benchmark needs."""
    return [f"seed={job.seed}", f"updater.seed={job.seed}", *overrides,
            "evaluation.frozen_replay=true", "progress=false", f"out={job.out}"]


def main_config(job: Job):
    """The run config of a main-table job (as ``specialize run`` would build it)."""
    from specialize.run import load_run_config

    return load_run_config(job.scenario, run_overrides(job, job.overrides))


def switch_configs(job: Job):
    """The run configs of the switch protocol: the cut switch stream and the fresh stream."""
    from specialize.run import load_run_config
    from streams.scenarios import ScenarioConfig

    overrides = [o for o in job.overrides if not is_scenario_override(o)]
    config = load_run_config(job.scenario, run_overrides(job, overrides))
    num_phases = len(config.scenario.get("phases") or [])
    if num_phases < 2:
        raise ValueError(f"{job.scenario}: the switch protocol needs a phases scenario with at "
                         "least two phases")
    # Cut the last two phases (old classes, then the new ones); their lengths make the total.
    cut = ["scenario.length=null", f"scenario.phases.{num_phases - 1}.length={job.switch_after}"]
    if job.switch_before is not None:
        cut.append(f"scenario.phases.{num_phases - 2}.length={job.switch_before}")
    switch = load_run_config(job.scenario, run_overrides(job, [*overrides, *cut]))
    new_phase = ScenarioConfig.from_dict(switch.scenario).phases[-1].to_dict()
    fresh_scenario = {**new_phase, "length": job.fresh_length,
                      "name": f"fresh-{new_phase.get('name', 'new')}"}
    return switch, dataclasses.replace(config, scenario=fresh_scenario)


def validate_jobs(jobs: Sequence[Job]) -> None:
    """Build every job's config up front so a bad preset fails before any run starts."""
    from configkit import ConfigError

    for job in jobs:
        try:
            if job.kind == "main":
                main_config(job)
            else:
                switch_configs(job)
        except (ConfigError, ValueError, FileNotFoundError) as err:
            raise SystemExit(f"specialization.py: error: strategy {job.strategy!r} on "
                             f"{job.scenario}: {err}") from None


# -- one run -------------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A finite float, or ``None`` (for ``None``, NaN and inf)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _diff(after: Any, before: Any, scale: float = 1.0) -> float | None:
    after, before = _num(after), _num(before)
    return None if after is None or before is None else (after - before) / scale


def _ratio(numerator: Any, denominator: Any) -> float | None:
    numerator, denominator = _num(numerator), _num(denominator)
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def init_worker() -> None:
    """Worker process setup: one torch thread (the machine has 2 cores)."""
    torch.set_num_threads(1)


def run_job(job: Job) -> dict[str, Any]:
    """Run one job; an exception becomes the record's ``error`` (the others carry on)."""
    base = {"kind": job.kind, "strategy": job.strategy, "scenario": scenario_label(job.scenario),
            "seed": job.seed, "overrides": list(job.overrides)}
    try:
        record = run_main(job) if job.kind == "main" else run_switch(job)
    except Exception as err:  # noqa: BLE001 - reported in the table, the other runs carry on
        return {**base, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}
    return {**base, **record}


def run_main(job: Job) -> dict[str, Any]:
    """``run_experiment`` on the job's config; the summary's goal figures."""
    from specialize.run import run_experiment

    config = main_config(job)
    finished = finished_summary(config) if job.reuse else None
    if finished is not None:
        return {**main_record(finished, config.out), "reused": True}
    summary, out_dir = run_experiment(config)
    return main_record(summary.to_json_dict(), out_dir)


# fields of a run config that do not change its results
RUNTIME_FIELDS = frozenset({"out", "progress", "state", "save_every"})


def finished_summary(config) -> dict[str, Any] | None:
    """The summary.json in ``config.out`` when that folder finished a run of the same config.

    The same config: the folder's config.yaml agrees with ``config`` on every field it
    records, runtime fields (out, progress, state, save_every) aside; fields added to the
    config since take their defaults, which keep earlier behaviour.
    """
    import yaml

    from configkit import to_dict

    folder = Path(config.out)
    if not (folder / "summary.json").exists() or not (folder / "config.yaml").exists():
        return None
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    current = to_dict(config)
    if not all(_agrees(value, current.get(key)) for key, value in saved.items()
               if key not in RUNTIME_FIELDS):
        return None
    return json.loads((folder / "summary.json").read_text())


def _agrees(saved: Any, current: Any) -> bool:
    """Whether every field of ``saved`` has the same value in ``current``."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return all(_agrees(v, current.get(k)) for k, v in saved.items())
    return saved == current


def main_record(summary: dict[str, Any], out_dir: Path | str) -> dict[str, Any]:
    """The figures of one run, read from ``run_experiment``'s summary."""
    iso = summary.get("iso_accuracy") or {}
    peak = summary.get("eval_in_peak_accuracy") or {}
    stream = summary["stream"]
    special, frozen = stream["specializing"], stream.get("frozen") or {}
    return {
        "out": str(out_dir),
        "checkpoint": summary["model"]["checkpoint"],
        "fingerprint": summary["scenario"]["fingerprint"],
        "gap_closed": _num(iso.get("gap_closed")),
        "flops_ratio": _num(iso.get("flops_ratio")),
        "target_accuracy": _num(iso.get("target_accuracy")),
        "flops_before": _num(iso.get("flops_before")),
        "flops_after": _num(iso.get("flops_after")),
        "flops_oracle": _num(iso.get("flops_oracle")),
        "gap_mflops": _diff(iso.get("flops_before"), iso.get("flops_oracle"), 1e6),
        "in_peak_before": _num(peak.get("before")),
        "in_peak_after": _num(peak.get("after")),
        "in_peak_change": _diff(peak.get("after"), peak.get("before")),
        "out_change": _num(summary.get("eval_out_accuracy_change")),
        "samples_per_second_specializing": _num(special["samples_per_second"]),
        "samples_per_second_frozen": _num(frozen.get("samples_per_second")),
        "throughput_ratio": _ratio(special["samples_per_second"],
                                   frozen.get("samples_per_second")),
        "stream_mflops_specializing": _diff(special["mean_flops"], 0.0, 1e6),
        "stream_mflops_frozen": _diff(frozen.get("mean_flops"), 0.0, 1e6),
        "updates": special.get("updates"),
    }


# -- the switch protocol -------------------------------------------------------------------

def class_subset(data, classes: Sequence[int], name: str):
    """The samples of an ``ArrayDataset`` whose label is in ``classes``."""
    keep = torch.isin(data.labels, torch.as_tensor(list(classes), dtype=data.labels.dtype))
    return data.subset(torch.nonzero(keep).flatten().numpy(), name=name)


def same_samples(a, b) -> bool:
    """Whether two data sets hold the same images and labels in the same order."""
    return (a is not None and b is not None and torch.equal(a.labels, b.labels)
            and torch.equal(a.images, b.images))


def specialize_on(model: torch.nn.Module, stream, config) -> dict[str, Any]:
    """Specialize ``model``'s heads in place over ``stream`` (as ``specialize run`` does).

    Returns:
        The updater's ``updates`` and ``rollbacks``, the drift ``alarms`` and samples/s.
    """
    from specialize.run import build_specializer, serve_stream
    from specialize.updater import HeadUpdater

    updater = HeadUpdater(model, config.updater)
    specializer = build_specializer(model, config, updater)
    result = serve_stream(specializer, stream, config, keep_records=False)
    stats = updater.stats()
    return {"updates": stats.get("updates"), "rollbacks": stats.get("rollbacks"),
            "alarms": specializer.alarm_hook.alarms if specializer.alarm_hook else [],
            "samples_per_second": result.samples_per_second}


def _stream(config, model: torch.nn.Module):
    from specialize.run import build_run_stream

    return build_run_stream(config, model)


def _exit_pass(model: torch.nn.Module, data, transform, config):
    from specialize.evaluation.passes import exit_pass

    return exit_pass(model, data.images, data.labels, transform,
                     measure=config.policy.measure, batch_size=config.evaluation.batch_size)


def run_switch(job: Job) -> dict[str, Any]:
    """The switch protocol for one strategy and seed (see the module docstring)."""
    from specialize.run import build_policy, load_model

    switch_config, fresh_config = switch_configs(job)
    model, checkpoint = load_model(switch_config.model, dataset=switch_config.dataset,
                                   progress=False)
    fresh_model = copy.deepcopy(model)
    stream = _stream(switch_config, model)
    phases = stream.config.phases
    new, old = phases[-1].classes, phases[-2].classes
    sets = {"new": class_subset(stream.eval_in, new, "eval_in:new"),
            "old": class_subset(stream.eval_in, old, "eval_in:old")}
    passes = {f"before_{k}": _exit_pass(model, s, stream.transform, switch_config)
              for k, s in sets.items()}
    switch_run = specialize_on(model, stream, switch_config)
    for key, data in sets.items():
        passes[f"after_{key}"] = _exit_pass(model, data, stream.transform, switch_config)
    fresh_stream = _stream(fresh_config, fresh_model)
    fresh_run = specialize_on(fresh_model, fresh_stream, fresh_config)
    passes["fresh_new"] = _exit_pass(fresh_model, sets["new"], stream.transform, fresh_config)
    thresholds = build_policy(switch_config).thresholds_tensor(model.num_exits)
    record = switch_record(passes, thresholds, switch_config.evaluation.iso_drop)
    return {**record, "checkpoint": checkpoint, "new_classes": list(new),
            "old_classes": list(old), "switch_position": stream.phase_boundaries[-1],
            "stream_length": len(stream), "fresh_length": len(fresh_stream),
            "eval_sets_match": same_samples(fresh_stream.eval_in, sets["new"]),
            "eval_sizes": {k: len(s) for k, s in sets.items()},
            "switch_run": switch_run, "fresh_run": fresh_run}


def _front(result):
    from specialize.evaluation import curves

    return curves.pareto_front(curves.sweep(result.confidence.numpy(), result.correct.numpy(),
                                            result.flops.numpy()))


def switch_record(passes: dict[str, Any], thresholds: torch.Tensor,
                  drop: float) -> dict[str, Any]:
    """Savings on the new classes, switch vs fresh, and the accuracy changes at the thresholds.

    Args:
        passes: ``ExitPass`` per ``before_new``, ``after_new``, ``fresh_new``, ``before_old``,
            ``after_old``.
        thresholds: The run's per-exit thresholds.
        drop: Iso-accuracy target: the before curve's peak minus this many points.

    Returns:
        The record's figures (savings, ratio, accuracy changes, iso-accuracy details).
    """
    from specialize.evaluation import curves
    from specialize.evaluation.passes import operating_point

    before = passes["before_new"]
    oracle = curves.oracle_curve(before.correct.numpy(), before.flops.numpy())
    iso = {name: curves.iso_accuracy(_front(before), _front(passes[f"{name}_new"]), oracle,
                                     drop=drop) for name in ("after", "fresh")}
    saving = {name: _diff(1.0, iso[name]["flops_ratio"]) for name in iso}
    ops = {key: operating_point(p, thresholds) for key, p in passes.items()}
    return {
        "switch_saving": saving["after"],
        "fresh_saving": saving["fresh"],
        "switch_ratio": _ratio(saving["after"], saving["fresh"]),
        "old_change": _diff(ops["after_old"]["accuracy"], ops["before_old"]["accuracy"]),
        "new_change": _diff(ops["after_new"]["accuracy"], ops["before_new"]["accuracy"]),
        "iso_switch": {k: _num(v) for k, v in iso["after"].items()},
        "iso_fresh": {k: _num(v) for k, v in iso["fresh"].items()},
        "operating_points": ops,
    }


# -- running everything --------------------------------------------------------------------

def run_all(jobs: Sequence[Job], workers: int, progress: bool,
            runner: Callable[[Job], dict[str, Any]] = run_job) -> list[dict[str, Any]]:
    """Run the jobs (in ``workers`` spawned processes when > 1); records in job order."""
    bar = tqdm(total=len(jobs), desc="runs", unit="run", disable=not progress, file=sys.stderr)
    records: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers == 1:
        for index, job in enumerate(jobs):
            records[index] = runner(job)
            bar.update(1)
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker) as pool:
            futures = {pool.submit(runner, job): index for index, job in enumerate(jobs)}
            for future in as_completed(futures):
                records[futures[future]] = future.result()
                bar.update(1)
    bar.close()
    return records  # type: ignore[return-value]


# -- aggregation and output ----------------------------------------------------------------

def aggregate(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std of the defined values (``None``/NaN are left out and counted).

    Returns:
        ``mean`` and ``std`` (``None`` when undefined: no value, or one value for std),
        ``n`` (defined values) and ``total``.
    """
    defined = [v for v in (_num(v) for v in values) if v is not None]
    return {"mean": statistics.fmean(defined) if defined else None,
            "std": statistics.stdev(defined) if len(defined) > 1 else None,
            "n": len(defined), "total": len(values)}


def meets_goal(metric: str, mean: float | None) -> bool | None:
    """Whether a mean meets the metric's goal (``None``: no goal, or no mean)."""
    if metric not in GOALS or mean is None:
        return None
    return mean >= GOALS[metric]


def format_cell(stats: dict[str, Any], fmt: str, met: bool | None) -> str:
    """``mean ± std (n)``, ``(n/N)`` when some seeds are undefined, ``*`` when the goal is met."""
    n, total = stats["n"], stats["total"]
    count = f"({n})" if n == total else f"({n}/{total})"
    if stats["mean"] is None:
        return f"n/a {count}"
    text = format(stats["mean"], fmt)
    if stats["std"] is not None:
        text += f" ± {format(stats['std'], fmt.lstrip('+'))}"
    return f"{text} {count}" + ("*" if met else "")


def table_rows(records: Sequence[dict[str, Any]],
               columns: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    """One row per (strategy, scenario), in first-seen order, with aggregated metrics."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["strategy"], record["scenario"]), []).append(record)
    rows = []
    for (strategy, scenario), group in groups.items():
        metrics = {}
        for key, _, _ in columns:
            stats = aggregate([r.get(key) for r in group])
            if key in RATIO_OF_MEANS:  # over the seeds that define both
                both = [r for r in group
                        if all(_num(r.get(k)) is not None for k in RATIO_OF_MEANS[key])]
                top, bottom = (aggregate([r.get(k) for r in both]) for k in RATIO_OF_MEANS[key])
                stats = {"mean": _ratio(top["mean"], bottom["mean"]), "std": None,
                         "n": min(top["n"], bottom["n"]), "total": len(group)}
            metrics[key] = {**stats, "goal": GOALS.get(key),
                            "meets_goal": meets_goal(key, stats["mean"])}
        rows.append({"strategy": strategy, "scenario": scenario,
                     "seeds": [r["seed"] for r in group],
                     "errors": sum("error" in r for r in group), "metrics": metrics})
    return rows


def build_report(command: str, args: argparse.Namespace,
                 records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole result as one JSON-ready dict (the table's rows and every run's record)."""
    main = [r for r in records if r["kind"] == "main"]
    switch = [r for r in records if r["kind"] == "switch"]
    checkpoints = sorted({r["checkpoint"] for r in records if "checkpoint" in r})
    return {
        "command": command,
        "settings": {"scenarios": list(args.scenarios), "seeds": list(args.seeds),
                     "sets": list(args.sets), "jobs": args.jobs, "out": args.out,
                     "switch_before": args.switch_before, "switch_after": args.switch_after,
                     "fresh_length": args.fresh_length, "checkpoints": checkpoints},
        "strategies": dict(args.presets),
        "goals": dict(GOALS),
        "table": table_rows(main, MAIN_COLUMNS),
        "switch_table": table_rows(switch, SWITCH_COLUMNS),
        "runs": list(main),
        "switch_runs": list(switch),
        "errors": [{k: r[k] for k in ("strategy", "scenario", "seed", "error")}
                   for r in records if "error" in r],
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table of aggregated rows."""
    header = ["strategy", "scenario", *(title for _, title, _ in columns)]
    lines = [[row["strategy"], row["scenario"],
              *(format_cell(row["metrics"][key], fmt, row["metrics"][key]["meets_goal"])
                for key, _, fmt in columns)] for row in rows]
    return "\n".join(aligned([header, *lines]))


def aligned(lines: Sequence[Sequence[str]]) -> list[str]:
    """Rows of cells as text lines with left-aligned columns."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip()
            for line in lines]


def error_lines(errors: Sequence[dict[str, Any]]) -> list[str]:
    """One line per failed run of a report."""
    return [f"error: {e['strategy']} {e['scenario']} seed {e['seed']}: {e['error']}"
            for e in errors]


def format_report(report: dict[str, Any]) -> str:
    """The printed output: command, settings, the tables, the legend and any errors."""
    settings = report["settings"]
    lines = [f"command: {report['command']}",
             f"model: {', '.join(settings['checkpoints']) or '?'}; seeds "
             f"{','.join(map(str, settings['seeds']))}; FLOPs: a multiply-add counts 2",
             "strategies: " + "; ".join(f"{name} = {' '.join(o) or '(defaults)'}"
                                        for name, o in report["strategies"].items())]
    if report["table"]:
        lines += ["", format_table(report["table"], MAIN_COLUMNS)]
    if report["switch_table"]:
        lines += ["", f"switch: {settings['switch_after']} samples after the switch; fresh: "
                      f"{settings['fresh_length']} samples of the new classes",
                  format_table(report["switch_table"], SWITCH_COLUMNS)]
    lines += ["", "mean ± std over seeds (n seeds; n/N: defined in n of N seeds); switch/fresh "
                  "is the ratio of the two mean savings",
              "* meets the goal (mean): gap_closed >= 0.8, in-peak change >= 0 pt, out change "
              ">= -0.5 pt, switch/fresh >= 0.8, old change >= -1 pt"]
    lines += error_lines(report["errors"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(1)
    jobs = build_jobs(args)
    validate_jobs(jobs)
    records = run_all(jobs, args.jobs, not args.no_progress)
    command = shlex.join(["python", "benchmarks/specialization.py", *argv])
    report = build_report(command, args, records)
    from specialize.report import to_jsonable

    text = json.dumps(to_jsonable(report), indent=2)
    if args.save:
        Path(args.save).write_text(text + "\n")
    print(text if args.json else format_report(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
