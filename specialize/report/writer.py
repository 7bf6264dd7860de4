"""Writing a run folder: ``summary.json``, ``report.md`` and the plots, each atomically."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from backbones.checkpoint import atomic_write_bytes
from specialize.report.budget import THRESHOLDS_FILE, plot_thresholds
from specialize.report.markdown import render_markdown
from specialize.report.plots import PLOT_FILES, PLOTTERS, render_png
from specialize.summary import RunSummary, to_jsonable


def write_report(summary: RunSummary | Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write a run folder: ``summary.json``, ``report.md`` and the PNG plots.

    ``summary.json`` is the summary's JSON form (a mapping is written as given), and the report
    and plots are drawn from that JSON read back as a :class:`RunSummary`, so rendering a
    ``summary.json`` loaded from disk gives the same report. Every file is written atomically
    (``backbones.checkpoint.atomic_write``: temp file, fsync, rename, folder fsync), so a reader
    never sees a half-written file and a crash leaves the previous version in place.

    Args:
        summary: The run's summary, or its JSON form (the schema is documented in the
            README); ``NaN`` and infinities are written to JSON as ``null``.
        out_dir: Folder to write into; created if missing, existing files are replaced.

    Returns:
        Paths by name: ``summary``, ``report``, the keys of :data:`PLOT_FILES` and, for a run
        with a budget, ``thresholds``.

    Raises:
        TypeError: ``summary`` is neither a RunSummary nor a mapping, or holds a value JSON
            cannot represent.
    """
    if not isinstance(summary, (RunSummary, Mapping)):
        raise TypeError(f"summary must be a RunSummary or a mapping, got "
                        f"{type(summary).__name__}")
    clean = to_jsonable(summary)
    typed = RunSummary.from_json_dict(clean)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / "summary.json", "report": out_dir / "report.md"}
    text = json.dumps(clean, indent=2, allow_nan=False) + "\n"
    atomic_write_bytes(paths["summary"], text.encode())
    for name, plot in PLOTTERS.items():
        paths[name] = out_dir / PLOT_FILES[name]
        atomic_write_bytes(paths[name], render_png(plot(typed)))
    if typed.budget is not None and typed.budget.budget is not None:
        paths["thresholds"] = out_dir / THRESHOLDS_FILE
        atomic_write_bytes(paths["thresholds"], render_png(plot_thresholds(typed)))
    atomic_write_bytes(paths["report"], render_markdown(typed).encode())
    return paths
