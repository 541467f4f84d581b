"""Study reporting: seed-aggregated tables, bar charts and a markdown report.

``summarize`` turns the flat records of ``results.json`` into mean ± 95% CI per
(dataset, similar, method); ``format_table`` renders them; ``plot_residual_influence`` and
``plot_accuracies`` draw PNGs; ``build_report`` writes ``report.md`` with both figures.
"""

from __future__ import annotations

from .markdown import DETAILS_NAME, REPORT_FILES, build_report
from .plots import plot_accuracies, plot_residual_influence
from .summary import format_table, summarize

__all__ = ["DETAILS_NAME", "REPORT_FILES", "build_report", "format_table", "plot_accuracies", "plot_residual_influence", "summarize"]
