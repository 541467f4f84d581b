"""Render the study report as one self-contained HTML5 page.

Everything the page shows is passed in as a :class:`Page` (``build_report`` in :mod:`.markdown`
assembles it from the same sentences and figures as ``report.md``). Figures are embedded as
base64 ``data:`` URIs and the style sheet is inline, so the file needs no network and no other file.
All text is escaped; the only markup taken from the inputs is the Markdown-inline subset that the
report's sentences use (``**bold**``, ``*italic*``, ```code```), rendered after escaping.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .plots import ACCURACY_CAPTION, RI_CAPTION
from .summary import (
    BEST_NOTE,
    REFERENCE_METHODS,
    best_cells,
    format_c,
    format_cell,
    group_rows,
    ordered_metrics,
    table_heading,
)

RI = "residual_influence"

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;max-width:1360px;
 margin:1.5em auto;padding:0 1.2em;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}
h2{border-bottom:1px solid #d8d8d8;padding-bottom:.15em;margin-top:1.8em}
h3{font-size:1.05em;margin:1.3em 0 .4em}
nav{font-size:.9em;margin:.6em 0 1.2em}
nav a{margin-right:1em}
code{background:#f2f2f4;padding:0 .25em;border-radius:3px;font-size:.92em}
.scroll{overflow-x:auto;margin-bottom:.8em}
table{border-collapse:collapse;font-size:.8em;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d4d4d8;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#eef0f4;white-space:normal;vertical-align:bottom;min-width:5em}
th:first-child,td:first-child{text-align:left;min-width:0;position:sticky;left:0;background:#fff;
 box-shadow:1px 0 0 #d4d4d8}
th:first-child{background:#eef0f4}
tr.ref td{background:#f7f7f9;color:#555}
td.best{background:#dff3e0;font-weight:bold}
figure{margin:1em 0 1.6em}
figure img{max-width:100%;height:auto;border:1px solid #e4e4e8}
figcaption{font-size:.88em;color:#444;max-width:70em}
p.note{color:#666;font-style:italic}
.warn{background:#fff4e0;border-left:4px solid #e69a1c;padding:.5em 1em}
.headline{font-size:1.15em;background:#eef5ff;border-left:4px solid #2a6fdb;padding:.6em 1em}
ul.notes li{font-size:.9em;color:#444}
"""


@dataclass
class FigureBlock:
    """One figure section: its anchor, heading, caption, PNG bytes (None: not drawn) and the note shown instead."""

    anchor: str
    title: str
    caption: str
    png: bytes | None
    note: str = ""


