"""The report's budget part: thresholds over time, audits, estimates beside the truth.

Drawn only from the summary's ``budget`` section (``specialize.summary.BudgetSection``); a run
without a budget and without audits has no such section and none of this appears.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from backbones.cost import FlopsUnit
from specialize.report.common import num, pct, pt, report_unit
from specialize.summary import BudgetReplay, BudgetSection, RunSummary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THRESHOLDS_FILE = "thresholds.png"
REPLAYS = ("frozen", "specializing")


def budget_headline(summary: RunSummary) -> str | None:
    """The headline line of a budget run: the stream saving, label-free (``None``: no budget)."""
    section = summary.budget
    if section is None or section.budget is None or section.specializing is None:
        return None
    unit = report_unit(summary)
    special, frozen = section.specializing, section.frozen
    text = (f"stream at a budget of {num(section.budget, 2)} pt (label-free): "
            f"{unit.format(special.mean_flops)} {unit.name} per sample specializing")
    if frozen is not None:
        text += (f" vs {unit.format(frozen.mean_flops)} frozen (ratio "
                 f"{num(section.flops_ratio, 3)})")
    return text + (f"; estimated drop {pt(special.estimated_drop)} "
                   f"(bound {pt(special.estimated_bound)}), true {pt(special.true_drop_stream)}")


def md_budget(summary: RunSummary, unit: FlopsUnit) -> list[str]:
    """The report.md section (empty without a ``budget`` section)."""
    section = summary.budget
    if section is None:
        return []
    lines = ["## Operating point: budget and audits", "", _md_settings(section), ""]
    replays = [(name, getattr(section, name)) for name in REPLAYS
               if getattr(section, name) is not None]
    rows = [
        [f"mean {unit.name} per sample (audits included)",
         *(unit.format(r.mean_flops) for _, r in replays)],
        ["thresholds at the end", *(_thresholds(r) for _, r in replays)],
        ["threshold choices", *(_count(r.retunes) for _, r in replays)],
        ["estimated drop (validation, stream mix)", *(pt(r.estimated_drop) for _, r in replays)],
        ["... its upper bound", *(pt(r.estimated_bound) for _, r in replays)],
        ["audits", *(_count(r.audits) for _, r in replays)],
        ["audit FLOPs share of the stream", *(pct(_percent(r.audit_flops_share))
                                              for _, r in replays)],
        ["disagreement with the final exit (audits)", *(pct(r.disagreement) for _, r in replays)],
        ["belief estimate of the drop (audits)", *(_belief(r) for _, r in replays)],
        ["rollbacks by audits", *(_count(r.audit_rollbacks) for _, r in replays)],
        ["**true** drop on the stream (labels)", *(pt(r.true_drop_stream) for _, r in replays)],
        ["**true** drop on eval_in (labels)", *(pt(r.true_drop_eval_in) for _, r in replays)],
    ]
    lines += ["| | " + " | ".join(name for name, _ in replays) + " |",
              "|---|" + "---|" * len(replays)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if section.hindsight:
        lines += ["", _md_hindsight(section, unit)]
    if section.budget is not None:
        lines += ["", f"![Thresholds over time]({THRESHOLDS_FILE})"]
    return lines


def _md_settings(section: BudgetSection) -> str:
    if section.budget is None:
        head = "Fixed thresholds (no budget)"
    else:
        head = (f"Budget {num(section.budget, 2)} pt against the final exit at "
                f"{num(100 * (section.confidence or math.nan), 0)} % confidence "
                f"(z = {num(section.z, 3)}), re-chosen every {section.retune_every} samples "
                f"from {_count(section.validation_samples)} validation samples")
    return (f"{head}; audits: {num(100 * (section.audit_rate or 0.0), 1)} % of samples, "
            f"final exit temperature {num(section.temperature, 2)}. The final exit answers "
            f"{pct(section.final_exit_stream_accuracy)} of the stream right (labels, "
            "evaluation side only: the engine never sees them).")


def _md_hindsight(section: BudgetSection, unit: FlopsUnit) -> str:
    parts = []
    for key, label in (("budget", "frozen heads within the budget"),
                       ("same_drop", "frozen heads at the frozen controller's true drop"),
                       ("budget_per_exit", "frozen heads, one threshold per exit"),
                       ("specialized", "the specialized heads within the budget"),
                       ("specialized_per_exit", "the specialized heads, one threshold per exit"),
                       ("specialized_eval_in", "the specialized heads on eval_in (held out)"),
                       ("specialized_eval_in_per_exit",
                        "the specialized heads on eval_in, one threshold per exit")):
        point = section.hindsight.get(key)
        if point:
            parts.append(f"{label}: threshold {_hindsight_thresholds(point.get('threshold'))}, "
                         f"{unit.format(point.get('mean_flops'))} {unit.name} "
                         f"(true drop {pt(point.get('drop'))})")
    return ("Hindsight (labels, offline, on the stream's samples, no audits; the specialized "
            "heads are the replay's last ones, as if they had served the whole stream): the "
            "cheapest thresholds, " + "; ".join(parts) + ".")


def _hindsight_thresholds(value: float | list[float | None] | None) -> str:
    if isinstance(value, list):
        return "[" + ", ".join("off" if t is None else num(t, 3) for t in value) + "]"
    return num(value, 3)


def _threshold_series(history: list[dict]) -> list[list[float]]:
    """Per early exit, its threshold at every choice (NaN: off); old histories: the shared one."""
    rows = [h.get("thresholds") or [h["threshold"]] for h in history]
    count = max(len(row) for row in rows)
    return [[math.nan if k >= len(row) or row[k] is None else row[k] for row in rows]
            for k in range(count)]


def _thresholds(replay: BudgetReplay) -> str:
    values = [("off" if t is None else num(t, 3)) for t in replay.thresholds]
    if len(set(values)) == 1:
        return values[0]
    return " / ".join(values) if values else "n/a"


def _count(value: int | None) -> str:
    return "n/a" if value is None else str(value)


def _percent(share: float | None) -> float | None:
    return None if share is None else 100.0 * share


def _belief(replay: BudgetReplay) -> str:
    if replay.belief_drop is None:
        return "n/a"
    return f"{pt(replay.belief_drop)} ± {num(replay.belief_drop_se, 2)}"


def plot_thresholds(summary: RunSummary) -> Figure:
    """The thresholds the controller chose over the stream, frozen and specializing."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9.0, 4.2), dpi=120, layout="constrained")
    ax = figure.subplots()
    section = summary.budget
    ax.set_title(f"Thresholds over time (budget {num(section.budget, 2)} pt)")
    end = (summary.scenario.length if summary.scenario and summary.scenario.length else None)
    colors = ("C0", "C1", "C2", "C3", "C4", "C5")
    for name, style in zip(REPLAYS, ("--", "-")):
        replay = getattr(section, name)
        if replay is None or not replay.history:
            continue
        positions = [h["position"] for h in replay.history]
        if end is not None and end > positions[-1]:
            positions = positions + [end]
        for k, series in enumerate(_threshold_series(replay.history)):
            if len(series) < len(positions):
                series = series + [series[-1]]
            ax.step(positions, series, where="post", linestyle=style,
                    color=colors[k % len(colors)], label=f"{name}, exit {k + 1}")
        for h in replay.history:
            if h["trigger"] in ("drift", "rollback"):
                ax.axvline(h["position"], color="grey", alpha=0.4, linewidth=0.8)
    ax.set_xlabel("stream position (samples)")
    ax.set_ylabel("threshold (off: not drawn)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return figure
