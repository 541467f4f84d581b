"""The study end to end, its output schema and files, and its bad-input handling."""

from __future__ import annotations

import json
import math

import pytest

from unlearn_fast import cli
from unlearn_fast.methods import METHODS
from unlearn_fast.study import DEFAULT_METHODS, run_study

REQUIRED_METRICS = {"target_acc", "similar_acc", "retain_acc", "test_acc", "mia_auc", "residual_influence"}


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    (out / "notes.txt").write_text("mine")
    code = cli.main(["study", "--quick", "--seeds", "2", "--targets", "30", "--out", str(out), "--no-progress"])
    assert code == 0
    return out


def test_quick_study_writes_the_schema(quick_study):
    records = json.loads((quick_study / "results.json").read_text())
    assert {(r["method"], r["similar"]) for r in records} >= {(m, c) for m in ("original", "retrain", "oracle") for c in (10, 0)}
    # seeds × conditions × (original, oracle and every default method)
    assert len(records) == 2 * 2 * (2 + len(DEFAULT_METHODS))
    assert {r["method"] for r in records} == {"original", "oracle", *DEFAULT_METHODS}
    assert set(METHODS.names()) - {"oracle"} <= set(DEFAULT_METHODS)  # every registered method is studied
    for r in records:
        assert {"dataset", "method", "seed", "similar"} <= set(r) and REQUIRED_METRICS <= set(r)
        assert r["dataset"] == "digits-blockmask" and r["seed"] in (0, 1)
        assert (r["similar_acc"] is None) == (r["similar"] == 0)
    header = (quick_study / "results.csv").read_text().splitlines()[0].split(",")
    assert {"dataset", "method", "seed", "similar"} | REQUIRED_METRICS <= set(header)
    assert (quick_study / "report.md").read_text().startswith("# ")
    for png in ("residual_influence.png", "accuracy.png"):
        assert (quick_study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (quick_study / "notes.txt").read_text() == "mine"


def test_references_and_the_near_duplicate_gap(quick_study):
    records = json.loads((quick_study / "results.json").read_text())

    def ri(method, similar):
        values = [r["residual_influence"] for r in records if r["method"] == method and r["similar"] == similar]
        return sum(values) / len(values)

    # Plumbing: original ≡ 1 and oracle ≡ 0 by the RI formula, so these check that the references
    # reach the metric, not a finding.
    assert ri("original", 10) == pytest.approx(1.0) and ri("oracle", 10) == pytest.approx(0.0)
    # The finding, measured: with near-duplicates left in, retraining without the targets keeps most
    # of their influence.
    assert ri("retrain", 10) > 0.5
    # Without near-duplicates retrain and oracle train on the same data from the same start, so they
    # must coincide exactly; this checks the two code paths agree.
    assert ri("retrain", 0) == pytest.approx(ri("oracle", 0), abs=1e-6)
    # Measured: the default near-duplicate search finds exactly the planted copies on these seeds,
    # so retraining without them too is the oracle.
    assert ri("retrain+similar", 10) == pytest.approx(0.0, abs=1e-6)


def test_run_study_api_without_output():
    records = run_study(methods=["finetune"], seeds=1, similar=[2], quick=True, progress=False,
                        dataset_options={"targets": 5})
    assert [r["method"] for r in records] == ["original", "retrain", "oracle", "finetune"]
    assert all(r["similar"] == 2 and r["targets"] == 5 for r in records)


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "imagenet"], "valid datasets: digits-blockmask"),
    (["--methods", "forget_all"], "valid methods: "),
    (["--seeds", "0"], "seeds=0 must be an int >= 1"),
    (["--similar", "-1"], "similar=-1"),
    (["--targets", "5000"], "targets=5000"),
])
def test_cli_bad_input(argv, message, tmp_path, capsys):
    assert cli.main(["study", "--out", str(tmp_path / "o"), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_out_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert cli.main(["study", "--quick", "--out", str(target), "--no-progress"]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_failed_run_leaves_earlier_results(tmp_path, monkeypatch):
    (tmp_path / "results.json").write_text("[]\n")
    from unlearn_fast.methods import METHODS

    def explode(*_args, **_kwargs):
        raise RuntimeError("method crashed")

    entry = METHODS.get("finetune")
    monkeypatch.setitem(METHODS._entries, "finetune", type(entry)(entry.name, explode, entry.defaults, entry.description))
    with pytest.raises(RuntimeError, match="method crashed"):
        run_study(seeds=1, similar=[1], quick=True, out=tmp_path, progress=False, dataset_options={"targets": 3})
    assert (tmp_path / "results.json").read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_cli_report_and_list(quick_study, capsys):
    assert cli.main(["report", str(quick_study)]) == 0
    assert cli.main(["list"]) == 0
    listing = capsys.readouterr().out
    assert "digits-blockmask" in listing and "gradient_ascent" in listing and "residual_influence" in listing


def test_nan_metrics_are_null_in_json(quick_study):
    text = (quick_study / "results.json").read_text()
    assert "NaN" not in text and not any(isinstance(v, float) and math.isnan(v) for r in json.loads(text) for v in r.values())


def test_plotting_failure_leaves_all_earlier_outputs(tmp_path, monkeypatch):
    run_study(seeds=1, similar=[1], quick=True, out=tmp_path, progress=False, dataset_options={"targets": 3})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    import unlearn_fast.report.markdown as markdown

    def broken(*_args, **_kwargs):
        raise RuntimeError("plotting broke")

    monkeypatch.setattr(markdown, "plot_accuracies", broken)
    with pytest.raises(RuntimeError, match="plotting broke"):
        run_study(seeds=1, similar=[2], quick=True, out=tmp_path, progress=False, dataset_options={"targets": 3})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("kwargs, message", [
    ({"similar": []}, "similar is empty"),
    ({"similar": 5.5}, "similar must be one value or a list of them, got 5.5"),
    ({"dataset_options": {"seed": 3}}, "must not set 'seed'"),
    ({"dataset_options": {"colour": 3}}, "valid options"),
    ({"metrics": ["f1"]}, "valid metrics"),
])
def test_run_study_bad_input_writes_nothing(tmp_path, kwargs, message):
    (tmp_path / "results.json").write_text("[]\n")
    with pytest.raises(ValueError, match=message):
        run_study(**{"seeds": 1, "quick": True, "out": tmp_path, "progress": False, **kwargs})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_single_names_are_not_split_into_characters():
    records = run_study(methods="finetune", similar=1, seeds=1, quick=True, progress=False,
                        dataset_options={"targets": 3}, metrics="target_acc")
    assert [r["method"] for r in records] == ["original", "retrain", "oracle", "finetune"]
    assert all("target_acc" in r and "test_acc" not in r for r in records)