@dataclass
class Page:
    """Everything the HTML report shows. Text fields hold Markdown-inline sentences."""

    title: str
    intro: list[str]
    setup: list[str]
    findings: list[str]
    summary: Sequence[Mapping[str, Any]]
    ri_png: bytes
    accuracy_png: bytes
    detail_figures: list[FigureBlock] = field(default_factory=list)
    missing: list[tuple[Any, Any, Any, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warning: str | None = None
    headline: str | None = None


_BOLD = re.compile(r"\*\*(.+?)\*\*")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)([^*]+?)\*(?![\w*])")
_CODE = re.compile(r"`([^`]+)`")


def inline(text: str) -> str:
    """Escape ``text`` for HTML, then render its ``**bold**``, ``*italic*`` and ```code``` spans."""
    out = html.escape(str(text), quote=True)
    out = _CODE.sub(r"<code>\1</code>", out)
    out = _BOLD.sub(r"<strong>\1</strong>", out)
    return _ITALIC.sub(r"<em>\1</em>", out)


def data_uri(png: bytes) -> str:
    """A ``data:image/png;base64,...`` URI of ``png``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _header_cell(name: str) -> str:
    # Long metric names may wrap after an underscore, so wide tables stay readable.
    return "<th>" + html.escape(name).replace("_", "_<wbr>") + "</th>"


def _table(header: list[str], rows: list[tuple[str, list[tuple[str, bool]], bool]]) -> str:
    """An HTML table; each row is (method, [(cell text, is best)], is a reference row)."""
    lines = ['<div class="scroll"><table>', "<thead><tr>" + "".join(_header_cell(h) for h in header) + "</tr></thead>",
             "<tbody>"]
    for method, cells, reference in rows:
        tds = "".join(f'<td class="best"><strong>{html.escape(c)}</strong></td>' if best else f"<td>{html.escape(c)}</td>"
                      for c, best in cells)
        row_class = ' class="ref"' if reference else ""
        lines.append(f"<tr{row_class}><td>{html.escape(str(method))}</td>{tds}</tr>")
    lines += ["</tbody>", "</table></div>"]
    return "\n".join(lines)


def results_tables(summary: Sequence[Mapping[str, Any]]) -> str:
    """One table per (dataset, C): methods × metrics, mean ± 95% CI, best cell per column marked."""
    cols = ordered_metrics(summary)
    blocks = []
    for (dataset, similar), rows in group_rows(summary).items():
        best = best_cells(rows, cols)
        body = [(str(r["method"]), [(format_cell(r["metrics"].get(m)), (r["method"], m) in best) for m in cols],
                 r["method"] in REFERENCE_METHODS) for r in rows]
        blocks.append(f"<h3>{html.escape(table_heading(dataset, similar, rows))}</h3>\n" + _table(["method", *cols], body))
    return "\n".join(blocks)


def ri_table(summary: Sequence[Mapping[str, Any]]) -> str:
    """Per dataset, methods × C of residual influence (mean ± 95% CI); best per C column marked."""
    blocks = []
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        groups = {c: rows for (d, c), rows in group_rows(summary).items() if d == dataset}
        if not any(RI in r["metrics"] for rows in groups.values() for r in rows):
            continue
        best = {c: best_cells(rows, [RI]) for c, rows in groups.items()}
        lookup = {(c, r["method"]): r for c, rows in groups.items() for r in rows}
        methods = list(dict.fromkeys(m for _, m in lookup))
        body = []
        for m in methods:
            cells = [(format_cell(lookup[(c, m)]["metrics"].get(RI)) if (c, m) in lookup else "n/a", (m, RI) in best[c])
                     for c in groups]
            body.append((m, cells, m in REFERENCE_METHODS))
        header = ["method", *(f"C={format_c(c)}" + (" (control)" if format_c(c) == "0" else "") for c in groups)]
        blocks.append(f"<h3>{html.escape(str(dataset))}: residual influence</h3>\n" + _table(header, body))
    return "\n".join(blocks) if blocks else '<p class="note">No residual_influence values in the results.</p>'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return (f'<figure><img src="{data_uri(png)}" alt="{html.escape(alt, quote=True)}">'
            f"<figcaption>{inline(caption)}</figcaption></figure>")


def _section(anchor: str, title: str, body: list[str]) -> list[str]:
    return [f'<section id="{anchor}">', f"<h2>{html.escape(title)}</h2>", *body, "</section>"]


def _missing(missing: Sequence[tuple[Any, Any, Any, Any]]) -> list[str]:
    if not missing:
        return []
    items = [f"<li>{html.escape(str(d))}, C={html.escape(format_c(c))}: <code>{html.escape(str(m))}</code>, "
             f"seed {html.escape(str(s))}</li>" for d, c, m, s in missing]
    return _section("missing-rows", "Missing rows", [
        f"<p>{len(missing)} (method, seed) row(s) are absent; the tables and findings above use the rows present.</p>",
        "<ul>", *items, "</ul>"])


def render_html(page: Page) -> str:
    """The complete HTML5 document of ``page``."""
    nav = [("setup", "Setup"), ("findings", "Findings"), ("residual-influence", "Residual influence"),
           ("accuracy", "Accuracy"), *((f.anchor, f.title) for f in page.detail_figures), ("results", "Results"),
           *([("missing-rows", "Missing rows")] if page.missing else []), ("notes", "Notes")]
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(page.title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
             "<header>", f"<h1>{html.escape(page.title)}</h1>",
             "<nav>" + "".join(f'<a href="#{a}">{html.escape(t)}</a>' for a, t in nav) + "</nav>", "</header>", "<main>"]
    if page.headline:
        parts.append(f'<p class="headline" id="headline"><strong>Headline.</strong> {inline(page.headline)}</p>')
    if page.warning:
        parts.append(f'<p class="warn">{inline(page.warning)}</p>')
    parts += [f"<p>{inline(p)}</p>" for p in page.intro]
    parts += _section("setup", "Setup", ["<ul>", *(f"<li>{inline(s)}</li>" for s in page.setup), "</ul>"])
    parts += _section("findings", "Findings", [f"<p>{inline(f)}</p>" for f in page.findings])
    parts += _section("residual-influence", "Residual influence with and without near-duplicates", [
        _figure(page.ri_png, "Residual influence by method and C",
                RI_CAPTION),
        ri_table(page.summary)])
    parts += _section("accuracy", "Accuracy on targets, near-duplicates and test data", [
        _figure(page.accuracy_png, "Target, near-duplicate and test accuracy by method",
                ACCURACY_CAPTION)])
    for fig in page.detail_figures:
        body = [_figure(fig.png, fig.title, fig.caption)] if fig.png is not None else [f'<p class="note">{inline(fig.note)}</p>']
        parts += _section(fig.anchor, fig.title, body)
    parts += _section("results", "Results (mean ± 95% CI over seeds)",
                      [f"<p>{inline(BEST_NOTE)} Here the best cells are shaded green; the reference rows are grey.</p>",
                       results_tables(page.summary)])
    parts += _missing(page.missing)
    parts += _section("notes", "Notes", ['<ul class="notes">', *(f"<li>{inline(n)}</li>" for n in page.notes), "</ul>"])
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"

