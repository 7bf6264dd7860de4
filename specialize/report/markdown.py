"""The report's text: ``report.md`` and the headline printed at the end of a run."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from backbones.cost import FlopsUnit
from specialize.report.budget import budget_headline, md_budget
from specialize.report.common import (
    FLOPS_NOTE,
    NO_EVAL_OUT,
    class_names,
    finite,
    has_eval_out,
    num,
    pct,
    pt,
    report_unit,
)
from specialize.report.plots import PLOT_FILES
from specialize.summary import (
    ClassRow,
    EvalSplits,
    ModelSummary,
    OperatingPoint,
    RunSummary,
    StreamRecord,
    UpdaterStats,
    as_run_summary,
)

PLOT_CAPTIONS = {
    "curves": "Cost/accuracy curves (before solid, after dashed, oracle dotted)",
    "exit_histogram": "Exit histogram over the stream",
    "per_class_flops": "Per-class mean FLOPs before and after",
    "drift": "Compute drift per predicted class over the stream",
}


# -------------------------------------------------------------------------------- headline
def format_headline(summary: RunSummary | Mapping[str, Any],
                    report_dir: str | Path | None = None) -> str:
    """A few lines for the end of a run: where the report is and the headline numbers.

    Args:
        summary: The run's summary (or its JSON form).
        report_dir: The run folder, if the report was written.

    Returns:
        Lines separated by newlines (no trailing newline).
    """
    summary = as_run_summary(summary)
    unit = report_unit(summary)
    iso = summary.iso_accuracy
    lines = [f"report: {Path(report_dir) / 'report.md'}"] if report_dir is not None else []
    failure = updater_failure(summary)
    if failure:
        lines.append(f"UPDATER FAILED: {failure}")
    if iso:
        lines.append(
            f"iso-accuracy on eval_in (target {pct(iso.target_accuracy)}): "
            f"{unit.format(iso.flops_before)} -> {unit.format(iso.flops_after)} "
            f"{unit.name} per sample (flops_ratio {num(iso.flops_ratio, 3)}; "
            f"oracle {unit.format(iso.flops_oracle)}, "
            f"gap_closed {num(iso.gap_closed, 2)})"
        )
    else:
        lines.append("iso-accuracy: not computed")
    lines.append(_eval_out_sentence(summary))
    budget = budget_headline(summary)
    if budget:
        lines.append(budget)
    return "\n".join(lines)


def updater_failure(summary: RunSummary | Mapping[str, Any]) -> str | None:
    """What to say when the run's background updater failed (``None`` when it did not)."""
    summary = as_run_summary(summary)
    error = summary.updater.error if summary.updater else None
    if not error:
        return None
    return (f"the background updater stopped with {error}. Specialization ended there: the "
            "heads served afterwards, and measured by the 'after' figures, are the last ones "
            "published before the failure, so this run does not show what specialization "
            "would have reached.")


def _eval_out_sentence(summary: RunSummary) -> str:
    change = summary.eval_out_accuracy_change
    if change is None and not has_eval_out(summary):
        return f"eval_out: {NO_EVAL_OUT}"
    return f"eval_out accuracy change at the run's thresholds: {pt(change)}"


