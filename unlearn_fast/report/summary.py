"""Aggregate study records over seeds (mean and Student-t 95% CI) and render them as tables.

A record is one flat dict per (dataset, method, seed, similar) as written to ``results.json`` by
``unlearn-fast study``. Every numeric key that is not an identifying key is a metric, so new
metrics show up in the report without touching this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

import numpy as np
from scipy import stats

from ..evaluate import METRICS
from ..evaluate.registry import CLOSEST_TO_ORACLE, HIGHEST, LOWEST

IDENTITY_KEYS = ("dataset", "method", "seed", "similar", "targets", "model", "schema_version", "shadows")
# The record layout this version writes and reads. Records without the key predate versioning
# (they hold the same identifying keys and metrics) and are read; any other version is refused.
RESULTS_SCHEMA_VERSION = 1

# Quality metrics first, in the order a reader asks about them; bookkeeping columns go last.
DEFAULT_METRIC_ORDER = (
    "target_acc", "similar_acc", "retain_acc", "test_acc", "target_loss", "target_confidence",
    "mia_auc", "residual_influence",
)
TIME_RATIO = "seconds_vs_retrain"  # summarised as a ratio of medians with a range (ratio_of_medians)
# The "+similar" rows' near-duplicate search counts sit with the bookkeeping.
TRAILING_METRICS = ("added", "added_precision", "added_recall", "seconds", "seconds_vs_retrain", "ri_targets_used")


# How "best" is judged per column: a metric's rule is the ``best`` fact on its registry entry
# (CLOSEST_TO_ORACLE = closest to the oracle row of the same (dataset, C) table; HIGHEST / LOWEST;
# None = not marked). Of the record's other numeric columns, which are not metrics, the times are
# judged here; the rest (the "+similar" search counts, bookkeeping) are never marked.
NON_METRIC_RULES = {"seconds": LOWEST, "seconds_vs_retrain": LOWEST}
# The rows that set the scale rather than compete: `original` is where unlearning starts, `oracle` where it should end.
REFERENCE_METHODS = ("original", "oracle")
BEST_NOTE = ("Bold marks the best value per column within each (dataset, C) table, among the methods other than "
             "`original` and `oracle`: for forget-quality metrics (accuracy, loss and confidence on the targets and "
             "near-duplicates, MIA/LiRA scores, divergences and distances to the oracle, residual influence, relearn "
             "steps) the value closest to the oracle's; for `retain_acc` / `test_acc` the highest; for `seconds` / "
             "`seconds_vs_retrain` the lowest. A value is marked only when it is distinguishable from the runner-up: "
             "its 95% CI (for `seconds_vs_retrain`, its range over seeds) is wholly better than every other method's, "
             "so most columns have no mark; bookkeeping columns are never marked. `seconds_vs_retrain` is the median "
             "time of the method over the median time of `retrain` in the same condition, with the range of the "
             "per-seed ratios in brackets.")


def is_number(value: Any) -> bool:
    # bool is a subclass of int, but a flag is not a metric to average.
    return isinstance(value, Real) and not isinstance(value, bool)


def check_records(records: Any) -> list[Mapping[str, Any]]:
    """Materialize ``records`` as a list, rejecting non-dicts and dicts without dataset/method."""
    if isinstance(records, (str, bytes)) or not isinstance(records, Iterable):
        raise ValueError(f"records must be a list of dicts, got {type(records).__name__}")
    records = list(records)
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i} is not a dict: {rec!r}")
        missing = [k for k in ("dataset", "method") if k not in rec]
        if missing:
            raise ValueError(f"record {i} lacks the identifying key(s) {missing}: {dict(rec)!r}")
        version = rec.get("schema_version", RESULTS_SCHEMA_VERSION)
        if version != RESULTS_SCHEMA_VERSION:
            raise ValueError(f"record {i} has schema_version {version!r}; this unlearn_fast reads version "
                             f"{RESULTS_SCHEMA_VERSION} (re-run the study with this version, or report with the one that wrote it)")
    return records


def missing_rows(records: Sequence[Mapping[str, Any]]) -> list[tuple[Any, Any, Any, Any]]:
    """(dataset, similar, method, seed) combinations absent from ``records``: every method and seed that
    appears anywhere for a dataset is expected at each of its C values, so a run cut short (a seed or a
    whole C never reached) lists the rows it lacks."""
    seen: dict[Any, dict[str, dict[Any, None]]] = {}
    present = set()
    for rec in records:
        row = (rec["dataset"], rec.get("similar"), rec["method"], rec.get("seed"))
        present.add(row)
        axes = seen.setdefault(row[0], {"similar": {}, "method": {}, "seed": {}})
        for axis, value in zip(("similar", "method", "seed"), row[1:]):
            axes[axis].setdefault(value, None)
    return [(dataset, c, m, s) for dataset, axes in seen.items() for c in axes["similar"] for m in axes["method"]
            for s in axes["seed"] if (dataset, c, m, s) not in present]


def metric_names(records: Iterable[Mapping[str, Any]]) -> list[str]:
    """Metric keys in order of first appearance: every key that holds a number in some record."""
    names: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if key not in IDENTITY_KEYS and is_number(value):
                names.setdefault(key, None)
    return list(names)


def mean_ci95(values: Iterable[Any]) -> dict[str, float | int]:
    """``{"mean", "ci95", "n"}`` over the finite numbers in ``values``; None/NaN/non-numbers are dropped.

    ``ci95`` is the half-width of the Student-t 95% interval of the mean, NaN when n < 2.
    """
    kept = np.array([float(v) for v in values if is_number(v) and math.isfinite(float(v))], dtype=float)
    n = int(kept.size)
    if n == 0:
        return {"mean": math.nan, "ci95": math.nan, "n": 0}
    mean = float(kept.mean())
    if n == 1:
        return {"mean": mean, "ci95": math.nan, "n": 1}
    half = float(stats.t.ppf(0.975, n - 1) * kept.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "ci95": half, "n": n}


def summarize(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group records by (dataset, similar, method) and give mean, 95% CI and n for every metric.

    Groups keep the order in which datasets, similar values and methods first appear. Every row
    carries every metric seen anywhere, so tables line up even where a metric is undefined (n=0).
    """
    records = check_records(records)
    names = metric_names(records)
    groups: dict[tuple[Any, Any], dict[Any, list[Mapping[str, Any]]]] = {}
    method_order: dict[Any, None] = {}
    for rec in records:
        method_order.setdefault(rec["method"], None)
        groups.setdefault((rec["dataset"], rec.get("similar")), {}).setdefault(rec["method"], []).append(rec)
    rows = []
    datasets = list(dict.fromkeys(ds for ds, _ in groups))
    for dataset in datasets:
        for (ds, similar), by_method in groups.items():
            if ds != dataset:
                continue
            # The global first-appearance order, so every group lists methods the same way.
            for method in (m for m in method_order if m in by_method):
                recs = by_method[method]
                metrics = {name: mean_ci95(r.get(name) for r in recs) for name in names}
                if TIME_RATIO in metrics:
                    metrics[TIME_RATIO] = ratio_of_medians(recs, by_method.get("retrain", []))
                rows.append({"dataset": dataset, "similar": similar, "method": method, "metrics": metrics})
    return rows


