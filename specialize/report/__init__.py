"""Run folders: ``summary.json``, ``report.md`` and PNG plots from a run's summary.

:func:`write_report` is the one entry point the engine and the CLI call; the plot and
markdown functions are public too, for notebooks. They take a
:class:`specialize.summary.RunSummary` or its JSON form (e.g. a ``summary.json`` read from
disk). Missing or empty sections of the summary never fail a report: the plot panel or table
says what is missing instead.

Modules: :mod:`~specialize.report.writer` (the run folder), :mod:`~specialize.report.markdown`
(``report.md`` and the headline), :mod:`~specialize.report.plots` (the PNGs) and
:mod:`~specialize.report.common` (labels, number formats, the report's FLOPs unit).

FLOPs everywhere: a multiply-add counts 2 FLOPs, as ``torch.utils.flop_counter.FlopCounterMode``
counts them (papers that print MACs print half these figures); one formatter,
``backbones.cost.format_flops``, prints them.
"""

from specialize.report.common import FLOPS_NOTE, NO_EVAL_OUT
from specialize.report.markdown import format_headline, render_markdown, updater_failure
from specialize.report.plots import (
    DPI,
    PLOT_FILES,
    plot_curves,
    plot_drift,
    plot_exit_histogram,
    plot_per_class_flops,
)
from specialize.report.writer import write_report
from specialize.summary import to_jsonable

__all__ = [
    "DPI",
    "FLOPS_NOTE",
    "NO_EVAL_OUT",
    "PLOT_FILES",
    "format_headline",
    "plot_curves",
    "plot_drift",
    "plot_exit_histogram",
    "plot_per_class_flops",
    "render_markdown",
    "to_jsonable",
    "updater_failure",
    "write_report",
]