# -------------------------------------------------------------------------------- report.md
def render_markdown(summary: RunSummary | Mapping[str, Any]) -> str:
    """The human report: scenario, model, headline, stream, per class, plots, timings."""
    summary = as_run_summary(summary)
    unit = report_unit(summary)
    name = (summary.scenario and summary.scenario.name) or "unnamed run"
    lines = [f"# Test-time specialization report: {name}", ""]
    failure = updater_failure(summary)
    if failure:
        lines += [f"> **Warning: the run's updater failed.** {failure[0].upper()}{failure[1:]}",
                  ""]
    lines += [FLOPS_NOTE, ""]
    for section in (
        _md_scenario,
        _md_model,
        _md_headline,
        _md_operating_points,
        _md_stream,
        *([md_budget] if summary.budget is not None else []),
        _md_per_class,
        _md_plots,
        _md_timings,
        _md_versions,
    ):
        lines += section(summary, unit) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _md_scenario(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    scenario = summary.scenario.to_json_dict() if summary.scenario else {}
    if not scenario:
        return ["## Scenario", "", "not recorded"]
    classes = summary.scenario.classes or []
    names = class_names(summary, max(classes, default=-1) + 1)
    listed = ", ".join(f"{c} ({names[c]})" for c in classes) or "n/a"
    lines = ["## Scenario", ""]
    lines += [f"- **{key}**: {scenario[key]}" for key in ("name", "scenario") if key in scenario]
    lines.append(f"- **stream classes**: {listed}")
    lines += [f"- **{key}**: {value}" for key, value in scenario.items()
              if key not in ("name", "scenario", "classes")]
    return lines


def _md_model(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    model = summary.model or ModelSummary()
    lines = ["## Model and thresholds", ""]
    facts = {"name": model.name, "gating": model.gating, "checkpoint": model.checkpoint,
             "num_exits": model.num_exits}
    lines += [f"- **{key}**: {value}" for key, value in facts.items() if value is not None]
    lines += _md_training_data(model)
    exit_flops, thresholds = model.exit_flops, summary.thresholds
    accuracy = model.exit_accuracy or []
    num_exits = max(len(exit_flops), len(thresholds), len(accuracy))
    if not num_exits:
        return lines + ["", "no per-exit information recorded"]
    rows = []
    for k in range(num_exits):
        last = k == num_exits - 1
        threshold = "last exit answers" if last else _at(thresholds, k, lambda v: num(v, 3))
        rows.append([k, threshold, _at(exit_flops, k, unit.format), _at(accuracy, k, pct)])
    headers = ["exit", "threshold", f"{unit.name} to reach (full path)", "accuracy of exit"]
    return lines + [""] + _table(headers, rows)


def _md_training_data(model: ModelSummary) -> list[str]:
    if not model.trained_on:
        return []
    overlap = {True: "the stream and its held-out sets come from a split that SHARES images "
                     "with them",
               False: "no stream or held-out sample is one of them",
               None: "whether the stream's split shares images with them is not known"}
    return [f"- **trained on**: {', '.join(model.trained_on)} "
            f"({overlap[model.stream_shares_training_images]})"]


def _at(values: Sequence[Any], index: int, fmt: Callable[[Any], str]) -> str:
    return fmt(values[index]) if index < len(values) else "n/a"


def _md_headline(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    iso = summary.iso_accuracy
    lines = ["## Headline: compute at equal accuracy on eval_in", ""]
    if not iso:
        return lines + ["iso-accuracy comparison not computed"]
    gap = iso.gap_closed
    gap_text = f"{100 * gap:.0f}% of the gap to the oracle" if finite(gap) else "n/a of the gap"
    lines.append(
        f"At {pct(iso.target_accuracy)} accuracy on the stream's classes (eval_in), the "
        f"specialized model needs {unit.format(iso.flops_after)} {unit.name} per sample instead "
        f"of {unit.format(iso.flops_before)} (flops_ratio {num(iso.flops_ratio, 3)}); the oracle "
        f"exit choice needs {unit.format(iso.flops_oracle)}, so specialization closed "
        f"{gap_text} (gap_closed {num(gap, 2)}). {_eval_out_prose(summary)}"
    )
    headers = ["target accuracy", f"{unit.name} before", f"{unit.name} after",
               f"{unit.name} oracle", "flops_ratio", "gap_closed", "eval_out accuracy change"]
    change = summary.eval_out_accuracy_change
    row = [
        pct(iso.target_accuracy),
        unit.format(iso.flops_before),
        unit.format(iso.flops_after),
        unit.format(iso.flops_oracle),
        num(iso.flops_ratio, 3),
        num(gap, 2),
        pt(change) if has_eval_out(summary) or change is not None else NO_EVAL_OUT,
    ]
    notes = [
        "",
        "flops_ratio = after / before (below 1 is a saving); "
        "gap_closed = (before - after) / (before - oracle).",
    ]
    return lines + [""] + _table(headers, [row]) + notes


def _eval_out_prose(summary: RunSummary) -> str:
    change = summary.eval_out_accuracy_change
    if change is None and not has_eval_out(summary):
        return "The stream contains every class, so there are no held-out classes outside it."
    return (
        "On the classes outside the stream (eval_out), accuracy at the run's thresholds "
        f"changed by {pt(change)}."
    )


def _md_operating_points(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    lines = ["## At the run's thresholds", ""]
    points = summary.operating_points
    if not points:
        return lines + ["not recorded"]
    before, after = points.before or EvalSplits(), points.after or EvalSplits()
    rows = [_point_row("eval_in", before.eval_in, after.eval_in, unit)]
    if before.eval_out or after.eval_out:
        rows.append(_point_row("eval_out", before.eval_out, after.eval_out, unit))
    else:
        rows.append(["eval_out", NO_EVAL_OUT, "n/a", "n/a", "n/a"])
    headers = ["set", "accuracy before", f"{unit.name} before", "accuracy after",
               f"{unit.name} after"]
    return lines + _table(headers, rows)


def _point_row(label: str, before: OperatingPoint | None, after: OperatingPoint | None,
               unit: FlopsUnit) -> list[str]:
    cells = [label]
    for point in (before or OperatingPoint(), after or OperatingPoint()):
        cells += [pct(point.accuracy), unit.format(point.flops)]
    return cells


def _md_stream(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    lines = ["## Stream: frozen vs specializing", ""]
    if not summary.stream:
        return lines + ["not recorded"]
    runs = (summary.stream.frozen or StreamRecord(), summary.stream.specializing or StreamRecord())
    updates = runs[1].updates
    rows = [
        ["online accuracy", *(pct(run.accuracy) for run in runs)],
        [f"mean {unit.name} per sample", *(unit.format(run.mean_flops) for run in runs)],
        ["exit histogram (samples per exit)", *(_histogram(run) for run in runs)],
        ["samples per second", *(num(run.samples_per_second, 1) for run in runs)],
        ["head updates", "-", "n/a" if updates is None else str(updates)],
    ]
    lines += _table(["", "frozen", "specializing"], rows)
    health = _health_prose(summary.updater)
    return lines + (["", health] if health else [])


def _health_prose(stats: UpdaterStats | None) -> str | None:
    """When the health check rolled the heads back (``None``: no audit window closed)."""
    if stats is None or not (stats.healthy_windows or stats.degraded_windows):
        return None
    windows = (stats.healthy_windows or 0) + (stats.degraded_windows or 0)
    text = (f"Health check: {windows} audit windows closed, {stats.degraded_windows or 0} "
            f"degraded, {stats.rollbacks or 0} rollbacks")
    events = stats.rollback_events or []
    if events:
        text += ": " + "; ".join(_rollback_text(event) for event in events)
    if stats.bad_heads_injected:
        text += " (bad early heads were injected on purpose: `updater.inject_bad_head_at`)"
    return text + "."


def _rollback_text(event: Mapping[str, Any]) -> str:
    to = "the base heads" if event.get("to") == "base" else "the last good heads"
    return (f"after sample {event.get('observed')} (audited early answer "
            f"{event.get('audited')}; window disagreement "
            f"{pct(_percent(event.get('window_disagreement')))} vs baseline "
            f"{pct(_percent(event.get('baseline_disagreement')))}) to {to}")


def _percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def _histogram(run: StreamRecord) -> str:
    counts = run.exit_histogram
    return " / ".join(str(n) for n in counts) if counts else "n/a"


def _md_per_class(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    lines = ["## Per class", ""]
    if not summary.per_class:
        return lines + ["not recorded"]
    headers = [
        "class",
        "name",
        "in stream",
        f"{unit.name} before",
        f"{unit.name} after",
        "after / before",
        "accuracy before",
        "accuracy after",
        f"stream {unit.name}, first window",
        f"stream {unit.name}, last window",
    ]
    return lines + _table(headers, [_class_cells(row, unit) for row in summary.per_class])


def _class_cells(row: ClassRow, unit: FlopsUnit) -> list[Any]:
    before, after = row.flops_before, row.flops_after
    ratio = after / before if finite(before) and finite(after) and before > 0 else None
    return [
        "?" if row.class_id is None else row.class_id,
        "" if row.name is None else row.name,
        "yes" if row.in_stream else "no",
        unit.format(before),
        unit.format(after),
        num(ratio, 3),
        pct(row.accuracy_before),
        pct(row.accuracy_after),
        unit.format(row.stream_flops_first_window),
        unit.format(row.stream_flops_last_window),
    ]


def _md_plots(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    lines = ["## Plots", ""]
    for name, filename in PLOT_FILES.items():
        lines += [f"![{PLOT_CAPTIONS[name]}]({filename})", ""]
    return lines[:-1]


def _md_timings(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    if not summary.timings:
        return ["## Timings", "", "not recorded"]
    rows = [[name, num(seconds, 2)] for name, seconds in summary.timings.items()]
    return ["## Timings", ""] + _table(["step", "seconds"], rows)


def _md_versions(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    versions = summary.versions.to_json_dict() if summary.versions else {}
    listed = [f"- **{name}**: {value}" for name, value in versions.items() if value is not None]
    if not listed:
        return ["## Versions", "", "not recorded"]
    return ["## Versions", ""] + listed
