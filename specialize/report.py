"""Run folders: ``summary.json``, ``report.md`` and PNG plots from a run's summary dict.

:func:`write_report` is the one entry point the engine and the CLI call; the plot and
markdown functions are public too, for notebooks. Every plot is drawn on a standalone
:class:`matplotlib.figure.Figure` rendered by the Agg canvas, so nothing here touches pyplot's
global state or needs a screen. Missing or empty sections of the summary never fail a report:
the plot panel or table says what is missing instead.

FLOPs everywhere: a multiply-add counts 2 FLOPs, as ``torch.utils.flop_counter.FlopCounterMode``
counts them (papers that print MACs print half these figures).
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "PLOT_FILES",
    "format_headline",
    "plot_curves",
    "plot_drift",
    "plot_exit_histogram",
    "plot_per_class_flops",
    "render_markdown",
    "to_jsonable",
    "write_report",
]

DPI = 120
PLOT_FILES = {
    "curves": "curves.png",
    "exit_histogram": "exit_histogram.png",
    "per_class_flops": "per_class_flops.png",
    "drift": "drift.png",
}
NO_EVAL_OUT = "no held-out classes outside the stream"
FLOPS_NOTE = "FLOPs count a multiply-add as 2 (as torch.utils.flop_counter.FlopCounterMode does)."

_PHASES = {  # phase -> (label, line style, colour)
    "before": ("before", "-", "tab:blue"),
    "after": ("after", "--", "tab:orange"),
    "oracle": ("oracle", ":", "tab:gray"),
}
_SPLITS = {"in": "eval_in: classes in the stream", "out": "eval_out: classes outside the stream"}
_IN_STREAM_SHADE = "#fff1c1"


# ------------------------------------------------------------------------------ entry points
def write_report(summary: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write a run folder: ``summary.json``, ``report.md`` and the PNG plots.

    Every file is written atomically (temp file + ``os.replace``), so a reader never sees a
    half-written file and a crash leaves the previous version in place.

    Args:
        summary: The run's summary (the schema is documented in the README); ``NaN`` and
            infinities are written to JSON as ``null``.
        out_dir: Folder to write into; created if missing, existing files are replaced.

    Returns:
        Paths by name: ``summary``, ``report`` and the keys of :data:`PLOT_FILES`.

    Raises:
        TypeError: ``summary`` is not a mapping or holds a value JSON cannot represent.
    """
    if not isinstance(summary, Mapping):
        raise TypeError(f"summary must be a mapping, got {type(summary).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = to_jsonable(summary)
    paths = {"summary": out_dir / "summary.json", "report": out_dir / "report.md"}
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    _atomic_write(paths["summary"], text.encode())
    for name, plot in _PLOTTERS.items():
        paths[name] = out_dir / PLOT_FILES[name]
        _atomic_write(paths[name], _render_png(plot(clean)))
    _atomic_write(paths["report"], render_markdown(clean).encode())
    return paths


def format_headline(summary: Mapping[str, Any], report_dir: str | Path | None = None) -> str:
    """A few lines for the end of a run: where the report is and the headline numbers.

    Args:
        summary: The run's summary.
        report_dir: The run folder, if the report was written.

    Returns:
        Lines separated by newlines (no trailing newline).
    """
    summary = to_jsonable(summary)
    unit = _FlopsUnit.of(summary)
    iso = _section(summary, "iso_accuracy")
    lines = [f"report: {Path(report_dir) / 'report.md'}"] if report_dir is not None else []
    if iso:
        lines.append(
            f"iso-accuracy on eval_in (target {_pct(iso.get('target_accuracy'))}): "
            f"{unit.format(iso.get('flops_before'))} -> {unit.format(iso.get('flops_after'))} "
            f"{unit.name} per sample (flops_ratio {_num(iso.get('flops_ratio'), 3)}; "
            f"oracle {unit.format(iso.get('flops_oracle'))}, "
            f"gap_closed {_num(iso.get('gap_closed'), 2)})"
        )
    else:
        lines.append("iso-accuracy: not computed")
    lines.append(_eval_out_sentence(summary))
    return "\n".join(lines)


def _eval_out_sentence(summary: Mapping[str, Any]) -> str:
    change = summary.get("eval_out_accuracy_change")
    if change is None and not _has_eval_out(summary):
        return f"eval_out: {NO_EVAL_OUT}"
    return f"eval_out accuracy change at the run's thresholds: {_pt(change)}"


# ------------------------------------------------------------------------------------ JSON
def to_jsonable(value: Any, where: str = "summary") -> Any:
    """Plain JSON data from a summary: NaN/inf -> ``None``, numpy/torch -> Python, Path -> str.

    Args:
        value: Nested mappings, sequences, numbers, strings, numpy or torch values,
            dataclasses or paths.
        where: Name used in error messages (the path to the value).

    Returns:
        A structure ``json.dumps(..., allow_nan=False)`` accepts.

    Raises:
        TypeError: A value has no JSON representation.
    """
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_json_key(k, where): to_jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "tolist"):
        return to_jsonable(value.tolist(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value), where)
    raise TypeError(f"{where}: {type(value).__name__} cannot be written to JSON")


