"""``specialize run``: a whole experiment from one config, written to a run folder.

Steps: build the stream; load (or train and cache) the model; evaluate every exit once on the
held-out sets (curves before); replay the stream twice, frozen and while specializing; evaluate
again with the specialized heads (curves after); write ``summary.json``, ``report.md`` and
plots. The engine never sees labels: they are read from the stream's evaluator only to score.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from backbones.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    load_checkpoint,
    read_checkpoint,
)
from backbones.contract import MultiExitModel
from configkit import (
    to_dict,
)
from specialize.drift import ClassCostTracker, ClassMixDriftDetector
from specialize.engine import EngineResult, StepHook, make_step_fn
from specialize.evaluation.passes import ExitPass, exit_pass, rerun_heads
from specialize.models.runtime import model_input_options
from specialize.models.zoo import (
    default_checkpoint,
    default_model_config,
    training_data,
)
from specialize.policy import ExitPolicy
from specialize.report import format_headline, write_report
from specialize.run.budget import (
    BudgetInputs,
    audit_rate,
    budget_phase,
    budget_replay,
    budget_section,
    pass_state,
    specialized_stream_pass,
)
from specialize.run.checks import check_model_fits, check_run_inputs
from specialize.run.config import ModelConfig, RunConfig
from specialize.run.state import RunSession, run_identity, weights_hash
from specialize.run.summarize import OnlineScore, Replay, RunRecords, build_summary, stream_record
from specialize.specializer import Specializer
from specialize.summary import EvalSplits, RunSummary, UpdaterStats
from specialize.updater import HeadUpdater
from specialize.updater.anchoring import heads_state, serve_heads_state, unanchor_heads
from streams.replay import Stream, build_stream
from streams.transforms import InputTransform


def load_model(config: ModelConfig, *, dataset: str = "fashion_mnist",
               progress: bool = True) -> tuple[MultiExitModel, str]:
    """Load the configured checkpoint, or the cached default (prepared if missing).

    Args:
        config: The run's model section.
        dataset: The scenario's data set (chooses the default model).
        progress: Progress of a first-time preparation.
    """
    train_config = config.train_config or default_model_config(dataset)
    path = config.checkpoint or default_checkpoint(train_config, progress=progress)
    model, _ = load_checkpoint(path)
    return model.eval(), str(path)


def run_experiment(config: RunConfig) -> tuple[RunSummary, Path]:
    """Run the experiment a config describes and write its report.

    With ``config.state`` the whole run state is saved there (see
    :mod:`specialize.run.state`) and a saved state is resumed.

    Returns:
        ``(summary, run_folder)``; ``summary.to_json_dict()`` is the run's summary.json.

    Raises:
        RunInterrupted: SIGINT or SIGTERM stopped a run that keeps a state (saved).
        StateMismatchError: ``config.state`` holds the state of another run.
    """
    clock = time.perf_counter()
    stream = check_run_inputs(config)  # what needs the data or the checkpoint, before loading
    model, checkpoint = load_model(config.model, dataset=config.dataset,
                                   progress=config.progress)
    check_model_fits(config, model, stream)  # a default model prepared just now
    stream = fit_inputs(stream, model)
    settings = {**to_dict(config), "scenario": stream.config.to_dict()}
    session = RunSession.open(config.state, run_identity(settings, stream.fingerprint,
                                                         weights_hash(model)))
    session.add_time("load", time.perf_counter() - clock)
    with session.signals():
        return _run_phases(config, model, checkpoint, stream, session)


def _run_phases(config: RunConfig, model, checkpoint: str, stream: Stream,
                session: RunSession) -> tuple[RunSummary, Path]:
    """Every phase of a run, each read back from ``session`` when it is done already."""
    out_dir = Path(config.out) if config.out else session.out_dir(lambda: _default_out(stream))
    thresholds = build_policy(config).thresholds_tensor(model.num_exits)
    before = session.phase("curves_before", lambda: _eval_sets(model, stream, config, "before"),
                           _passes_state, _passes_from_state)
    budget, streamed = budget_phase(config, session, model, checkpoint, stream)
    base_heads = {k: v.clone() for k, v in model.heads.state_dict().items()}
    frozen = None
    if config.evaluation.frozen_replay:
        frozen = session.phase(
            "stream_frozen",
            lambda: _replay(model, stream, config, session, specialize=False, budget=budget),
            Replay.state_dict, Replay.from_state_dict)
    special = session.phase(
        "stream_specializing",
        lambda: _replay(model, stream, config, session, specialize=True, budget=budget),
        Replay.state_dict, Replay.from_state_dict)
    after = session.phase("curves_after",
                          lambda: _curves_after(model, stream, config, special, before),
                          _passes_state, _passes_from_state)
    streamed_after = None
    if config.policy.budget is not None:  # the specialized hindsight, heads as served
        streamed_after = session.phase(
            "stream_pass_after",
            lambda: specialized_stream_pass(model, streamed, stream, config),
            pass_state, lambda state: ExitPass(**state))
    unanchor_heads(model)  # an anchored strategy wrapped the early heads
    records = RunRecords(checkpoint=checkpoint, measure=config.policy.measure,
                         thresholds=thresholds, before=before, after=after,
                         specializing=special, frozen=frozen, timings=dict(session.timings),
                         trained_on=training_data(read_checkpoint(checkpoint)))
    if budget is not None:
        records.budget = budget_section(config, budget, records, streamed, streamed_after)
    summary = build_summary(config, model, stream, records)
    model.heads.load_state_dict(base_heads)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(summary, out_dir)
    atomic_write_bytes(out_dir / "config.yaml",
                       yaml.safe_dump(to_dict(config), sort_keys=False).encode())
    atomic_torch_save(special.heads, out_dir / "specialized_heads.pt")
    return summary, out_dir


def build_run_stream(config: RunConfig, model: MultiExitModel) -> Stream:
    """The stream of a run config, its inputs shaped and normalised as ``model`` expects."""
    return fit_inputs(build_stream(config.scenario), model)


def fit_inputs(stream: Stream, model: MultiExitModel) -> Stream:
    """``stream`` (samples shared) with its inputs shaped and normalised as ``model`` expects."""
    options = model_input_options(model)
    fitted = copy.copy(stream)
    fitted.transform = InputTransform(
        stream.transform.mean if options["mean"] is None else options["mean"],
        stream.transform.std if options["std"] is None else options["std"],
        in_chans=options["in_chans"], size=options["input_size"],
        interpolation=options["interpolation"])
    return fitted


def build_policy(config: RunConfig) -> ExitPolicy:
    """The exit policy of a run config (``config.policy``; kept for scripts)."""
    return config.policy


def build_specializer(model, config: RunConfig, updater: HeadUpdater | None,
                      tracker: ClassCostTracker | None = None,
                      hooks: Iterable[StepHook] = (), controller: Any = None,
                      audit_temperature: float = 1.0) -> Specializer:
    """A specializer wired as the run config says: policy, alarm, executor, inputs, audits.

    Audits (``engine.audit_rate``) are drawn with the scenario's seed, so both replays of a
    stream audit the same positions.

    Args:
        model: The multi-exit model.
        config: The run config (its policy, drift and engine sections are read).
        updater: The head updater, or ``None`` for a frozen replay.
        tracker: Per-class compute tracker (default: one with ``drift.window`` and
            ``drift.max_windows``).
        hooks: More step hooks (e.g. the evaluator's :class:`OnlineScore`).
        controller: The budget controller (``specialize.run.budget.BudgetInputs``), or
            ``None`` for fixed thresholds.
        audit_temperature: Temperature of the audits' belief estimate.

    Returns:
        The specializer; it serves with ``engine.num_threads`` torch threads.
    """
    alarm = None
    if config.drift.alarm == "class_mix":
        alarm = ClassMixDriftDetector(model.num_classes, config.drift.alarm_window,
                                      config.drift.alarm_threshold)
    tracker = tracker or ClassCostTracker(model.num_classes, model.num_exits,
                                          config.drift.window, config.drift.max_windows)
    return Specializer(model, build_policy(config), updater, tracker=tracker, alarm=alarm,
                       reset_on_alarm=config.drift.reset_on_alarm,
                       step_fn=make_step_fn(model, config.engine.executor),
                       on_bad_input=config.engine.on_bad_input, hooks=hooks,
                       max_alarms=config.drift.max_alarms, audit_rate=audit_rate(config),
                       audit_seed=int(config.scenario.get("seed", 0)),
                       audit_temperature=audit_temperature, controller=controller,
                       num_threads=config.engine.num_threads)


def serve_stream(specializer: Specializer, stream: Stream, config: RunConfig,
                 desc: str = "stream", **options: Any) -> EngineResult:
    """Run ``specializer`` over ``stream`` with the config's batch size (and closes it).

    The torch threads are the specializer's own (:func:`build_specializer` passes
    ``engine.num_threads``).

    Args:
        specializer: What to run (closed afterwards).
        stream: The stream.
        config: The run config (engine batch size and threads, progress).
        desc: Progress bar label.
        **options: More keyword arguments of :meth:`Specializer.run` (``keep_records``,
            ``result``, ``save_every``, ``on_save``, ``should_stop``).
    """
    try:
        return specializer.run(stream, batch_size=config.engine.batch_size,
                               progress=config.progress, desc=desc, **options)
    finally:
        specializer.close()


def _eval_sets(model, stream: Stream, config: RunConfig, phase: str,
               before: EvalSplits[ExitPass] | None = None) -> EvalSplits[ExitPass]:
    """Every exit over eval_in and eval_out.

    Given ``before``, only the heads run again, on its cached head inputs (the backbone is
    frozen): the same numbers at a fraction of the cost.
    """
    passes = {}
    for split, data in (("in", stream.eval_in), ("out", stream.eval_out)):
        previous = None if before is None else getattr(before, f"eval_{split}")
        rerun = None if previous is None else rerun_heads(model, previous, config.policy.measure)
        passes[split] = rerun if rerun is not None or data is None else exit_pass(
            model, data.images, data.labels, stream.transform, measure=config.policy.measure,
            batch_size=config.evaluation.batch_size, progress=config.progress,
            desc=f"eval_{split} ({phase})", keep_head_inputs=before is None,
        )
    return EvalSplits(passes["in"], passes["out"])


def _curves_after(model, stream: Stream, config: RunConfig, special: Replay,
                  before: EvalSplits[ExitPass]) -> EvalSplits[ExitPass]:
    serve_heads_state(model, special.heads)  # a no-op unless resumed after the replay
    return _eval_sets(model, stream, config, "after", before)


def _passes_state(passes: EvalSplits[ExitPass]) -> dict[str, Any]:
    # cached head inputs stay in memory (a resumed run recomputes the curves in full)
    return {split: None if p is None else {f.name: getattr(p, f.name)
                                           for f in dataclasses.fields(p)
                                           if f.name != "head_inputs"}
            for split, p in (("in", passes.eval_in), ("out", passes.eval_out))}


def _passes_from_state(state: dict[str, Any]) -> EvalSplits[ExitPass]:
    return EvalSplits(*(None if state[split] is None else ExitPass(**state[split])
                        for split in ("in", "out")))



def _replay(model, stream: Stream, config: RunConfig, session: RunSession, *,
            specialize: bool, budget: BudgetInputs | None = None) -> Replay:
    """Replay the stream, frozen or specializing; resumes the progress ``session`` holds.

    ``budget``: the validation pass of the budget controller and the audits' temperature.
    """
    name = "stream_specializing" if specialize else "stream_frozen"
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    updater = HeadUpdater(model, config.updater) if specialize else None
    tracker = ClassCostTracker(model.num_classes, model.num_exits, config.drift.window,
                               config.drift.max_windows)
    score = OnlineScore(stream.evaluator().labels)  # evaluation side: labels stay here
    specializer = build_specializer(
        model, config, updater, tracker, hooks=[score],
        controller=None if budget is None else budget.controller(),
        audit_temperature=1.0 if budget is None or not audit_rate(config)
        else budget.temperature)
    result = EngineResult(model.num_exits, keep_records=False)
    saved = session.progress(name)
    if saved is not None:
        specializer.load_state_dict(saved["specializer"], stream, where=str(session.path))
        result.load_state_dict(saved["result"])
        score.load_state_dict(saved["score"])

    def save() -> None:
        if specializer.position == len(stream) and not session.stop_requested():
            return  # the phase's end saves next
        session.save_progress(name, {"specializer": specializer.state_dict(stream),
                                     "result": result.state_dict(),
                                     "score": score.state_dict()})

    persistent = ({"save_every": config.save_interval, "on_save": save} if session.persistent
                  else {})
    with session.deferred():
        serve_stream(specializer, stream, config, name.removeprefix("stream_"), result=result,
                     should_stop=session.stop_requested, **persistent)
    session.raise_if_stopped()
    tracker.close_window()
    stats = None if updater is None else UpdaterStats(**updater.stats())
    hook = specializer.alarm_hook
    replay = Replay(
        record=stream_record(result, score, stats), tracker=tracker, heads=heads_state(model),
        exit_flops=[int(info["flops"]) for info in model.exit_info],
        alarms=hook.alarms if hook else [], updater=stats, alarm_count=hook.count if hook else 0,
        budget=budget_replay(specializer, result),
    )
    if updater is None:
        model.heads.load_state_dict(heads_before)
    return replay


def _default_out(stream: Stream) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stream.name}-{stamp}"


def headline(summary: RunSummary, out_dir: Path) -> str:
    """The lines printed at the end of a run."""
    return format_headline(summary, report_dir=out_dir)