def ratio_of_medians(recs: Sequence[Mapping[str, Any]], retrain: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """``seconds_vs_retrain`` of one group: median seconds of the method over the median seconds of
    ``retrain`` in the same condition, with the range (``low``, ``high``) of the per-seed ratios.

    A t-interval of ratios of two noisy wall-clock times is meaningless (it read 5.5 ± 19.2 for a
    reference under load); the ratio of medians is robust to one slow seed, and the range shows the spread.
    """
    seconds = [float(r["seconds"]) for r in recs if is_number(r.get("seconds")) and math.isfinite(r["seconds"])]
    base = [float(r["seconds"]) for r in retrain if is_number(r.get("seconds")) and math.isfinite(r["seconds"])]
    per_seed = [float(r[TIME_RATIO]) for r in recs if is_number(r.get(TIME_RATIO)) and math.isfinite(r[TIME_RATIO])]
    if not seconds or not base or not per_seed:
        return mean_ci95(per_seed)
    return {"mean": float(np.median(seconds) / np.median(base)), "ci95": math.nan, "n": len(per_seed),
            "low": min(per_seed), "high": max(per_seed)}


def ordered_metrics(summary: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics present in ``summary``: preferred ones first, then others, then bookkeeping."""
    present: dict[str, None] = {}
    for row in summary:
        for name in row["metrics"]:
            present.setdefault(name, None)
    head = [m for m in DEFAULT_METRIC_ORDER if m in present]
    tail = [m for m in TRAILING_METRICS if m in present]
    middle = [m for m in present if m not in head and m not in tail]
    return head + middle + tail


def group_rows(summary: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, Any], list[Mapping[str, Any]]]:
    """Summary rows keyed by (dataset, similar), in order of appearance."""
    out: dict[tuple[Any, Any], list[Mapping[str, Any]]] = {}
    for row in summary:
        out.setdefault((row["dataset"], row["similar"]), []).append(row)
    return out


def best_rule(metric: str) -> str | None:
    """How the best value of the column ``metric`` is judged: a registered metric's ``best`` fact, or
    :data:`NON_METRIC_RULES` for the other columns; None: not marked."""
    return METRICS.get(metric).meta["best"] if metric in METRICS else NON_METRIC_RULES.get(metric)


def interval(stat: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """The 95% CI of a summary stat as (low, high) — its seed range for a ratio of medians — or None when undefined."""
    if not stat or stat.get("n", 0) < 2:
        return None
    if "low" in stat:
        return float(stat["low"]), float(stat["high"])
    mean, ci = stat.get("mean"), stat.get("ci95")
    if mean is None or ci is None or not (math.isfinite(mean) and math.isfinite(ci)):
        return None
    return mean - ci, mean + ci


def _score_interval(stat: Mapping[str, Any] | None, rule: str, ref: float) -> tuple[float, float] | None:
    """The interval of a method's score (lower is better) under ``rule``: its distance to the oracle's
    mean ``ref``, its negated value (highest wins) or its value (lowest wins)."""
    bounds = interval(stat)
    if bounds is None:
        return None
    low, high = bounds
    if rule == CLOSEST_TO_ORACLE:
        return (0.0 if low <= ref <= high else min(abs(low - ref), abs(high - ref))), max(abs(low - ref), abs(high - ref))
    return (-high, -low) if rule == HIGHEST else (low, high)


def best_cells(rows: Sequence[Mapping[str, Any]], metrics: Iterable[str]) -> set[tuple[Any, str]]:
    """(method, metric) pairs whose value is the best of its column in one (dataset, C) group of summary
    rows and distinguishable from the runner-up: the best method's 95% CI of its score lies wholly below
    every other method's. Only methods other than :data:`REFERENCE_METHODS` compete; a column needs two
    of them with a defined CI (two seeds or more)."""
    oracle = next((r for r in rows if r["method"] == "oracle"), None)
    candidates = [r for r in rows if r["method"] not in REFERENCE_METHODS]
    marked: set[tuple[Any, str]] = set()
    for metric in metrics:
        rule = best_rule(metric)
        if rule is None:
            continue
        ref = metric_stat(oracle, metric)[0]
        if rule == CLOSEST_TO_ORACLE and not math.isfinite(ref):
            continue
        scores = [(r["method"], _score_interval(r["metrics"].get(metric), rule, ref)) for r in candidates]
        # Rounded so that equal values computed along different float paths tie (|0.3 − 0.2| vs |0.1 − 0.2|).
        scores = [(m, (round(s[0], 9), round(s[1], 9))) for m, s in scores if s is not None]
        if len(scores) < 2:
            continue
        best_method, (_, best_high) = min(scores, key=lambda item: (item[1][0] + item[1][1]) / 2)
        if all(best_high < low for m, (low, _) in scores if m != best_method):
            marked.add((best_method, metric))
    return marked


def format_c(similar: Any) -> str:
    """``10`` for 10 and 10.0 alike, so JSON round trips do not change labels."""
    if is_number(similar) and math.isfinite(float(similar)) and float(similar).is_integer():
        return str(int(similar))
    return str(similar)


def format_cell(stat: Mapping[str, Any] | None, digits: int = 3) -> str:
    """``0.812 ± 0.041``; ``1.03 (0.80–1.40)`` for a ratio of medians with its range over seeds; just the
    mean when the CI is undefined; ``n/a`` when the mean is."""
    if not stat:
        return "n/a"
    mean, ci = stat.get("mean", math.nan), stat.get("ci95", math.nan)
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if "low" in stat and stat["n"] > 1:
        return f"{mean:.{digits}f} ({stat['low']:.{digits}f}–{stat['high']:.{digits}f})"
    if ci is None or not math.isfinite(ci):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {ci:.{digits}f}"


def _seed_count(rows: Sequence[Mapping[str, Any]]) -> int:
    # Each record is one seed, so the largest per-metric n is the number of seeds that ran.
    return max((s["n"] for row in rows for s in row["metrics"].values()), default=0)


def table_heading(dataset: Any, similar: Any, rows: Sequence[Mapping[str, Any]]) -> str:
    """``digits-blockmask, similar=10 (3 seeds)``: the title of one (dataset, C) table."""
    seeds = _seed_count(rows)
    return f"{dataset}, similar={format_c(similar)} ({seeds} seed{'' if seeds == 1 else 's'})"


def _text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Method names read best left-aligned, numbers right-aligned so decimals line up.
        parts = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def _markdown_table(header: list[str], body: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(c) for c in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def format_table(summary: Sequence[Mapping[str, Any]], metrics: Sequence[str] | None = None,
                 style: str = "text") -> str:
    """One table per (dataset, similar) group: rows are methods, cells ``mean ± ci95``.

    ``style="text"`` aligns columns for a terminal; ``style="markdown"`` gives pipe tables under
    ``###`` headings, with the best cell of each column in bold (:func:`best_cells`). ``metrics`` picks
    and orders the columns (default: :func:`ordered_metrics`).
    """
    if style not in ("text", "markdown"):
        raise ValueError(f"style must be 'text' or 'markdown', got {style!r}")
    cols = list(metrics) if metrics is not None else ordered_metrics(summary)
    blocks = []
    for (dataset, similar), rows in group_rows(summary).items():
        header = ["method", *cols]
        body = [[str(r["method"]), *(format_cell(r["metrics"].get(m)) for m in cols)] for r in rows]
        heading = table_heading(dataset, similar, rows)
        if style == "markdown":
            best = best_cells(rows, cols)
            body = [[cell if j == 0 or (r["method"], cols[j - 1]) not in best else f"**{cell}**"
                     for j, cell in enumerate(line)] for r, line in zip(rows, body)]
            blocks.append(f"### {heading}\n\n{_markdown_table(header, body)}")
        else:
            blocks.append(f"{heading}\n{_text_table(header, body)}")
    return "\n\n".join(blocks) + ("\n" if blocks else "")


def metric_stat(row: Mapping[str, Any] | None, metric: str) -> tuple[float, float]:
    """(mean, ci95) of ``metric`` in a summary row as floats, NaN where absent."""
    if row is None:
        return math.nan, math.nan
    stat = row["metrics"].get(metric) or {}
    mean, ci = stat.get("mean"), stat.get("ci95")
    return (math.nan if mean is None else float(mean)), (math.nan if ci is None else float(ci))