def _json_key(key: Any, where: str) -> str | int | float | bool | None:
    if key is None or isinstance(key, (str, int, float, bool)):
        return key
    if isinstance(key, np.generic):
        return key.item()
    raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} cannot be a JSON key")


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file next to ``path``, then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------- small helpers
def _section(summary: Mapping[str, Any], *keys: str) -> Any:
    """``summary[k1][k2]...``, or ``None`` if any level is missing or ``None``."""
    node: Any = summary
    for key in keys:
        if not isinstance(node, Mapping) or node.get(key) is None:
            return None
        node = node[key]
    return node


def _floats(values: Iterable[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "n/a"


def _pct(value: Any) -> str:
    return f"{value:.2f}%" if _finite(value) else "n/a"


def _pt(value: Any) -> str:
    return f"{value:+.2f} pt" if _finite(value) else "n/a"


def _class_keyed(mapping: Mapping[Any, Any] | None) -> dict[int, Any]:
    """A ``{class_id: value}`` dict with int keys (JSON turns them into strings)."""
    return {int(key): value for key, value in (mapping or {}).items()}


def _class_names(summary: Mapping[str, Any], count: int) -> list[str]:
    names = list(summary.get("class_names") or [])
    return [names[c] if c < len(names) else f"class {c}" for c in range(count)]


def _stream_classes(summary: Mapping[str, Any]) -> set[int]:
    return {int(c) for c in (_section(summary, "scenario", "classes") or [])}


def _has_eval_out(summary: Mapping[str, Any]) -> bool:
    curves = [_section(summary, "curves", p, "out") for p in ("before", "after")]
    return any(curves) or bool(_section(summary, "oracle", "out"))


@dataclasses.dataclass(frozen=True)
class _FlopsUnit:
    """A FLOPs unit chosen once per report so every plot and table agrees."""

    scale: float
    name: str

    @classmethod
    def of(cls, summary: Mapping[str, Any]) -> _FlopsUnit:
        """The largest unit in which the model's full-path FLOPs are at least 1."""
        exit_flops = [f for f in _section(summary, "model", "exit_flops") or [] if _finite(f)]
        reference = max(exit_flops, default=0.0) or _largest_flops(summary)
        for scale, name in ((1e9, "GFLOPs"), (1e6, "MFLOPs"), (1e3, "kFLOPs")):
            if reference >= scale:
                return cls(scale, name)
        return cls(1.0, "FLOPs")

    def convert(self, values: Any) -> Any:
        return np.asarray(values, dtype=np.float64) / self.scale

    def format(self, value: Any) -> str:
        return f"{value / self.scale:.2f}" if _finite(value) else "n/a"


def _largest_flops(summary: Mapping[str, Any]) -> float:
    values = [row.get("flops_before") for row in summary.get("per_class") or []]
    values.append(_section(summary, "iso_accuracy", "flops_before"))
    return max((v for v in values if _finite(v)), default=0.0)


# ----------------------------------------------------------------------------------- plots
def _figure(ncols: int = 1, size: tuple[float, float] = (7.0, 4.5)) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    axes = figure.subplots(1, ncols, squeeze=False)[0]
    return figure, list(axes)


def _render_png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _empty_panel(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_curves(summary: Mapping[str, Any]) -> Figure:
    """Cost/accuracy curves on eval_in and eval_out: before, after and the oracle.

    Before is solid, after dashed, the oracle dotted; markers show the run's thresholds; the
    eval_in panel carries the iso-accuracy target as a horizontal line.
    """
    unit = _FlopsUnit.of(summary)
    figure, axes = _figure(ncols=2, size=(12.0, 4.8))
    for ax, split in zip(axes, _SPLITS, strict=True):
        _plot_curve_panel(ax, summary, split, unit)
    figure.suptitle(f"Cost/accuracy before and after specialization ({unit.name}, mul-add = 2)")
    return figure


def _plot_curve_panel(ax: Axes, summary: Mapping[str, Any], split: str, unit: _FlopsUnit) -> None:
    ax.set_title(_SPLITS[split])
    curves = {
        "before": _section(summary, "curves", "before", split),
        "after": _section(summary, "curves", "after", split),
        "oracle": _section(summary, "oracle", split),
    }
    if not any(curves.values()):
        _empty_panel(ax, NO_EVAL_OUT if split == "out" else "no eval_in curve in the summary")
        return
    for phase, points in curves.items():
        if points:
            label, style, colour = _PHASES[phase]
            points = sorted(points, key=lambda p: math.inf if p["flops"] is None else p["flops"])
            x, y = _floats(p["flops"] for p in points), _floats(p["accuracy"] for p in points)
            ax.plot(unit.convert(x), y, linestyle=style, color=colour, marker=".", label=label)
    _plot_operating_points(ax, summary, split, unit)
    if split == "in":
        _plot_iso_target(ax, summary, unit)
    ax.set_xlabel(f"mean {unit.name} per sample")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _plot_operating_points(
    ax: Axes, summary: Mapping[str, Any], split: str, unit: _FlopsUnit
) -> None:
    for phase, marker in (("before", "o"), ("after", "s")):
        point = _section(summary, "operating_points", phase, split)
        if point and _finite(point.get("flops")) and _finite(point.get("accuracy")):
            ax.scatter(
                unit.convert(point["flops"]),
                point["accuracy"],
                marker=marker,
                s=60,
                color=_PHASES[phase][2],
                edgecolors="black",
                zorder=5,
                label=f"{phase} @ run thresholds",
            )


def _plot_iso_target(ax: Axes, summary: Mapping[str, Any], unit: _FlopsUnit) -> None:
    iso = _section(summary, "iso_accuracy") or {}
    target = iso.get("target_accuracy")
    if not _finite(target):
        return
    ratio = iso.get("flops_ratio")
    label = f"iso-accuracy target {target:.2f}%"
    if _finite(ratio):
        label += f" (flops_ratio {ratio:.3f})"
    ax.axhline(target, color="tab:red", linewidth=1.0, alpha=0.7, label=label)
    for phase in _PHASES:
        flops = iso.get(f"flops_{phase}")
        if _finite(flops):
            ax.plot(unit.convert(flops), target, marker="x", markersize=9, color=_PHASES[phase][2])


def plot_exit_histogram(summary: Mapping[str, Any]) -> Figure:
    """Share of stream samples per exit: frozen vs specializing; first vs last drift window."""
    history = _section(summary, "drift", "history") or []
    figure, axes = _figure(ncols=2 if len(history) >= 2 else 1, size=(12.0, 4.5))
    stream = _section(summary, "stream") or {}
    bars = {
        "frozen": _section(stream, "frozen", "exit_histogram"),
        "specializing": _section(stream, "specializing", "exit_histogram"),
    }
    _plot_share_bars(axes[0], summary, bars, "Exits taken over the stream")
    if len(history) >= 2:
        ends = (("first", history[0]), ("last", history[-1]))
        windows = {_window_label(which, e): e.get("exit_histogram") for which, e in ends}
        window = _section(summary, "drift", "window")
        _plot_share_bars(axes[1], summary, windows, f"First vs last window ({window} samples)")
    return figure


def _window_label(which: str, entry: Mapping[str, Any]) -> str:
    return f"{which} window (samples {entry.get('start', '?')}-{entry.get('end', '?')})"


def _plot_share_bars(
    ax: Axes, summary: Mapping[str, Any], bars: Mapping[str, Sequence[int] | None], title: str
) -> None:
    ax.set_title(title)
    bars = {label: _floats(counts) for label, counts in bars.items() if counts}
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


def _exit_labels(summary: Mapping[str, Any], num_exits: int) -> list[str]:
    unit = _FlopsUnit.of(summary)
    exit_flops = _section(summary, "model", "exit_flops") or []
    labels = []
    for k in range(num_exits):
        cost = exit_flops[k] if k < len(exit_flops) else None
        labels.append(f"exit {k}" + (f"\n{unit.format(cost)} {unit.name}" if _finite(cost) else ""))
    return labels


def plot_per_class_flops(summary: Mapping[str, Any]) -> Figure:
    """Per-class mean FLOPs before and after specialization; in-stream classes shaded."""
    rows = summary.get("per_class") or []
    figure, (ax,) = _figure(size=(max(7.0, 0.7 * len(rows) + 3.0), 4.8))
    ax.set_title("Per-class mean FLOPs before and after specialization (run's thresholds)")
    if not rows:
        _empty_panel(ax, "no per-class results in the summary")
        return figure
    unit = _FlopsUnit.of(summary)
    x = np.arange(len(rows))
    for row, position in zip(rows, x, strict=True):
        if row.get("in_stream"):
            ax.axvspan(position - 0.5, position + 0.5, color=_IN_STREAM_SHADE, zorder=0)
    for offset, phase in ((-0.2, "before"), (0.2, "after")):
        values = unit.convert(_floats(row.get(f"flops_{phase}") for row in rows))
        ax.bar(x + offset, values, 0.4, label=phase, color=_PHASES[phase][2], zorder=2)
    names = [str(row.get("name") or f"class {row.get('class')}") for row in rows]
    ax.set_xticks(x, names, rotation=35, ha="right")
    for label, row in zip(ax.get_xticklabels(), rows, strict=True):
        label.set_fontweight("bold" if row.get("in_stream") else "normal")
    from matplotlib.patches import Patch

    handles = [*ax.get_legend_handles_labels()[0], Patch(color=_IN_STREAM_SHADE, label="in stream")]
    ax.legend(handles=handles, fontsize=8)
    ax.set_ylabel(f"mean {unit.name} per sample")
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.grid(axis="y", alpha=0.3, zorder=1)
    return figure


def plot_drift(summary: Mapping[str, Any]) -> Figure:
    """Mean FLOPs per drift window: one line per predicted class, plus all samples."""
    history = _section(summary, "drift", "history") or []
    window = _section(summary, "drift", "window")
    figure, (ax,) = _figure(size=(11.0, 4.8))
    ax.set_title(f"Compute drift per predicted class (windows of {window} samples)")
    if not history:
        _empty_panel(ax, f"no closed drift window (the stream is shorter than {window} samples?)")
        return figure
    unit = _FlopsUnit.of(summary)
    ends = np.array([entry.get("end", i) for i, entry in enumerate(history)], dtype=np.float64)
    per_window = [_class_keyed(entry.get("mean_flops")) for entry in history]
    classes = sorted(set().union(*per_window))
    names, in_stream = _class_names(summary, max(classes, default=-1) + 1), _stream_classes(summary)
    colours = _class_colours(len(names))
    for c in classes:
        values = unit.convert(_floats(means.get(c) for means in per_window))
        style = {"linestyle": "-", "linewidth": 1.6} if c in in_stream else {"linestyle": "--"}
        label = names[c] + (" (in stream)" if c in in_stream else "")
        ax.plot(ends, values, marker="o", markersize=3, color=colours[c], label=label, **style)
    overall = unit.convert(_floats(entry.get("mean_flops_all") for entry in history))
    ax.plot(ends, overall, color="black", linewidth=2.5, label="all samples")
    ax.set_xlabel("stream position (samples, end of window)")
    ax.set_ylabel(f"mean {unit.name} per sample")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return figure


def _class_colours(count: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


_PLOTTERS: dict[str, Callable[[Mapping[str, Any]], Figure]] = {
    "curves": plot_curves,
    "exit_histogram": plot_exit_histogram,
    "per_class_flops": plot_per_class_flops,
    "drift": plot_drift,
}


# -------------------------------------------------------------------------------- markdown
def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def render_markdown(summary: Mapping[str, Any]) -> str:
    """The human report: scenario, model, headline, stream, per class, plots, timings."""
    summary = to_jsonable(summary)
    unit = _FlopsUnit.of(summary)
    name = _section(summary, "scenario", "name") or "unnamed run"
    lines = [f"# Test-time specialization report: {name}", "", FLOPS_NOTE, ""]
    for section in (
        _md_scenario,
        _md_model,
        _md_headline,
        _md_operating_points,
        _md_stream,
        _md_per_class,
        _md_plots,
        _md_timings,
        _md_versions,
    ):
        lines += section(summary, unit) + [""]
    return "\n".join(lines).rstrip() + "\n"


def _md_scenario(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    scenario = summary.get("scenario") or {}
    if not scenario:
        return ["## Scenario", "", "not recorded"]
    classes = scenario.get("classes") or []
    names = _class_names(summary, max(classes, default=-1) + 1)
    listed = ", ".join(f"{c} ({names[c]})" for c in classes) or "n/a"
    lines = ["## Scenario", ""]
    lines += [f"- **{key}**: {scenario[key]}" for key in ("name", "scenario") if key in scenario]
    lines.append(f"- **stream classes**: {listed}")
    extra = [key for key in scenario if key not in ("name", "scenario", "classes")]
    lines += [f"- **{key}**: {scenario[key]}" for key in extra]
    return lines


def _md_model(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    model = summary.get("model") or {}
    lines = ["## Model and thresholds", ""]
    for key in ("name", "gating", "checkpoint", "num_exits"):
        if key in model:
            lines.append(f"- **{key}**: {model[key]}")
    exit_flops = model.get("exit_flops") or []
    thresholds = summary.get("thresholds") or []
    accuracy = model.get("exit_accuracy") or []
    num_exits = max(len(exit_flops), len(thresholds), len(accuracy))
    if not num_exits:
        return lines + ["", "no per-exit information recorded"]
    rows = []
    for k in range(num_exits):
        last = k == num_exits - 1
        threshold = "last exit answers" if last else _at(thresholds, k, lambda v: _num(v, 3))
        rows.append([k, threshold, _at(exit_flops, k, unit.format), _at(accuracy, k, _pct)])
    headers = ["exit", "threshold", f"{unit.name} to reach (full path)", "accuracy of exit"]
    return lines + [""] + _table(headers, rows)


def _at(values: Sequence[Any], index: int, fmt: Callable[[Any], str]) -> str:
    return fmt(values[index]) if index < len(values) else "n/a"


def _md_headline(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    iso = summary.get("iso_accuracy") or {}
    lines = ["## Headline: compute at equal accuracy on eval_in", ""]
    if not iso:
        return lines + ["iso-accuracy comparison not computed"]
    target, ratio = iso.get("target_accuracy"), iso.get("flops_ratio")
    gap = iso.get("gap_closed")
    gap_text = f"{100 * gap:.0f}% of the gap to the oracle" if _finite(gap) else "n/a of the gap"
    lines.append(
        f"At {_pct(target)} accuracy on the stream's classes (eval_in), the specialized model "
        f"needs {unit.format(iso.get('flops_after'))} {unit.name} per sample instead of "
        f"{unit.format(iso.get('flops_before'))} (flops_ratio {_num(ratio, 3)}); the oracle exit "
        f"choice needs {unit.format(iso.get('flops_oracle'))}, so specialization closed "
        f"{gap_text} (gap_closed {_num(gap, 2)}). {_eval_out_prose(summary)}"
    )
    headers = [
        "target accuracy",
        f"{unit.name} before",
        f"{unit.name} after",
        f"{unit.name} oracle",
        "flops_ratio",
        "gap_closed",
        "eval_out accuracy change",
    ]
    change = summary.get("eval_out_accuracy_change")
    row = [
        _pct(target),
        unit.format(iso.get("flops_before")),
        unit.format(iso.get("flops_after")),
        unit.format(iso.get("flops_oracle")),
        _num(ratio, 3),
        _num(iso.get("gap_closed"), 2),
        _pt(change) if _has_eval_out(summary) or change is not None else NO_EVAL_OUT,
    ]
    notes = [
        "",
        "flops_ratio = after / before (below 1 is a saving); "
        "gap_closed = (before - after) / (before - oracle).",
    ]
    return lines + [""] + _table(headers, [row]) + notes


def _eval_out_prose(summary: Mapping[str, Any]) -> str:
    change = summary.get("eval_out_accuracy_change")
    if change is None and not _has_eval_out(summary):
        return "The stream contains every class, so there are no held-out classes outside it."
    return (
        "On the classes outside the stream (eval_out), accuracy at the run's thresholds "
        f"changed by {_pt(change)}."
    )


def _md_operating_points(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    lines = ["## At the run's thresholds", ""]
    points = summary.get("operating_points") or {}
    if not points:
        return lines + ["not recorded"]
    rows = []
    for split in _SPLITS:
        cells = []
        for phase in ("before", "after"):
            point = _section(points, phase, split) or {}
            cells += [_pct(point.get("accuracy")), unit.format(point.get("flops"))]
        if split == "out" and not any(_section(points, p, "out") for p in ("before", "after")):
            cells = [NO_EVAL_OUT] + ["n/a"] * 3
        rows.append([f"eval_{split}", *cells])
    headers = [
        "set",
        "accuracy before",
        f"{unit.name} before",
        "accuracy after",
        f"{unit.name} after",
    ]
    return lines + _table(headers, rows)


def _md_stream(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    lines = ["## Stream: frozen vs specializing", ""]
    stream = summary.get("stream") or {}
    if not stream:
        return lines + ["not recorded"]
    runs = {key: stream.get(key) or {} for key in ("frozen", "specializing")}

    def histogram(run: Mapping[str, Any]) -> str:
        counts = run.get("exit_histogram")
        return " / ".join(str(n) for n in counts) if counts else "n/a"

    flops = [unit.format(r.get("mean_flops")) for r in runs.values()]
    rows = [
        ["online accuracy", *(_pct(r.get("accuracy")) for r in runs.values())],
        [f"mean {unit.name} per sample", *flops],
        ["exit histogram (samples per exit)", *(histogram(r) for r in runs.values())],
        ["samples per second", *(_num(r.get("samples_per_second"), 1) for r in runs.values())],
        ["head updates", "-", str(runs["specializing"].get("updates", "n/a"))],
    ]
    return lines + _table(["", "frozen", "specializing"], rows)


def _md_per_class(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    lines = ["## Per class", ""]
    rows = summary.get("per_class") or []
    if not rows:
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
    table = []
    for row in rows:
        before, after = row.get("flops_before"), row.get("flops_after")
        ratio = after / before if _finite(before) and _finite(after) and before > 0 else None
        table.append(
            [
                row.get("class", "?"),
                row.get("name", ""),
                "yes" if row.get("in_stream") else "no",
                unit.format(before),
                unit.format(after),
                _num(ratio, 3),
                _pct(row.get("accuracy_before")),
                _pct(row.get("accuracy_after")),
                unit.format(row.get("stream_flops_first_window")),
                unit.format(row.get("stream_flops_last_window")),
            ]
        )
    return lines + _table(headers, table)


def _md_plots(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    captions = {
        "curves": "Cost/accuracy curves (before solid, after dashed, oracle dotted)",
        "exit_histogram": "Exit histogram over the stream",
        "per_class_flops": "Per-class mean FLOPs before and after",
        "drift": "Compute drift per predicted class over the stream",
    }
    lines = ["## Plots", ""]
    for name, filename in PLOT_FILES.items():
        lines += [f"![{captions[name]}]({filename})", ""]
    return lines[:-1]


def _md_timings(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    timings = summary.get("timings") or {}
    if not timings:
        return ["## Timings", "", "not recorded"]
    rows = [[name, _num(seconds, 2)] for name, seconds in timings.items()]
    return ["## Timings", ""] + _table(["step", "seconds"], rows)


def _md_versions(summary: Mapping[str, Any], unit: _FlopsUnit) -> list[str]:
    versions = summary.get("versions") or {}
    if not versions:
        return ["## Versions", "", "not recorded"]
    return ["## Versions", ""] + [f"- **{name}**: {value}" for name, value in versions.items()]
