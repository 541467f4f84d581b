"""Similarity-aware unlearning: unlearn/influence_unlearn(similar=...), the "+similar" study rows and their report."""

from __future__ import annotations

import copy

import pytest

import unlearn_fast as uf
from helpers import same_params
from unlearn_fast import cli
from unlearn_fast.context import get_context
from unlearn_fast.methods.expansion import SimilarExpansion
from unlearn_fast.report import markdown as report_markdown
from unlearn_fast.report import summarize
from unlearn_fast.similarity import find as find_module
from unlearn_fast.study import run_study, split_method, study_methods

# A high embedding threshold keeps the expansion small (a handful of ids), so retraining stays fast.
THRESHOLD = 0.99
EMBED = {"similar": THRESHOLD, "similar_method": "embedding"}


def _retrain(model, ids, **options):
    return uf.unlearn(model, ids, "retrain", device="cpu", progress=False, **options)


@pytest.fixture(scope="module")
def expected(small_digits, trained_mlp):
    """What find_similar says about the targets, less the targets themselves."""
    targets = small_digits.forget_ids
    hits = uf.find_similar(small_digits, targets, threshold=THRESHOLD, method="embedding", model=trained_mlp,
                           device="cpu", progress=False)
    found = {t: [(j, s) for j, s in hits[t] if j not in set(targets)] for t in targets}
    assert any(found.values()), "the threshold finds nothing: the test would not exercise the expansion"
    return found


def _assert_found(expansion: SimilarExpansion, expected):
    assert list(expansion.found) == list(expected)
    for target, pairs in expected.items():
        assert [j for j, _ in expansion.found[target]] == [j for j, _ in pairs]
        assert [s for _, s in expansion.found[target]] == pytest.approx([s for _, s in pairs])


def test_remove_adds_exactly_what_find_similar_finds(small_digits, trained_mlp, expected):
    out = _retrain(trained_mlp, small_digits.forget_ids, **EMBED)
    expansion = out.unlearn_fast_similar
    _assert_found(expansion, expected)
    added = sorted({j for pairs in expected.values() for j, _ in pairs})
    assert expansion.added_ids == added == expansion.similar_ids
    assert (expansion.action, expansion.method, expansion.threshold) == ("remove", "embedding", THRESHOLD)
    assert set(get_context(out).removed_ids) == set(small_digits.forget_ids) | set(added)
    assert get_context(trained_mlp).removed_ids == ()


def test_report_lists_but_removes_nothing(small_digits, trained_mlp, expected):
    listed = _retrain(trained_mlp, small_digits.forget_ids, similar_action="report", **EMBED)
    plain = _retrain(trained_mlp, small_digits.forget_ids)
    _assert_found(listed.unlearn_fast_similar, expected)
    assert listed.unlearn_fast_similar.added_ids == [] and listed.unlearn_fast_similar.action == "report"
    assert get_context(listed).removed_ids == get_context(plain).removed_ids == tuple(sorted(small_digits.forget_ids))
    assert same_params(listed, plain)


def test_none_is_the_plain_method(small_digits, trained_mlp):
    a = _retrain(trained_mlp, small_digits.forget_ids)
    b = _retrain(trained_mlp, small_digits.forget_ids, similar=None)
    assert a.unlearn_fast_similar is None and b.unlearn_fast_similar is None
    assert same_params(a, b) and get_context(a).removed_ids == get_context(b).removed_ids


def test_requests_compose(small_digits, trained_mlp):
    first_targets = small_digits.forget_ids[:3]
    first = uf.unlearn(trained_mlp, first_targets, "finetune", epochs=1, device="cpu", progress=False, **EMBED)
    removed = set(get_context(first).removed_ids)
    assert removed == set(first_targets) | set(first.unlearn_fast_similar.added_ids)
    second_targets = [t for t in small_digits.forget_ids[3:] if t not in removed]
    second = uf.unlearn(first, second_targets, "finetune", epochs=1, device="cpu", progress=False, **EMBED)
    expansion = second.unlearn_fast_similar
    # Ids gone since the first request are neither listed nor added again.
    assert not removed & set(expansion.similar_ids)
    assert set(get_context(second).removed_ids) == removed | set(second_targets) | set(expansion.added_ids)
    if first.unlearn_fast_similar.added_ids:
        with pytest.raises(ValueError, match="already unlearned"):
            uf.unlearn(second, first.unlearn_fast_similar.added_ids[:1], "finetune", progress=False)
    # A later request without expansion does not inherit the earlier request's record.
    third = uf.unlearn(second, [i for i in range(50) if i not in get_context(second).removed_ids][:1], "finetune",
                       epochs=1, device="cpu", progress=False)
    assert third.unlearn_fast_similar is None


