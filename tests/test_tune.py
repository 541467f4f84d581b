"""`unlearn-fast tune`: search spaces, seeded draws, the oracle-gap objective, result files and the CLI."""

from __future__ import annotations

import json
import math
import numbers
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unlearn_fast import cli
from unlearn_fast import tune as tune_module
from unlearn_fast.methods import METHODS
from unlearn_fast.methods.search_spaces import (
    SEARCH_SPACES,
    Space,
    choice,
    integer,
    linear,
    log,
)
from unlearn_fast.study import check_method_options
from unlearn_fast.tune import (
    TUNE_METRICS,
    TUNE_SCHEMA_VERSION,
    Trial,
    draw_trials,
    load_tuned,
    oracle_gap,
    tune_method,
)

ORACLE = {"target_acc": 0.9, "similar_acc": math.nan, "retain_acc": 1.0, "test_acc": 0.96, "mia_auc": 0.5,
          "js_to_oracle_targets": 0.0}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A real tiny search: finetune, 2 trials, 10 targets, written into a folder as finetune.json."""
    folder = tmp_path_factory.mktemp("tuned")
    result = tune_method("finetune", trials=2, dataset_options={"targets": 10}, quick=True, device="cpu", progress=False,
                         out=folder)
    return result, folder / "finetune.json"


def test_every_tunable_method_has_a_space_of_registered_options():
    assert set(SEARCH_SPACES) == set(METHODS.names()) - {"retrain", "oracle"}
    for method, space in SEARCH_SPACES.items():
        defaults = METHODS.get(method).defaults
        assert space and set(space) <= set(defaults), method
        for option, s in space.items():
            default = defaults[option]
            if isinstance(default, numbers.Number):  # trial 0 (the defaults) is a point of the space
                assert s.contains(default), (method, option, default)


@pytest.mark.parametrize("make, message", [
    (lambda: Space("grid", 0, 1), "kind"),
    (lambda: linear(1.0, 1.0), "low < high"),
    (lambda: log(0.0, 1.0), "low > 0"),
    (lambda: integer(1, 2.5), "integer bounds"),
    (lambda: choice(), "at least one"),
])
def test_bad_spaces_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_draws_are_seeded_and_inside_the_space():
    first, again, other = draw_trials("graddiff", 6, 0), draw_trials("graddiff", 6, 0), draw_trials("graddiff", 6, 1)
    assert first == again and first != other
    defaults = METHODS.get("graddiff").defaults
    assert first[0] == {k: defaults[k] for k in SEARCH_SPACES["graddiff"]} == other[0]
    for values in first[1:]:
        assert all(SEARCH_SPACES["graddiff"][k].contains(v) for k, v in values.items())
        assert isinstance(values["epochs"], int) and isinstance(values["lr"], float)
    drawn = draw_trials("influence", 40, 3)[1:]
    assert {v["curvature"] for v in drawn} == {"ggn", "fisher"}


@pytest.mark.parametrize("method, trials, seed, message", [
    ("retrain", 3, 0, "nothing to tune"),
    ("nope", 3, 0, "valid methods"),
    ("ssd", 0, 0, "trials"),
    ("ssd", 3, -1, "seed"),
])
def test_draws_reject_bad_input(method, trials, seed, message):
    with pytest.raises(ValueError, match=message):
        draw_trials(method, trials, seed)


def test_oracle_gap_by_hand():
    model = {"target_acc": 0.8, "similar_acc": 0.3, "retain_acc": 0.97, "test_acc": 0.9, "mia_auc": 0.6,
             "js_to_oracle_targets": 0.05}
    # similar_acc is undefined for the oracle (no near-duplicates): skipped; the other five gaps
    # are 0.1, 0.03, 0.06, 0.1 and 0.05.
    assert oracle_gap(model, ORACLE, TUNE_METRICS) == pytest.approx((0.1 + 0.03 + 0.06 + 0.1 + 0.05) / 5)
    assert oracle_gap(ORACLE, ORACLE, TUNE_METRICS) == 0.0
    assert oracle_gap({**model, "test_acc": math.nan}, ORACLE, TUNE_METRICS) == math.inf
    with pytest.raises(ValueError, match="missing"):
        oracle_gap({"target_acc": 1.0}, ORACLE, TUNE_METRICS)
    with pytest.raises(ValueError, match="nothing to compare"):
        oracle_gap({"similar_acc": 0.5}, {"similar_acc": math.nan}, ["similar_acc"])


def test_over_and_under_unlearning_both_score_worse_than_matching():
    under = {**ORACLE, "target_acc": 1.0, "mia_auc": 0.58}              # the targets still remembered
    over = {**ORACLE, "target_acc": 0.7, "test_acc": 0.92, "mia_auc": 0.42}  # pushed past the oracle
    matching = {**ORACLE, "target_acc": 0.9, "test_acc": 0.955, "mia_auc": 0.51}
    gaps = {name: oracle_gap(m, ORACLE, TUNE_METRICS) for name, m in (("under", under), ("over", over), ("matching", matching))}
    assert gaps["matching"] < gaps["under"] and gaps["matching"] < gaps["over"]


def test_a_tiny_real_search_writes_a_valid_file(tuned):
    result, path = tuned
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == TUNE_SCHEMA_VERSION and doc["method"] == "finetune"
    assert doc["dataset"] == "digits-blockmask" and doc["similar"] == 0 and doc["tune_seeds"] == [1000]
    assert doc["quick"] is True and doc["seed"] == 0 and doc["dataset_options"] == {"targets": 10}
    assert len(doc["trials"]) == 2 and doc["trials"][0]["values"] == {"epochs": 5, "lr": 0.02}
    for trial, kept in zip(doc["trials"], result.trials):
        assert trial["error"] is None and trial["objective"] >= 0
        assert set(trial["metrics"]["1000"]) == set(TUNE_METRICS) == set(trial["oracle_metrics"]["1000"])
        assert trial["metrics"]["1000"]["similar_acc"] is None  # NaN (no near-duplicates) written as null
        gap = oracle_gap(kept.metrics["1000"], kept.oracle_metrics["1000"], TUNE_METRICS)
        assert trial["objective"] == pytest.approx(gap)
    objectives = [t["objective"] for t in doc["trials"]]
    assert doc["best"]["objective"] == min(objectives) and doc["defaults_objective"] == objectives[0]
    assert doc["original_objective"] >= 0 and doc["original_objective"] == result.original_objective
    assert doc["best"]["values"] == doc["trials"][objectives.index(min(objectives))]["values"]
    assert result.path == path


def test_load_tuned_round_trip(tuned, tmp_path):
    result, path = tuned
    expected = {"finetune": result.best.values}
    assert load_tuned(path) == load_tuned([str(path)]) == load_tuned(path.parent) == expected
    assert check_method_options(load_tuned(path)) == expected  # what run_study(method_options=...) takes
    other = json.loads(path.read_text())
    other.update(method="ssd", best={"values": {"alpha": 2.0}, "objective": 0.1})
    (tmp_path / "ssd.json").write_text(json.dumps(other))
    assert load_tuned([path, tmp_path / "ssd.json"]) == {**expected, "ssd": {"alpha": 2.0}}


def _write(folder, name, doc):
    (folder / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return folder / name


@pytest.mark.parametrize("change, message", [
    (lambda d: {**d, "schema_version": 2}, "schema_version 2"),
    (lambda d: {**d, "best": {"values": {"momentum": 0.5}}}, "unknown option"),
    (lambda d: {**d, "method": "nope"}, "unknown method"),
    (lambda d: {**d, "best": None}, "no 'best'"),
    (lambda d: [d], "JSON object"),
    (lambda d: "{not json", "as JSON"),
])
def test_load_tuned_rejects_malformed_files_naming_them(tuned, tmp_path, change, message):
    doc = json.loads(tuned[1].read_text())
    bad = _write(tmp_path, "bad.json", change(doc))
    with pytest.raises(ValueError, match=message) as info:
        load_tuned(bad)
    assert str(bad) in str(info.value)


def test_load_tuned_rejects_duplicates_and_missing_paths(tuned, tmp_path):
    text = tuned[1].read_text()
    _write(tmp_path, "a.json", text)
    _write(tmp_path, "b.json", text)
    with pytest.raises(ValueError, match="two tuned files for method 'finetune'"):
        load_tuned(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        load_tuned(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .json files"):
        load_tuned(tmp_path / "empty")
    with pytest.raises(ValueError, match="no tuned files"):
        load_tuned([])


def test_failed_trials_score_inf_and_keep_their_error(monkeypatch):
    setup = tune_module._Setup(1000, SimpleNamespace(forget_ids=[0]), None, dict(ORACLE), 0.0, None)

    def diverge(model, ids, method, **options):
        raise FloatingPointError("overflow")

    monkeypatch.setattr(tune_module, "unlearn", diverge)
    trial = tune_module._run_trial("finetune", {"lr": 0.02}, [setup], torch.device("cpu"))
    assert trial.objective == math.inf and trial.error == "FloatingPointError: overflow"
    # A non-finite result is unlearn's FloatingPointError (tests/test_no_silent_failures.py): the same path.


def test_ties_go_to_the_defaults_and_all_failed_raises(monkeypatch, tmp_path):
    monkeypatch.setattr(tune_module, "_setup", lambda *a: tune_module._Setup(1000, None, None, dict(ORACLE), 0.5, None))
    monkeypatch.setattr(tune_module, "_run_trial", lambda method, values, setups, dev: Trial(values, 0.25))
    result = tune_method("ssd", trials=4, progress=False, device="cpu")
    assert result.best_index == 0 and result.best.values == {"alpha": 1.5, "lam": 1.5}
    assert result.original_objective == 0.5
    monkeypatch.setattr(tune_module, "_run_trial", lambda method, values, setups, dev: Trial(values, math.inf, error="boom"))
    with pytest.raises(ValueError, match="every trial of 'ssd' failed; the first: boom"):
        tune_method("ssd", trials=2, progress=False, device="cpu", out=tmp_path / "ssd.json")
    assert not (tmp_path / "ssd.json").exists()


@pytest.mark.parametrize("kwargs, message", [
    ({"similar": -1}, "similar"),
    ({"tune_seeds": []}, "tune_seeds is empty"),
    ({"tune_seeds": [3, 3]}, "duplicates"),
    ({"dataset": "nope"}, "unknown dataset"),
    ({"dataset_options": {"seed": 1}}, "must not set"),
    ({"dataset_options": {"colour": 1}}, "unknown option"),
    ({"dataset_options": [("targets", 3)]}, "must be a dict"),
    ({"quick": "yes"}, "quick"),
])
def test_tune_method_rejects_bad_input_before_training(monkeypatch, kwargs, message):
    monkeypatch.setattr(tune_module, "_setup", lambda *a: pytest.fail("trained before validating"))
    with pytest.raises(ValueError, match=message):
        tune_method("finetune", progress=False, **kwargs)


def test_cli_tune_passes_its_options_and_prints_the_choice(tuned, monkeypatch, capsys, tmp_path):
    seen = {}

    def fake(method, **kwargs):
        seen.update(method=method, **kwargs)
        return tuned[0]

    monkeypatch.setattr(tune_module, "tune_method", fake)
    argv = ["tune", "--method", "finetune", "--trials", "3", "--seed", "7", "--similar", "2", "--targets", "10",
            "--full", "--tune-seeds", "5", "6", "--out", str(tmp_path), "--no-progress", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert seen == {"method": "finetune", "dataset": "digits-blockmask", "trials": 3, "seed": 7, "similar": 2,
                    "tune_seeds": [5, 6], "quick": False, "device": "cpu", "progress": False, "out": str(tmp_path),
                    "dataset_options": {"targets": 10}}
    out = capsys.readouterr().out
    assert "0 (defaults)" in out and "finetune: epochs=" in out and "wrote" in out
    assert cli.main(["tune", "--method", "finetune", "--no-progress"]) == 0
    assert seen["quick"] is False and str(seen["out"]) == "unlearn-fast-tuned/finetune.json"


@pytest.mark.parametrize("argv, message", [
    (["--method", "oracle"], "nothing to tune"),
    (["--method", "ssd", "--trials", "0"], "trials=0"),
    (["--method", "ssd", "--dataset", "nope"], "unknown dataset"),
])
def test_cli_tune_bad_input(argv, message, capsys):
    assert cli.main(["tune", "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err


def test_cli_study_tuned(tuned, monkeypatch, tmp_path, capsys):
    seen = {}
    monkeypatch.setattr("unlearn_fast.study.run_study", lambda **kwargs: seen.update(kwargs) or [])
    assert cli.main(["study", "--quick", "--tuned", str(tuned[1]), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert seen["method_options"] == {"finetune": tuned[0].best.values}
    bad = _write(tmp_path, "bad.json", {"schema_version": 99})
    assert cli.main(["study", "--tuned", str(bad), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert str(bad) in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_numpy_ints_are_accepted():
    assert len(draw_trials("ssd", np.int64(3), np.int64(2))) == 3


def test_load_tuned_refuses_another_task_or_the_study_seeds(tuned, tmp_path):
    _, path = tuned  # digits-blockmask, quick, tune seed 1000
    assert load_tuned(path, dataset="digits-blockmask", quick=True, seeds=range(3)) == {"finetune": tuned[0].best.values}
    with pytest.raises(ValueError, match="tuned with quick=True, the study runs quick=False"):
        load_tuned(path, quick=False)
    with pytest.raises(ValueError, match="tuned with dataset='digits-blockmask', the study runs dataset='mnist-blockmask'"):
        load_tuned(path, dataset="mnist-blockmask")
    with pytest.raises(ValueError, match=r"tune seeds \[1000\] are also study seeds"):
        load_tuned(path, seeds=range(1001))


def test_an_out_without_json_suffix_is_a_folder(tmp_path):
    assert tune_module.tuned_path(tmp_path / "new_folder", "ssd") == tmp_path / "new_folder" / "ssd.json"
    assert tune_module.tuned_path(tmp_path / "mine.json", "ssd") == tmp_path / "mine.json"
