"""Study reporting: seed-aggregated tables, figures, and the Markdown and HTML reports.

``summarize`` turns the flat records of ``results.json`` into mean ± 95% CI per
(dataset, similar, method); ``format_table`` renders them; ``plot_residual_influence`` and
``plot_accuracies`` draw PNGs; ``build_report`` writes ``report.md`` and the self-contained
``report.html`` with those figures plus, from an optional ``details.json``, MIA ROC curves, U-LiRA
per-target accuracy and image grids of the targets (:data:`REPORT_FILES` lists every file it writes).
"""

from __future__ import annotations

from .markdown import DETAILS_NAME, REPORT_FILES, build_report
from .plots import plot_accuracies, plot_residual_influence
from .summary import format_table, summarize

__all__ = ["DETAILS_NAME", "REPORT_FILES", "build_report", "format_table", "plot_accuracies", "plot_residual_influence", "summarize"]