@pytest.mark.parametrize("options, message", [
    ({"similar": "bogus"}, "similar='bogus' is not valid; valid choices: None"),
    ({"similar": True}, "similar=True is not valid"),
    ({"similar": -2.0}, r"similar=-2.0 must be a finite number in \[-1.0, 1.0\]"),
    ({"similar": 0.9, "similar_action": "delete"}, "similar_action='delete' is not valid; valid choices: 'remove', 'report'"),
    ({"similar": 0.9, "similar_method": "faiss"}, "similar_method='faiss' is not valid; valid choices: 'auto', 'embedding'"),
    ({"similar": 0.0, "similar_method": "minhash"}, r"threshold=0.0 must be a finite number in \(0.0, 1.0\]"),
])
def test_bad_options(small_digits, trained_mlp, options, message):
    with pytest.raises(ValueError, match=message):
        _retrain(trained_mlp, small_digits.forget_ids, **options)
    with pytest.raises(ValueError, match=message):
        uf.influence_unlearn(trained_mlp, small_digits.forget_ids, device="cpu", progress=False, **options)


def test_auto_is_minhash_on_images_and_finds_the_planted_copies(small_digits, trained_mlp):
    out = uf.unlearn(trained_mlp, small_digits.forget_ids, "finetune", epochs=1, device="cpu", progress=False,
                     similar="auto", similar_action="report")
    expansion = out.unlearn_fast_similar
    assert expansion.method == find_module.default_method(small_digits) == "minhash"
    assert expansion.threshold == find_module.DEFAULT_THRESHOLDS[("minhash", "inputs")]
    # Measured on this seed: block-masked copies keep their pixels, so MinHash finds exactly them.
    assert {t: sorted(j for j, _ in pairs) for t, pairs in expansion.found.items()} == small_digits.similar


def test_influence_report_lists_the_expansion(small_digits, trained_mlp, expected):
    model = copy.deepcopy(trained_mlp)  # influence_unlearn works in place
    targets = small_digits.forget_ids
    report = uf.influence_unlearn(model, targets, device="cpu", progress=False, **EMBED)
    _assert_found(report.similar, expected)
    assert report.removed_ids == sorted({*targets, *report.similar.added_ids}) == sorted(get_context(model).removed_ids)
    # The registered method goes through unlearn's expansion; its report holds the same record.
    out = uf.unlearn(trained_mlp, targets, "influence", device="cpu", progress=False, similar_action="report", **EMBED)
    assert out.unlearn_fast_report.similar is out.unlearn_fast_similar
    assert out.unlearn_fast_report.removed_ids == sorted(targets)


def test_study_method_names():
    assert split_method("retrain+similar") == ("retrain", {"similar": "auto", "similar_action": "remove"})
    assert split_method("influence") == ("influence", {})
    assert study_methods(["retrain+similar", "influence+similar"])[-2:] == ["retrain+similar", "influence+similar"]
    with pytest.raises(ValueError, match=r"unknown method 'foo' in 'foo\+similar'; valid methods: finetune"):
        study_methods(["foo+similar"])


def test_cli_rejects_an_unknown_base_method(tmp_path, capsys):
    assert cli.main(["study", "--methods", "foo+similar", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "unknown method 'foo' in 'foo+similar'; valid methods: " in capsys.readouterr().err


def test_study_row_and_report(tmp_path):
    records = run_study(methods=["retrain+similar"], seeds=1, similar=[2], quick=True, progress=False,
                        dataset_options={"targets": 5}, out=tmp_path)
    assert [r["method"] for r in records] == ["original", "retrain", "oracle", "retrain+similar"]
    row = records[-1]
    # Default method and threshold on digits: the planted copies (5 targets × 2), measured on seed 0.
    assert (row["added"], row["added_precision"], row["added_recall"]) == (10, 1.0, 1.0)
    assert "added" not in records[1]
    report = (tmp_path / "report.md").read_text()
    assert "**Similarity-aware rows.**" in report
    # A quick run on 5 targets leaves no target with a measurable RI gap: no headline rather than "RI n/a".
    assert "**Headline.**" not in report and "RI n/a" not in report


def test_finding_reports_the_change_per_method():
    records = [{"dataset": "d", "method": m, "seed": s, "similar": 10, "residual_influence": ri}
               for s in range(2) for m, ri in [("original", 1.0), ("retrain", 0.8), ("oracle", 0.0),
                                               ("retrain+similar", 0.1), ("influence+similar", 0.2)]]
    text = report_markdown.finding("d", summarize(records))
    # Only moves beyond the CIs are named: influence has no base row to move from.
    assert "moves RI: `retrain` 0.80 ± 0.00 → 0.10 ± 0.00 (oracle 0.00 ± 0.00)." in text and "`influence`" not in text
