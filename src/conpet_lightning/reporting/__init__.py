"""Run reports: figures from the accuracy matrix and side-by-side summaries of finished runs."""

from __future__ import annotations

from conpet_lightning.reporting.figures import (
    plot_accuracy_heatmap,
    plot_forgetting_bars,
    plot_forgetting_curves,
    render_run_figures,
)
from conpet_lightning.reporting.report import load_run, markdown_table, recompute_summary, report, summary_mismatches

__all__ = [
    "load_run",
    "markdown_table",
    "plot_accuracy_heatmap",
    "plot_forgetting_bars",
    "plot_forgetting_curves",
    "recompute_summary",
    "render_run_figures",
    "report",
    "summary_mismatches",
]
