"""The sentences of a report that state results: the headline and one finding per dataset.

Every number comes from the summary rows (mean ± 95% CI over seeds). A comparison is stated only
where the two CIs do not overlap; what stays within the CIs is not described one by one, and each
finding ends by saying so. Residual influence is read from its per-condition median over targets
(``residual_influence_median``) where the records hold it: the mean over targets is dominated by a
few exploding ratios (README, "What the numbers say").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..methods.expansion import SIMILAR_SUFFIX, similar_base
from .summary import format_c, metric_stat

RI_MEDIAN = "residual_influence_median"
RI_MEAN = "residual_influence"
ULIRA = "ulira_accuracy_targets"
REFERENCES = ("original", "retrain", "oracle")
WITHIN_CIS = "Differences not named here are within the 95% CIs."

Stat = tuple[float, float]
Lookup = Mapping[tuple[Any, Any], Mapping[str, Any]]


def ri_metric(rows: Sequence[Mapping[str, Any]]) -> str:
    """The residual-influence metric the sentences use: the median over targets when recorded."""
    return RI_MEDIAN if any(math.isfinite(metric_stat(r, RI_MEDIAN)[0]) for r in rows) else RI_MEAN


def num(stat: Stat) -> str:
    """``0.12 ± 0.03``; the mean alone without a CI; ``n/a`` without a mean."""
    mean, ci = stat
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.2f}" if not math.isfinite(ci) else f"{mean:.2f} ± {ci:.2f}"


def separation(a: Stat, b: Stat) -> int:
    """+1 when ``a``'s 95% CI lies wholly above ``b``'s, −1 wholly below, 0 when they overlap or either is undefined."""
    (ma, ca), (mb, cb) = a, b
    if not separation_defined(a, b):
        return 0
    return 1 if ma - ca > mb + cb else -1 if ma + ca < mb - cb else 0


def separation_defined(a: Stat, b: Stat) -> bool:
    """Whether both means and both CIs are defined (two seeds or more)."""
    return all(math.isfinite(v) for v in (*a, *b))


def _versus(a: Stat, b: Stat) -> str:
    """Whether ``a`` and ``b`` differ beyond their 95% CIs, in words."""
    if not separation_defined(a, b):
        return "one seed: no CI" if all(math.isfinite(v) for v in (a[0], b[0])) else "not comparable"
    return "the CIs do not overlap" if separation(a, b) else "within the CIs"


def _c_value(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _lookup(dataset: Any, rows: Sequence[Mapping[str, Any]]) -> Lookup:
    return {(r["similar"], r["method"]): r for r in rows if r["dataset"] == dataset}


def headline(summary: Sequence[Mapping[str, Any]]) -> str | None:
    """One sentence on the study's central question, from the dataset's largest C: what retraining
    without the targets leaves, against the oracle, and what the similarity-aware rows leave. None
    when the results hold no C>0 condition with both retrain and the oracle."""
    datasets = list(dict.fromkeys(r["dataset"] for r in summary))
    for dataset in datasets:
        lookup = _lookup(dataset, summary)
        near = [c for c, _ in lookup if (_c_value(c) or 0) > 0 and (c, "retrain") in lookup and (c, "oracle") in lookup]
        if not near:
            continue
        c = max(near, key=lambda value: float(value))
        metric = ri_metric([row for (cc, _), row in lookup.items() if cc == c])
        retrain, oracle = metric_stat(lookup[(c, "retrain")], metric), metric_stat(lookup[(c, "oracle")], metric)
        if not (math.isfinite(retrain[0]) and math.isfinite(oracle[0])):
            continue  # no target carried measurable influence (every gap below ri_min_gap): nothing to state
        what = "median RI" if metric == RI_MEDIAN else "RI"
        seeds = (lookup[(c, "retrain")]["metrics"].get(metric) or {}).get("n")
        text = (f"With {format_c(c)} near-duplicates per target ({dataset}, {seeds} seed{'' if seeds == 1 else 's'}), "
                f"retraining without the targets (`retrain`) leaves {what} {num(retrain)} of their influence, where the "
                f"oracle, which never saw them or their near-duplicates, has {num(oracle)} ({_versus(retrain, oracle)})")
        similar_rows = [(m, metric_stat(row, metric)) for (cc, m), row in lookup.items()
                        if cc == c and similar_base(str(m)) is not None and math.isfinite(metric_stat(row, metric)[0])]
        if similar_rows:
            text += "; with the near-duplicates that `find_similar` found removed as well, " + ", ".join(
                f"`{m}` leaves {num(stat)}" + (f" ({_versus(stat, oracle)})" if separation_defined(stat, oracle) else "")
                for m, stat in similar_rows)
        return text + "."
    return None


def finding(dataset: Any, rows: Sequence[Mapping[str, Any]]) -> str:
    """The data-driven paragraph of one dataset: retrain against the oracle at each C, the method
    closest to the oracle at the largest C, what the ``+similar`` rows change, U-LiRA; only
    differences beyond the CIs are stated."""
    lookup = _lookup(dataset, rows)
    metric = ri_metric([row for row in lookup.values()])
    label = "median RI" if metric == RI_MEDIAN else "RI"
    similars = list(dict.fromkeys(c for c, _ in lookup))
    sentences = []
    for c in similars:
        missing = [m for m in ("retrain", "oracle") if (c, m) not in lookup]
        if missing:
            sentences.append(f"At C={format_c(c)} there is no {' or '.join(missing)} result.")
            continue
        r, o = metric_stat(lookup[(c, "retrain")], metric), metric_stat(lookup[(c, "oracle")], metric)
        side = separation(r, o)
        if side:
            where = f"with C={format_c(c)} near-duplicates" if (_c_value(c) or 0) > 0 else "without near-duplicates (C=0)"
            sentences.append(f"{where[0].upper()}{where[1:]}, retrain's {label} is {num(r)}, {'above' if side > 0 else 'below'} "
                             f"the oracle's {num(o)}.")
    if not any((_c_value(c) or 0) > 0 for c in similars):
        sentences.append("There is no near-duplicate group (C>0) in the results.")
    if not any(_c_value(c) == 0 for c in similars):
        sentences.append("There is no C=0 control group in the results.")
    sentences += _closest(lookup, similars, metric, label)
    sentences += [s for c in similars for s in (_expansion(lookup, c, metric, label), _ulira(lookup, c)) if s]
    sentences.append(WITHIN_CIS)
    return f"**Finding ({dataset}).** " + " ".join(sentences)


def _closest(lookup: Lookup, similars: list[Any], metric: str, label: str) -> list[str]:
    """Which approximate method comes closest to the oracle where near-duplicates are hardest (largest C)."""
    near = [c for c in similars if (_c_value(c) or 0) > 0]
    if not near:
        return []
    c = max(near, key=lambda value: float(value))
    oracle = metric_stat(lookup.get((c, "oracle")), metric)[0]
    others = [(m, metric_stat(row, metric)) for (cc, m), row in lookup.items()
              if cc == c and m not in REFERENCES and math.isfinite(metric_stat(row, metric)[0])]
    if not others or not math.isfinite(oracle):
        return []
    best, stat = min(others, key=lambda x: abs(x[1][0] - oracle))
    return [f"Of the other methods at C={format_c(c)}, `{best}` comes closest to the oracle ({label} {num(stat)})."]


def _expansion(lookup: Lookup, c: Any, metric: str, label: str) -> str:
    """The ``+similar`` rows at C=c whose {label} moved beyond the CIs from their base method's."""
    moves = []
    for (cc, name), row in lookup.items():
        base = similar_base(str(name))
        if cc != c or base is None:
            continue
        before, after = metric_stat(lookup.get((c, base)), metric), metric_stat(row, metric)
        if separation(before, after):
            moves.append(f"`{base}` {num(before)} → {num(after)}")
    if not moves:
        return ""
    oracle = num(metric_stat(lookup.get((c, "oracle")), metric))
    return (f"Adding the near-duplicates found (`{SIMILAR_SUFFIX}`) at C={format_c(c)} moves {label}: "
            f"{', '.join(moves)} (oracle {oracle}).")


def _ulira(lookup: Lookup, c: Any) -> str:
    """U-LiRA at C=c: the attack's power on `original`, and the methods whose CI lies above the
    oracle's ("" when the shadow-model metric did not run)."""
    stats = {m: metric_stat(row, ULIRA) for (cc, m), row in lookup.items() if cc == c}
    stats = {m: s for m, s in stats.items() if math.isfinite(s[0])}
    if not {"original", "oracle"} <= set(stats):
        return ""
    above = [m for m, s in stats.items() if m not in ("original", "oracle") and separation(s, stats["oracle"]) > 0]
    listed = ", ".join(f"`{m}`" for m in above) if above else "none"
    return (f"U-LiRA at C={format_c(c)} (0.5 = indistinguishable from never trained on the target): original "
            f"{num(stats['original'])}, the oracle {num(stats['oracle'])}; methods whose CI lies above the oracle's: {listed}.")


__all__ = ["WITHIN_CIS", "finding", "headline", "num", "ri_metric", "separation"]
