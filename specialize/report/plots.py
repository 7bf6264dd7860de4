"""The report's PNG plots, each drawn from a run summary on a standalone figure.

Every plot is drawn on a :class:`matplotlib.figure.Figure` rendered by the Agg canvas, so
nothing here touches pyplot's global state or needs a screen. A missing section never fails a
plot: the panel says what is missing instead.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.cost import FlopsUnit, format_flops
from specialize.report.common import (
    NO_EVAL_OUT,
    PHASES,
    SPLITS,
    class_names,
    finite,
    floats,
    report_unit,
    stream_classes,
)
from specialize.summary import (
    BeforeAfter,
    Curve,
    DriftWindow,
    EvalSplits,
    RunSummary,
    Split,
    StreamSection,
    as_run_summary,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 120
MAX_CLASSES_SHOWN = 24  # per-class plots of many-class data sets show this many classes
PLOT_FILES = {
    "curves": "curves.png",
    "exit_histogram": "exit_histogram.png",
    "per_class_flops": "per_class_flops.png",
    "drift": "drift.png",
}
IN_STREAM_SHADE = "#fff1c1"


def _figure(ncols: int = 1, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def render_png(figure: Figure) -> bytes:
    """The figure as PNG bytes (at :data:`DPI`)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _empty_panel(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------- curves
def plot_curves(summary: RunSummary | Mapping[str, Any]) -> Figure:
    """Cost/accuracy curves on eval_in and eval_out: before, after and the oracle.

    Before is solid, after dashed, the oracle dotted; markers show the run's thresholds; the
    eval_in panel carries the iso-accuracy target as a horizontal line.
    """
    summary = as_run_summary(summary)
    unit = report_unit(summary)
    figure, axes = _figure(ncols=2, size=(12.0, 4.8))
    for ax, split in zip(axes, SPLITS, strict=True):
        _plot_curve_panel(ax, summary, split, unit)
    figure.suptitle(f"Cost/accuracy before and after specialization ({unit.name}, mul-add = 2)")
    return figure


def _plot_curve_panel(ax: Axes, summary: RunSummary, split: Split, unit: FlopsUnit) -> None:
    ax.set_title(SPLITS[split])
    phases = summary.curves or BeforeAfter()
    curves: dict[str, Curve | None] = {
        "before": (phases.before or EvalSplits()).at(split),
        "after": (phases.after or EvalSplits()).at(split),
        "oracle": (summary.oracle or EvalSplits()).at(split),
    }
    if not any(curves.values()):
        _empty_panel(ax, NO_EVAL_OUT if split == "eval_out" else "no eval_in curve in the summary")
        return
    for phase, points in curves.items():
        if points:
            label, style, colour = PHASES[phase]
            points = sorted(points, key=lambda p: math.inf if p.flops is None else p.flops)
            x, y = floats(p.flops for p in points), floats(p.accuracy for p in points)
            ax.plot(unit.convert(x), y, linestyle=style, color=colour, marker=".", label=label)
    _plot_operating_points(ax, summary, split, unit)
    if split == "eval_in":
        _plot_iso_target(ax, summary, unit)
    ax.set_xlabel(f"mean {unit.name} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _plot_operating_points(ax: Axes, summary: RunSummary, split: Split, unit: FlopsUnit) -> None:
    for (phase, splits), marker in zip((summary.operating_points or BeforeAfter()).items(),
                                       ("o", "s"), strict=True):
        point = splits.at(split) if splits else None
        if point and finite(point.flops) and finite(point.accuracy):
            ax.scatter(
                unit.convert(point.flops),
                point.accuracy,
                marker=marker,
                s=60,
                color=PHASES[phase][2],
                edgecolors="black",
                zorder=5,
                label=f"{phase} @ run thresholds",
            )


def _plot_iso_target(ax: Axes, summary: RunSummary, unit: FlopsUnit) -> None:
    iso = summary.iso_accuracy
    if iso is None or not finite(iso.target_accuracy):
        return
    target = iso.target_accuracy
    label = f"iso-accuracy target {target:.2f}%"
    if finite(iso.flops_ratio):
        label += f" (flops_ratio {iso.flops_ratio:.3f})"
    ax.axhline(target, color="tab:red", linewidth=1.0, alpha=0.7, label=label)
    at_target = {"before": iso.flops_before, "after": iso.flops_after, "oracle": iso.flops_oracle}
    for phase, flops in at_target.items():
        if finite(flops):
            ax.plot(unit.convert(flops), target, marker="x", markersize=9, color=PHASES[phase][2])


# ---------------------------------------------------------------------------- exit histogram
def plot_exit_histogram(summary: RunSummary | Mapping[str, Any]) -> Figure:
    """Share of stream samples per exit: frozen vs specializing; first vs last drift window."""
    summary = as_run_summary(summary)
    history = summary.drift.history if summary.drift else []
    figure, axes = _figure(ncols=2 if len(history) >= 2 else 1, size=(12.0, 4.5))
    stream = summary.stream or StreamSection()
    bars = {
        "frozen": stream.frozen.exit_histogram if stream.frozen else None,
        "specializing": stream.specializing.exit_histogram if stream.specializing else None,
    }
    _plot_share_bars(axes[0], summary, bars, "Exits taken over the stream")
    if len(history) >= 2:
        ends = (("first", history[0]), ("last", history[-1]))
        windows = {_window_label(which, window): window.exit_histogram for which, window in ends}
        title = f"First vs last window ({summary.drift.window} samples)"
        _plot_share_bars(axes[1], summary, windows, title)
    return figure


def _window_label(which: str, window: DriftWindow) -> str:
    start, end = ("?" if v is None else v for v in (window.start, window.end))
    return f"{which} window (samples {start}-{end})"


def _plot_share_bars(
    ax: Axes, summary: RunSummary, bars: Mapping[str, Sequence[int] | None], title: str
) -> None:
    ax.set_title(title)
    bars = {label: floats(counts) for label, counts in bars.items() if counts}
    if not bars:
        _empty_panel(ax, "no exit histogram in the summary")
        return
    num_exits = max(len(counts) for counts in bars.values())
    x, width = np.arange(num_exits), 0.8 / len(bars)
    for i, (label, counts) in enumerate(bars.items()):
        share = 100.0 * counts / max(counts.sum(), 1.0)
        ax.bar(x[: len(share)] + (i - (len(bars) - 1) / 2) * width, share, width, label=label)
    ax.set_xticks(x, _exit_labels(summary, num_exits))
    ax.set_ylabel("share of samples (%)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _exit_labels(summary: RunSummary, num_exits: int) -> list[str]:
    unit = report_unit(summary)
    exit_flops = summary.model.exit_flops if summary.model else []
    labels = []
    for k in range(num_exits):
        cost = exit_flops[k] if k < len(exit_flops) else None
        labels.append(f"exit {k}" + (f"\n{format_flops(cost, unit)}" if finite(cost) else ""))
    return labels


# ------------------------------------------------------------------------- per-class FLOPs
def plot_per_class_flops(summary: RunSummary | Mapping[str, Any]) -> Figure:
    """Per-class mean FLOPs before and after specialization; in-stream classes shaded.

    With more than ``MAX_CLASSES_SHOWN`` classes, the stream's classes and the other classes
    whose cost changed most are shown (the title says how many are left out).
    """
    summary = as_run_summary(summary)
    rows, hidden = _rows_shown(summary.per_class)
    figure, (ax,) = _figure(size=(max(7.0, 0.7 * len(rows) + 3.0), 4.8))
    ax.set_title("Per-class mean FLOPs before and after specialization (run's thresholds)"
                 + (f"; {hidden} other classes with smaller changes not shown" if hidden else ""),
                 fontsize=9 if hidden else None)
    if not rows:
        _empty_panel(ax, "no per-class results in the summary")
        return figure
    unit = report_unit(summary)
    x = np.arange(len(rows))
    for row, position in zip(rows, x, strict=True):
        if row.in_stream:
            ax.axvspan(position - 0.5, position + 0.5, color=IN_STREAM_SHADE, zorder=0)
    for offset, phase in ((-0.2, "before"), (0.2, "after")):
        flops = (row.flops_before if phase == "before" else row.flops_after for row in rows)
        ax.bar(x + offset, unit.convert(floats(flops)), 0.4, label=phase,
               color=PHASES[phase][2], zorder=2)
    names = [str(row.name or f"class {row.class_id}") for row in rows]
    ax.set_xticks(x, names, rotation=35, ha="right")
    for label, row in zip(ax.get_xticklabels(), rows, strict=True):
        label.set_fontweight("bold" if row.in_stream else "normal")
    from matplotlib.patches import Patch

    handles = [*ax.get_legend_handles_labels()[0], Patch(color=IN_STREAM_SHADE, label="in stream")]
    ax.legend(handles=handles, fontsize=8)
    ax.set_ylabel(f"mean {unit.name} per sample")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.grid(axis="y", alpha=0.3, zorder=1)
    return figure


def _rows_shown(rows: list[Any]) -> tuple[list[Any], int]:
    """At most ``MAX_CLASSES_SHOWN`` rows: the stream's, then the largest cost changes."""
    if len(rows) <= MAX_CLASSES_SHOWN:
        return rows, 0
    in_stream = [row for row in rows if row.in_stream]

    def change(row: Any) -> float:
        before, after = row.flops_before, row.flops_after
        return 0.0 if before is None or after is None else abs(after - before)

    others = sorted((row for row in rows if not row.in_stream), key=change, reverse=True)
    kept = {id(row) for row in [*in_stream, *others][:max(MAX_CLASSES_SHOWN, len(in_stream))]}
    shown = [row for row in rows if id(row) in kept]
    return shown, len(rows) - len(shown)


# ----------------------------------------------------------------------------------- drift
def plot_drift(summary: RunSummary | Mapping[str, Any]) -> Figure:
    """Mean FLOPs per drift window: one line per predicted class, plus all samples."""
    summary = as_run_summary(summary)
    history = summary.drift.history if summary.drift else []
    window = summary.drift.window if summary.drift else None
    figure, (ax,) = _figure(size=(11.0, 4.8))
    ax.set_title(f"Compute drift per predicted class (windows of {window} samples)")
    if not history:
        _empty_panel(ax, f"no closed drift window (the stream is shorter than {window} samples?)")
        return figure
    unit = report_unit(summary)
    ends = floats(i if entry.end is None else entry.end for i, entry in enumerate(history))
    per_window = [entry.mean_flops for entry in history]
    classes = _drift_classes(history, stream_classes(summary))
    hidden = len(set().union(*per_window)) - len(classes)
    if hidden:
        ax.set_title(f"Compute drift per predicted class (windows of {window} samples; "
                     f"{hidden} rarely predicted classes not drawn)", fontsize=9)
    names, in_stream = class_names(summary, max(classes, default=-1) + 1), stream_classes(summary)
    colours = _class_colours(len(names))
    for c in classes:
        values = unit.convert(floats(means.get(c) for means in per_window))
        style = {"linestyle": "-", "linewidth": 1.6} if c in in_stream else {"linestyle": "--"}
        label = names[c] + (" (in stream)" if c in in_stream else "")
        ax.plot(ends, values, marker="o", markersize=3, color=colours[c], label=label, **style)
    overall = unit.convert(floats(entry.mean_flops_all for entry in history))
    ax.plot(ends, overall, color="black", linewidth=2.5, label="all samples")
    ax.set_xlabel("stream position (samples, end of window)")
    ax.set_ylabel(f"mean {unit.name} per sample")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return figure


def _drift_classes(history: list[DriftWindow], in_stream: set[int] | Any) -> list[int]:
    """The classes to draw: every one, or the stream's and the most predicted others."""
    seen = set().union(*(entry.mean_flops for entry in history))
    if len(seen) <= MAX_CLASSES_SHOWN:
        return sorted(seen)
    totals: dict[int, int] = {}
    for entry in history:
        for c, count in entry.counts.items():
            totals[c] = totals.get(c, 0) + count
    others = sorted((c for c in seen if c not in in_stream), key=lambda c: -totals.get(c, 0))
    chosen = [c for c in seen if c in in_stream]
    return sorted(chosen + others[:max(0, MAX_CLASSES_SHOWN - len(chosen))])


def _class_colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


PLOTTERS: dict[str, Callable[[RunSummary], Figure]] = {
    "curves": plot_curves,
    "exit_histogram": plot_exit_histogram,
    "per_class_flops": plot_per_class_flops,
    "drift": plot_drift,
}
