"""Build ``report.md`` and ``report.html`` (with PNG figures) from a study's ``results.json``.

The optional ``details.json`` beside it adds the per-sample figures (MIA ROC curves, U-LiRA
per-target accuracy, image grids); without it, or when it is malformed, those sections say why
they are missing and the rest builds from ``results.json`` alone. Only :data:`REPORT_FILES` are
written, each atomically; the figures are written first, so a plotting failure leaves the old
reports as they were. Every sentence that states a result is composed from the numbers in the records.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic_io import write_text
from ..evaluate.evaluation import DEFAULT_RI_MIN_GAP
from ..methods.expansion import SIMILAR_SUFFIX, similar_base
from .details import Details, details_status, load_details
from .findings import finding, headline
from .figures import (
    DETAIL_FIGURE_FILES,
    DETAIL_FIGURES,
    missing_note,
    write_detail_figures,
)
from .html import FigureBlock, Page, render_html
from .plots import ACCURACY_CAPTION, RI_CAPTION, method_order, plot_accuracies, plot_residual_influence
from .summary import (
    BEST_NOTE,
    IDENTITY_KEYS,
    RESULTS_SCHEMA_VERSION,
    is_number,
    check_records,
    format_c,
    format_table,
    metric_stat,
    missing_rows,
    summarize,
)


RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
HTML_NAME = "report.html"
RI_PNG = "residual_influence.png"
ACCURACY_PNG = "accuracy.png"
# Optional per-sample evidence the study writes beside results.json (see study.write_details).
DETAILS_NAME = "details.json"
# Every file build_report writes; the study stages exactly these (plus its own) so a failure keeps the old ones.
# The figures from details.json (DETAIL_FIGURE_FILES) are written only when it holds their data.
REPORT_FILES = (REPORT_NAME, HTML_NAME, RI_PNG, ACCURACY_PNG, *DETAIL_FIGURE_FILES)
TITLE = "Unlearning with near-duplicates: study report"
# At most this many of details.json's dropped parts are listed by name; the rest are counted.
MAX_DETAIL_NOTES = 12

INTRO = """\
**Question.** When a forget target has near-duplicates left in the training set, does unlearning
the target remove its influence, or do the near-duplicates keep it alive?

**Models.** `original` is trained on everything; `retrain` is retrained from scratch without the
targets (the usual "exact unlearning" gold standard); `oracle` is retrained without the targets
*and* their near-duplicates, i.e. as if the targets had never been seen. The other methods are
approximate unlearning methods applied to `original`.

