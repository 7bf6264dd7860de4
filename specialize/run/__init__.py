"""``specialize run``: one experiment from one config, written to a run folder.

Owns the run, phase by phase: :mod:`~specialize.run.config` (every section of a run config
and how it is read), :mod:`~specialize.run.experiment` (the phases: load, curves before,
frozen and specializing replays, curves after, summary and report),
:mod:`~specialize.run.checks` (what can be refused before anything loads),
:mod:`~specialize.run.state` (the crash-safe run state and resuming it),
:mod:`~specialize.run.budget` (the budget's validation pass, replays and hindsight) and
:mod:`~specialize.run.summarize` (from the measurements to the typed summary).

May import everything below it: the specializer, engine, policy, updater, drift,
operating point, evaluation, models, summary and report. Only the command line imports it.
"""

from specialize.run.config import RunConfig, load_run_config
from specialize.run.experiment import (
    build_policy,
    build_run_stream,
    build_specializer,
    headline,
    load_model,
    run_experiment,
    serve_stream,
)

__all__ = ["RunConfig", "build_policy", "build_run_stream", "build_specializer", "headline",
           "load_model", "load_run_config", "run_experiment", "serve_stream"]
