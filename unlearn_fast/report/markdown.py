"""Build ``report.md`` (with two PNG figures) from a study's ``results.json``.

Only ``report.md``, ``residual_influence.png`` and ``accuracy.png`` are written, each
atomically; the figures are written first so a plotting failure leaves the old report as it was.
Every sentence that states a result is composed from the numbers in the records.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..atomic_io import write_text
from ..evaluate.evaluation import DEFAULT_RI_MIN_GAP
from ..methods.expansion import SIMILAR_SUFFIX, similar_base
from .plots import plot_accuracies, plot_residual_influence
from .summary import check_records, format_c, format_table, metric_stat, missing_rows, summarize

RI = "residual_influence"

RESULTS_NAME = "results.json"
REPORT_NAME = "report.md"
RI_PNG = "residual_influence.png"
ACCURACY_PNG = "accuracy.png"
# Optional per-sample evidence the study writes beside results.json (see study.write_details).
DETAILS_NAME = "details.json"
# Every file build_report writes; the study stages exactly these (plus its own) so a failure keeps the old ones.
REPORT_FILES = (REPORT_NAME, RI_PNG, ACCURACY_PNG)

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
test data; `mia_auc` is the AUC of a loss-threshold membership-inference attack. C (`similar`)
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
    """Read and check a ``results.json``; errors name the file and say what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no study results at {path}; run `unlearn-fast study` first or pass records=")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of result records, got {type(data).__name__}")
    try:
        records = check_records(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    if not records:
        raise ValueError(f"{path} holds no result records")
    return records


def _missing_section(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """A section listing the rows a partial run lacks (means above are over the rows present)."""
    absent = missing_rows(records)
    if not absent:
        return []
    lines = ["", "## Missing rows", "",
             f"{len(absent)} (method, seed) row(s) are absent; the tables and findings above use the rows present.", ""]
    lines += [f"- {dataset}, C={format_c(similar)}: `{method}`, seed {seed}" for dataset, similar, method, seed in absent]
    return lines


def _num(mean: float, ci: float) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.2f}" if not math.isfinite(ci) else f"{mean:.2f} ± {ci:.2f}"


def _compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """How retrain's RI sits relative to the oracle's, judged by whether the 95% CIs overlap."""
    (ma, ca), (mb, cb) = a, b
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return "cannot compare"
    if not (math.isfinite(ca) and math.isfinite(cb)):
        return "no CI with a single seed"
    if ma - ca > mb + cb:
        return "retrain higher, CIs do not overlap"
    if ma + ca < mb - cb:
        return "retrain lower, CIs do not overlap"
    return "CIs overlap"


def _is_c(value: Any, positive: bool) -> bool:
    try:
        c = float(value)
    except (TypeError, ValueError):
        return False
    return c > 0 if positive else c == 0


def finding(dataset: Any, rows: Sequence[Mapping[str, Any]]) -> str:
    """One data-driven sentence comparing retrain's and the oracle's RI with and without near-duplicates."""
    lookup = {(r["similar"], r["method"]): r for r in rows if r["dataset"] == dataset}
    similars = list(dict.fromkeys(c for c, _ in lookup))
    clauses = []

    def pair(c: Any) -> tuple[tuple[float, float], tuple[float, float]] | None:
        missing = [m for m in ("retrain", "oracle") if (c, m) not in lookup]
        if missing:
            clauses.append(f"at C={format_c(c)} there is no {' or '.join(missing)} result")
            return None
        return metric_stat(lookup[(c, "retrain")], RI), metric_stat(lookup[(c, "oracle")], RI)

    near = [c for c in similars if _is_c(c, positive=True)]
    for c in near:
        got = pair(c)
        if got:
            r, o = got
            clauses.append(f"with C={format_c(c)} near-duplicates, retrain has RI {_num(*r)} "
                           f"vs the oracle's {_num(*o)} ({_compare(r, o)})")
    if not near:
        clauses.append("there is no near-duplicate group (C>0) in the results")
    control = [c for c in similars if _is_c(c, positive=False)]
    if control:
        got = pair(control[0])
        if got:
            r, o = got
            without = "without them" if near else "without near-duplicates"
            clauses.append(f"{without} (C=0), retrain {_num(*r)} vs oracle {_num(*o)} ({_compare(r, o)})")
    else:
        clauses.append("there is no C=0 control group in the results")
    text = "; ".join(clauses)
    text = text[0].upper() + text[1:] + "."
    # Which approximate method comes closest to the oracle where near-duplicates are hardest (largest C).
    if near:
        c = max(near, key=float)
        o_mean = metric_stat(lookup.get((c, "oracle")), RI)[0]
        others = [(m, metric_stat(row, RI)) for (cc, m), row in lookup.items()
                  if cc == c and m not in ("original", "retrain", "oracle") and math.isfinite(metric_stat(row, RI)[0])]
        if others and math.isfinite(o_mean):
            best, stat = min(others, key=lambda x: abs(x[1][0] - o_mean))
            text += f" Of the other methods at C={format_c(c)}, `{best}` comes closest to the oracle (RI {_num(*stat)})."
    text += "".join(_expansion_sentence(lookup, c) for c in similars)
    return f"**Finding ({dataset}).** {text}"


def _expansion_sentence(lookup: Mapping[tuple[Any, Any], Mapping[str, Any]], c: Any) -> str:
    """How far the "+similar" rows at C=c move each method's RI towards the oracle's ("" without such rows)."""
    moves = []
    for (cc, name), row in lookup.items():
        base = similar_base(str(name))
        if cc != c or base is None:
            continue
        moves.append(f"`{base}` {_num(*metric_stat(lookup.get((c, base)), RI))} → {_num(*metric_stat(row, RI))}")
    if not moves:
        return ""
    oracle = _num(*metric_stat(lookup.get((c, "oracle")), RI))
    return f" With the near-duplicates found added (`{SIMILAR_SUFFIX}`) at C={format_c(c)}, RI goes {', '.join(moves)} (oracle {oracle})."


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
                           ("model", "model"), ("seed", "seeds")):
            vals = _values(recs, key)
            if vals:
                shown = ", ".join(format_c(v) if key in ("targets", "similar") else str(v) for v in vals)
                parts.append(f"{label}: {shown}")
        methods = ", ".join(f"`{m}`" for m in dict.fromkeys(r["method"] for r in recs))
        parts.append(f"methods: {methods}")
        lines.append(f"- **{dataset}**: " + "; ".join(parts))
    return lines