**Metrics.** The residual influence of a method on target *t* is
RI = (ℓ_oracle − ℓ_method) / (ℓ_oracle − ℓ_original), with ℓ the model's loss on *t*, averaged
over targets: 1 = the target's influence fully remains (as in `original`), 0 = as if never seen
(as in `oracle`). Targets with |ℓ_oracle − ℓ_original| < {min_gap} nats carry no measurable influence
and are left out (`ri_targets_used` counts the ones kept). `target_acc`, `similar_acc`, `retain_acc` and `test_acc`
are accuracies on the targets, their near-duplicates, the retained training data and held-out
test data; `mia_auc` is the AUC of a loss-threshold membership-inference attack;
`ulira_accuracy_targets` is the per-target accuracy of U-LiRA, an attack that tells shadow models
unlearned with the method from shadow models that never saw the target (0.5 = indistinguishable). C (`similar`)
is the number of planted near-duplicates per target; C=0 is the no-near-duplicate control.
Tables give the mean ± half-width of the 95% Student-t confidence interval over seeds.
"""

SIMILAR_INTRO = """\
**Similarity-aware rows.** `<method>{suffix}` is that method after adding to the forget set every
training sample that `find_similar` finds as a near-duplicate of a target (default method and
threshold). `added` counts the samples added per seed; `added_precision` / `added_recall` score them
against the planted near-duplicates.
"""


def load_results(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and check a ``results.json``; errors name the file and say what is wrong.

    Every record carries ``schema_version``, and every key but the identifying ones holds a number
    or null (an undefined metric): a string or list where a metric belongs is refused, not shown as n/a.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study results at {path}; run `unlearn-fast study --out {path.parent}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of result records, got {type(data).__name__}")
    try:
        records = check_records(data)
        for i, rec in enumerate(records):
            if "schema_version" not in rec:
                raise ValueError(f"record {i} ({rec.get('method')!r}, seed {rec.get('seed')!r}) has no schema_version; "
                                 f"this unlearn_fast reads version {RESULTS_SCHEMA_VERSION}, written by the study with each record")
            for key, value in rec.items():
                if key not in IDENTITY_KEYS and value is not None and not is_number(value):
                    raise ValueError(f"record {i} ({rec.get('method')!r}, seed {rec.get('seed')!r}) holds {value!r} under "
                                     f"{key!r}; a metric must be a number or null")
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not records:
        raise ValueError(f"{path} holds no result records")
    return records


def _missing_section(absent: Sequence[tuple[Any, Any, Any, Any]]) -> list[str]:
    """A section listing the rows a partial run lacks (see :func:`missing_rows`; means above use the rows present)."""
    if not absent:
        return []
    lines = ["", "## Missing rows", "",
             f"{len(absent)} (method, seed) row(s) are absent; the tables and findings above use the rows present.", ""]
    lines += [f"- {dataset}, C={format_c(similar)}: `{method}`, seed {seed}" for dataset, similar, method, seed in absent]
    return lines


def _values(records: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    """Distinct values of ``key``, sorted when comparable, else in order of appearance."""
    vals = list(dict.fromkeys(r[key] if isinstance(r[key], (int, float, str)) else repr(r[key])
                              for r in records if r.get(key) is not None))
    try:
        return sorted(vals)
    except TypeError:
        return vals


def _setup(records: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        recs = [r for r in records if r["dataset"] == dataset]
        parts = []
        for key, label in (("targets", "targets"), ("similar", "near-duplicates per target C"),
                           ("model", "model"), ("seed", "seeds"), ("shadows", "shadow models per seed and C")):
            vals = _values(recs, key)
            if vals:
                shown = ", ".join(format_c(v) if key in ("targets", "similar") else str(v) for v in vals)
                parts.append(f"{label}: {shown}")
        methods = ", ".join(f"`{m}`" for m in dict.fromkeys(r["method"] for r in recs))
        parts.append(f"methods: {methods}")
        lines.append(f"- **{dataset}**: " + "; ".join(parts))
    return lines


def _paragraphs(text: str) -> list[str]:
    """Markdown paragraphs as single lines (for the HTML page)."""
    return [" ".join(block.split("\n")) for block in text.strip().split("\n\n") if block.strip()]


def _detail_sections(details: Details, written: Mapping[str, Path], errors: Mapping[str, str]) -> list[str]:
    """One Markdown subsection per details.json figure: the image, or one line saying why it is missing."""
    lines = []
    for spec in DETAIL_FIGURES:
        lines += [f"### {spec.title}", ""]
        if spec.name in written:
            lines += [f"![{spec.title}]({spec.name})", "", spec.caption, ""]
        else:
            lines += [f"*{errors.get(spec.name) or missing_note(spec, details)}*", ""]
    return lines


def _notes(records: Sequence[Mapping[str, Any]], details: Details) -> list[str]:
    """What the report was built from, and what of details.json it left out."""
    notes = [f"Built from {RESULTS_NAME} ({len(records)} records). {details_status(details)}"]
    notes += [f"{DETAILS_NAME}, {note}." for note in details.notes[:MAX_DETAIL_NOTES]]
    if len(details.notes) > MAX_DETAIL_NOTES:
        notes.append(f"… and {len(details.notes) - MAX_DETAIL_NOTES} more malformed part(s) of {DETAILS_NAME}.")
    return notes


def build_report(out_dir: str | os.PathLike[str], records: Sequence[Mapping[str, Any]] | None = None, *,
                 source: str | os.PathLike[str] | None = None) -> Path:
    """Write ``report.md``, ``report.html`` and their PNG figures (:data:`REPORT_FILES`) into ``out_dir``.

    ``records`` defaults to the contents of ``results.json`` in ``source`` (default ``out_dir``);
    ``details.json`` there is read when present (a missing or malformed one only drops the figures it
    would give, with a note saying why). Returns the Markdown report's path. Raises FileNotFoundError /
    ValueError, naming the file, when results are missing or malformed. A study folder is rebuilt as
    one set by :func:`unlearn_fast.report.folder.rebuild_report`.
    """
    out = Path(out_dir)
    source = out if source is None else Path(source)
    if records is None:
        records = load_results(source / RESULTS_NAME)
    else:
        records = check_records(records)
        if not records:
            raise ValueError("records is empty; nothing to report")
    summary = summarize(records)
    details = load_details(source / DETAILS_NAME)
    # Figures before the reports: if plotting fails, report.md and report.html keep their previous contents.
    plot_residual_influence(summary, out / RI_PNG, records=records)
    plot_accuracies(summary, out / ACCURACY_PNG, records=records)
    written, errors = write_detail_figures(details, out, order=method_order(summary))
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    expanded = any(similar_base(str(r["method"])) is not None for r in summary)
    intro = INTRO.format(min_gap=DEFAULT_RI_MIN_GAP) + ("\n" + SIMILAR_INTRO.format(suffix=SIMILAR_SUFFIX) if expanded else "")
    setup = _setup(records)
    findings = [finding(d, summary) for d in datasets]
    top = headline(summary)
    warning = details_status(details) if details.status == "ignored" else None
    notes = _notes(records, details)
    absent = missing_rows(records)
    parts = [
        f"# {TITLE}", "", *([f"> **Headline.** {top}", ""] if top else []),
        *([f"> **Warning.** {warning}", ""] if warning else []), intro,
        "## Setup", "", *setup, "",
        "## Findings", "", *(line for f in findings for line in (f, "")),
        "## Figures", "",
        f"![Residual influence by method and C]({RI_PNG})", "", f"*{RI_CAPTION}*", "",
        f"![Target, near-duplicate and test accuracy by method]({ACCURACY_PNG})", "", f"*{ACCURACY_CAPTION}*", "",
        *_detail_sections(details, written, errors),
        "## Results (mean ± 95% CI over seeds)", "", BEST_NOTE, "",
        format_table(summary, style="markdown"),
        *_missing_section(absent),
        "", "## Notes", "", *(f"- {n}" for n in notes),
    ]
    blocks = [FigureBlock(spec.name.removesuffix(".png").replace("_", "-"), spec.title, spec.caption,
                          written[spec.name].read_bytes() if spec.name in written else None,
                          errors.get(spec.name) or missing_note(spec, details)) for spec in DETAIL_FIGURES]
    page = render_html(Page(
        title=TITLE, intro=_paragraphs(intro), setup=[line.removeprefix("- ") for line in setup], findings=findings,
        summary=summary, ri_png=(out / RI_PNG).read_bytes(), accuracy_png=(out / ACCURACY_PNG).read_bytes(),
        detail_figures=blocks, missing=absent, notes=notes, warning=warning, headline=top))
    # Both documents are composed before either is written, so they never describe different runs.
    report = out / REPORT_NAME
    write_text(report, "\n".join(parts).rstrip("\n") + "\n")
    write_text(out / HTML_NAME, page)
    return report
