"""What the report's text and plots share: labels, number formats and the FLOPs unit."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from backbones.cost import FlopsUnit, flops_unit
from specialize.summary import BeforeAfter, RunSummary, Split

NO_EVAL_OUT = "no held-out classes outside the stream"
FLOPS_NOTE = "FLOPs count a multiply-add as 2 (as torch.utils.flop_counter.FlopCounterMode does)."

PHASES = {  # phase -> (label, line style, colour)
    "before": ("before", "-", "tab:blue"),
    "after": ("after", "--", "tab:orange"),
    "oracle": ("oracle", ":", "tab:gray"),
}
SPLITS: dict[Split, str] = {
    "eval_in": "eval_in: classes in the stream",
    "eval_out": "eval_out: classes outside the stream",
}


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool, not ``None``)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def num(value: Any, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals, or ``n/a``."""
    return f"{value:.{digits}f}" if finite(value) else "n/a"


def pct(value: Any) -> str:
    """A percentage, ``93.10%``, or ``n/a``."""
    return f"{value:.2f}%" if finite(value) else "n/a"


def pt(value: Any) -> str:
    """A change in points, ``+0.40 pt``, or ``n/a``."""
    return f"{value:+.2f} pt" if finite(value) else "n/a"


def floats(values: Iterable[Any]) -> np.ndarray:
    """float64 array; ``None`` becomes NaN."""
    return np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def report_unit(summary: RunSummary) -> FlopsUnit:
    """The FLOPs unit of a whole report, so every plot and table agrees.

    Picked from the model's full-path FLOPs per exit; without them, from the largest
    per-class or iso-accuracy figure.
    """
    exit_flops = summary.model.exit_flops if summary.model else []
    if max((f for f in exit_flops if finite(f)), default=0.0):
        return flops_unit(exit_flops)
    fallback = [row.flops_before for row in summary.per_class]
    fallback.append(summary.iso_accuracy.flops_before if summary.iso_accuracy else None)
    return flops_unit(fallback)


def class_names(summary: RunSummary, count: int) -> list[str]:
    """Names of classes ``0 .. count - 1`` (``class c`` where the summary has none)."""
    names = summary.class_names
    return [names[c] if c < len(names) else f"class {c}" for c in range(count)]


def stream_classes(summary: RunSummary) -> set[int]:
    """The classes of the stream."""
    return {int(c) for c in (summary.scenario and summary.scenario.classes) or []}


def has_eval_out(summary: RunSummary) -> bool:
    """Whether the summary holds any eval_out curve."""
    curves = summary.curves or BeforeAfter()
    outs = [splits.eval_out for splits in (curves.before, curves.after) if splits is not None]
    return any(outs) or bool(summary.oracle and summary.oracle.eval_out)