def build_report(out_dir: str | os.PathLike[str], records: Sequence[Mapping[str, Any]] | None = None) -> Path:
    """Write ``report.md``, ``residual_influence.png`` and ``accuracy.png`` into ``out_dir``.

    ``records`` defaults to the contents of ``out_dir/results.json``. Returns the report's path.
    Raises FileNotFoundError / ValueError, naming the file, when results are missing or malformed.
    """
    out = Path(out_dir)
    if records is None:
        records = load_results(out / RESULTS_NAME)
    else:
        records = check_records(records)
        if not records:
            raise ValueError("records is empty; nothing to report")
    summary = summarize(records)
    # Figures before the report: if plotting fails, report.md keeps its previous contents.
    plot_residual_influence(summary, out / RI_PNG)
    plot_accuracies(summary, out / ACCURACY_PNG)
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    expanded = any(similar_base(str(r["method"])) is not None for r in summary)
    parts = [
        "# Unlearning with near-duplicates: study report", "", INTRO.format(min_gap=DEFAULT_RI_MIN_GAP),
        *([SIMILAR_INTRO.format(suffix=SIMILAR_SUFFIX)] if expanded else []),
        "## Setup", "", *_setup(records), "",
        "## Findings", "", *(line for d in datasets for line in (finding(d, summary), "")),
        "## Figures", "",
        f"![Residual influence by method and C]({RI_PNG})", "",
        f"![Target, near-duplicate and test accuracy by method]({ACCURACY_PNG})", "",
        "## Results (mean ± 95% CI over seeds)", "",
        format_table(summary, style="markdown"),
        *_missing_section(records),
    ]
    report = out / REPORT_NAME
    write_text(report, "\n".join(parts).rstrip("\n") + "\n")
    return report
