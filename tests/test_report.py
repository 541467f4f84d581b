"""Tests for unlearn_fast.report: seed aggregation, tables, figures and the markdown report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from unlearn_fast.report import build_report, format_table, plot_accuracies, plot_residual_influence, summarize
from unlearn_fast.report import markdown as report_markdown
from unlearn_fast.report.plots import ri_figure
from unlearn_fast.report.summary import RESULTS_SCHEMA_VERSION

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS = ["original", "retrain", "oracle", "finetune", "gradient_ascent"]
# residual influence per (similar, method) for seeds 0, 1, 2
RI = {
    (10, "original"): [1.0, 1.0, 1.0], (10, "retrain"): [0.7, 0.8, 0.9], (10, "oracle"): [0.0, 0.0, 0.0],
    (10, "finetune"): [0.5, 0.4, 0.6], (10, "gradient_ascent"): [0.2, None, 0.3],
    (0, "original"): [1.0, 1.0, 1.0], (0, "retrain"): [0.01, -0.02, 0.04], (0, "oracle"): [0.0, 0.0, 0.0],
    (0, "finetune"): [0.5, 0.5, 0.5], (0, "gradient_ascent"): [0.1, 0.2, float("nan")],
}


def _records() -> list[dict]:
    recs = []
    for seed in range(3):
        for c in (10, 0):
            for m in METHODS:
                recs.append({
                    "schema_version": RESULTS_SCHEMA_VERSION, "dataset": "digits-blockmask", "method": m, "seed": seed, "similar": c, "targets": 20,
                    "model": "mlp", "seconds": 1.0 + seed, "target_acc": 1.0 - 0.1 * seed,
                    "similar_acc": None if c == 0 else 0.9, "retain_acc": 1.0, "test_acc": 0.97,
                    "mia_auc": 0.7, "residual_influence": RI[(c, m)][seed], "ri_targets_used": 12,
                })
    return recs


def _row(summary: list[dict], similar: int, method: str) -> dict:
    return next(r for r in summary if r["similar"] == similar and r["method"] == method)


def _ci(values: list[float]) -> float:
    a = np.asarray(values, dtype=float)
    return float(stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size))


# ---------------------------------------------------------------- summarize

def test_summarize_hand_computed() -> None:
    recs = [{"dataset": "d", "method": "m", "seed": s, "similar": 0, "x": v} for s, v in enumerate([1, 2, 3])]
    x = summarize(recs)[0]["metrics"]["x"]
    assert x["n"] == 3 and x["mean"] == pytest.approx(2.0)
    assert x["ci95"] == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    assert x["ci95"] == pytest.approx(2.4841, abs=1e-4)


def test_summarize_drops_none_and_nan_and_small_n() -> None:
    recs = [{"dataset": "d", "method": "m", "seed": s, "similar": 0, "x": v, "y": w, "z": None}
            for s, (v, w) in enumerate([(1.0, None), (None, float("nan")), (float("nan"), 5.0), (3.0, None)])]
    recs.append({"dataset": "d", "method": "other", "seed": 0, "similar": 0, "x": 1.0, "z": 2.0})
    m = summarize(recs)[0]["metrics"]
    assert m["x"]["n"] == 2 and m["x"]["mean"] == pytest.approx(2.0)
    assert m["x"]["ci95"] == pytest.approx(_ci([1.0, 3.0]))
    assert m["y"]["n"] == 1 and m["y"]["mean"] == 5.0 and math.isnan(m["y"]["ci95"])
    assert m["z"]["n"] == 0 and math.isnan(m["z"]["mean"]) and math.isnan(m["z"]["ci95"])


def test_summarize_grouping_order_and_metric_keys() -> None:
    summary = summarize(_records())
    assert [(r["similar"], r["method"]) for r in summary] == [(10, m) for m in METHODS] + [(0, m) for m in METHODS]
    assert all(set(r) == {"dataset", "similar", "method", "metrics"} for r in summary)
    names = set(summary[0]["metrics"])
    # identifying keys are never metrics; bookkeeping numbers are
    assert not names & {"dataset", "method", "seed", "similar", "targets", "model"}
    assert {"seconds", "ri_targets_used", "residual_influence", "similar_acc"} <= names
    ga = _row(summary, 10, "gradient_ascent")["metrics"]["residual_influence"]
    assert ga["n"] == 2 and ga["mean"] == pytest.approx(0.25)
    assert _row(summary, 0, "retrain")["metrics"]["similar_acc"]["n"] == 0


def test_summarize_method_order_is_first_appearance_across_groups() -> None:
    recs = [{"dataset": "d", "method": m, "seed": 0, "similar": c, "a": 1.0}
            for c, m in [(5, "zeta"), (5, "alpha"), (0, "alpha"), (0, "zeta"), (0, "beta")]]
    summary = summarize(recs)
    assert [(r["similar"], r["method"]) for r in summary] == [(5, "zeta"), (5, "alpha"), (0, "zeta"), (0, "alpha"), (0, "beta")]


def test_summarize_rejects_bad_records() -> None:
    with pytest.raises(ValueError, match="record 1"):
        summarize([{"dataset": "d", "method": "m"}, {"dataset": "d"}])
    with pytest.raises(ValueError):
        summarize("not records")


# ---------------------------------------------------------------- format_table

def test_format_table_text_and_markdown() -> None:
    summary = summarize(_records())
    retrain_ri = f"0.800 ± {_ci([0.7, 0.8, 0.9]):.3f}"
    text = format_table(summary)
    assert "digits-blockmask, similar=10 (3 seeds)" in text and "digits-blockmask, similar=0 (3 seeds)" in text
    assert retrain_ri in text
    assert "n/a" in text  # similar_acc at C=0
    header = next(line for line in text.splitlines() if line.startswith("method"))
    cols = header.split()
    assert cols[:3] == ["method", "target_acc", "similar_acc"] and cols[-2:] == ["seconds", "ri_targets_used"]
    # aligned: every row of a table has the same width
    first = text.split("\n\n")[0].splitlines()[1:]
    assert len({len(line) for line in first[:2]}) == 1

    md = format_table(summary, metrics=["residual_influence", "similar_acc"], style="markdown")
    assert "### digits-blockmask, similar=10 (3 seeds)" in md
    assert "| method | residual_influence | similar_acc |" in md
    assert f"| retrain | {retrain_ri} | 0.900 ± 0.000 |" in md
    # Bold only where the best is distinguishable from the runner-up: at C=0 retrain's RI is closest to the
    # oracle's, but gradient_ascent's wide CI (two seeds) reaches the oracle too, so nothing is marked ...
    assert "**" not in md and "| n/a |" in md
    # ... until only finetune (0.5, no spread) competes with it; all tie on similar_acc at C=10
    narrower = format_table(summarize([r for r in _records() if r["method"] != "gradient_ascent"]),
                            metrics=["residual_influence", "similar_acc"], style="markdown")
    assert "| retrain | **0.010 ± " in narrower and narrower.count("**") == 2
    assert "**" not in format_table(summary)  # the terminal table stays plain
    with pytest.raises(ValueError, match="style"):
        format_table(summary, style="html")


def test_format_table_single_seed_shows_mean_only() -> None:
    summary = summarize([{"dataset": "d", "method": "m", "seed": 0, "similar": 0, "acc": 0.8125}])
    text = format_table(summary)
    assert "d, similar=0 (1 seed)" in text and "0.812" in text and "±" not in text


# ---------------------------------------------------------------- plots and report

def test_plots_write_png_and_handle_nan(tmp_path: Path) -> None:
    recs = _records()
    for r in recs:
        if r["similar"] == 0:
            r["residual_influence"] = None  # a whole C group without RI
    summary = summarize(recs)
    for fn, name in ((plot_residual_influence, "ri.png"), (plot_accuracies, "acc.png")):
        for records in (None, recs):  # means only, and a dot per seed (NaN seeds drawn as nothing)
            out = fn(summary, tmp_path / name, records=records)
            assert out == tmp_path / name and out.read_bytes()[:8] == PNG_MAGIC
            width, height = Image.open(out).size
            assert width <= 2.2 * height  # no strip: panels wrap into a grid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acc.png", "ri.png"]  # no temp files left
    ri = ri_figure(summary, recs)
    control = next(ax for ax in ri.axes if "control" in ax.get_title())
    assert [t.get_text() for t in control.texts] == ["no residual_influence values"]  # said once, not a row of n/a
    assert all(ax.get_xscale() == "linear" for ax in ri.axes)


def test_build_report(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_records()))
    (tmp_path / "notes.txt").write_text("keep me")
    report = build_report(tmp_path)
    assert report == tmp_path / "report.md"
    for png in ("residual_influence.png", "accuracy.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "accuracy.png", "notes.txt", "report.html", "report.md", "residual_influence.png", "results.json"]
    text = report.read_text(encoding="utf-8")
    assert "![" in text and "(residual_influence.png)" in text and "(accuracy.png)" in text
    assert "| method |" in text and "targets: 20" in text

    finding = next(line for line in text.splitlines() if line.startswith("**Finding"))
    r10, o10 = np.mean(RI[(10, "retrain")]), np.mean(RI[(10, "oracle")])
    # Stated: retrain above the oracle at C=10 beyond the CIs. Not stated: C=0, where the CIs overlap.
    assert f"With C=10 near-duplicates, retrain's RI is {r10:.2f} ± {_ci(RI[(10, 'retrain')]):.2f}, above the oracle's {o10:.2f}" in finding
    assert "C=0" not in finding and finding.endswith("Differences not named here are within the 95% CIs.")
    headline = next(line for line in text.splitlines() if line.startswith("> **Headline.**"))
    assert text.index(headline) < text.index("**Question.**")  # first, before the introduction
    assert f"retraining without the targets (`retrain`) leaves RI {r10:.2f} ± {_ci(RI[(10, 'retrain')]):.2f}" in headline
    assert "(the CIs do not overlap)" in headline and "3 seeds" in headline


def test_build_report_says_when_a_group_is_missing(tmp_path: Path) -> None:
    recs = [r for r in _records() if r["similar"] == 10 and r["method"] != "oracle"]
    text = build_report(tmp_path, records=recs).read_text(encoding="utf-8")
    finding = next(line for line in text.splitlines() if line.startswith("**Finding"))
    assert "no oracle result" in finding and "no C=0 control group" in finding
    assert not (tmp_path / "results.json").exists()


def test_partial_results_list_the_missing_rows(tmp_path: Path) -> None:
    recs = [r for r in _records() if not (r["method"] == "finetune" and r["seed"] == 1 and r["similar"] == 10)
            and not (r["method"] == "oracle" and r["seed"] == 2 and r["similar"] == 0)]
    text = build_report(tmp_path, records=recs).read_text(encoding="utf-8")
    section = text.split("## Missing rows", 1)[1]
    assert "2 (method, seed) row(s) are absent" in section
    assert "- digits-blockmask, C=10: `finetune`, seed 1" in section
    assert "- digits-blockmask, C=0: `oracle`, seed 2" in section
    assert "## Missing rows" not in build_report(tmp_path, records=_records()).read_text(encoding="utf-8")


def test_results_from_another_schema_version_are_refused(tmp_path: Path) -> None:
    recs = _records()
    for r in recs:
        r["schema_version"] = RESULTS_SCHEMA_VERSION
    (tmp_path / "results.json").write_text(json.dumps(recs))
    text = build_report(tmp_path).read_text(encoding="utf-8")
    assert "| schema_version" not in text  # an identifying key, not a metric column
    recs[3]["schema_version"] = RESULTS_SCHEMA_VERSION + 1
    (tmp_path / "results.json").write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=rf"record 3 has schema_version {RESULTS_SCHEMA_VERSION + 1}; this unlearn_fast "
                                         rf"reads version {RESULTS_SCHEMA_VERSION}"):
        build_report(tmp_path)


def test_build_report_missing_or_malformed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "results.json"))):
        build_report(tmp_path)
    bad = tmp_path / "results.json"
    for content, why in (("{not json", "not valid JSON"), ('{"a": 1}', "list"), ("[]", "no result records"),
                         ("[1, 2]", "not a dict"), ('[{"dataset": "d"}]', "method")):
        bad.write_text(content)
        with pytest.raises(ValueError, match=why) as info:
            build_report(tmp_path)
        assert str(bad) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_plot_failure_keeps_previous_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "results.json").write_text(json.dumps(_records()))
    before = build_report(tmp_path).read_bytes()
    (tmp_path / "report.md").write_bytes(before + b"<!-- sentinel -->\n")
    expected = (tmp_path / "report.md").read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report_markdown, "plot_accuracies", boom)
    with pytest.raises(RuntimeError, match="plotting failed"):
        build_report(tmp_path)
    assert (tmp_path / "report.md").read_bytes() == expected
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_time_ratio_is_a_ratio_of_medians_with_the_seed_range() -> None:
    recs = []
    for seed, (method_s, retrain_s) in enumerate([(1.0, 2.0), (1.5, 2.0), (30.0, 4.0)]):  # one seed under load
        for method, seconds in (("retrain", retrain_s), ("fast", method_s)):
            recs.append({"dataset": "d", "method": method, "seed": seed, "similar": 0, "seconds": seconds,
                         "seconds_vs_retrain": seconds / retrain_s})
    fast = next(r for r in summarize(recs) if r["method"] == "fast")["metrics"]["seconds_vs_retrain"]
    assert fast["mean"] == pytest.approx(1.5 / 2.0) and (fast["low"], fast["high"]) == (0.5, 7.5)
    assert "0.750 (0.500–7.500)" in format_table(summarize(recs))


def test_headline_names_the_similarity_rows() -> None:
    from unlearn_fast.report.findings import headline

    recs = [{**r, "method": "retrain+similar", "residual_influence": 0.01 * r["seed"]}
            for r in _records() if r["method"] == "oracle"]
    line = headline(summarize(_records() + recs))
    assert line.startswith("With 10 near-duplicates per target (digits-blockmask, 3 seeds)")
    assert "`retrain+similar` leaves 0.01 ± 0.02 (within the CIs)" in line
