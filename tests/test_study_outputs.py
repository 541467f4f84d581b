"""The study's output folder and the CLI around it: unwritable folders found before any work, nothing
left behind by a failed validation, results never lost to a failed write, one-line errors."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import unlearn_fast.study as study
from unlearn_fast import atomic_io, cli
from unlearn_fast.context import get_context
from unlearn_fast.data import DATASETS
from unlearn_fast.evaluate import METRICS
from unlearn_fast.methods import METHODS
from unlearn_fast.models import MODELS
from unlearn_fast.report.markdown import load_results
from unlearn_fast.report.summary import RESULTS_SCHEMA_VERSION, missing_rows


def _no_training(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the study started working before finding that --out cannot be written")
    monkeypatch.setattr(study, "_warm_up", refuse)
    monkeypatch.setattr(study, "_run_one_condition", refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_an_unwritable_out_is_found_before_any_work(tmp_path, monkeypatch, capsys):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_mkstemp = atomic_io.tempfile.mkstemp

    def denied(*args, dir=None, **kwargs):  # what an unprivileged user meets in a chmod 555 folder
        if Path(dir) == readonly:
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(atomic_io.tempfile, "mkstemp", denied)
    _no_training(monkeypatch)
    for out in (readonly, readonly / "sub" / "folder"):
        code = cli.main(["study", "--quick", "--seeds", "1", "--methods", "finetune", "--out", str(out), "--no-progress"])
        assert code == 2
        assert re.search(rf"--out {re.escape(str(out))} cannot be written \(Permission denied in {re.escape(str(readonly))}\)",
                         _one_line_error(capsys))
    assert list(readonly.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 555 folder")
def test_a_read_only_out_as_an_unprivileged_user(tmp_path, monkeypatch, capsys):
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    _no_training(monkeypatch)
    try:
        assert cli.main(["study", "--quick", "--seeds", "1", "--out", str(readonly), "--no-progress"]) == 2
        assert "cannot be written" in _one_line_error(capsys)
        assert cli.main(["report", str(readonly)]) == 2
        _one_line_error(capsys)
    finally:
        readonly.chmod(0o755)


def test_a_failed_validation_creates_no_folder(tmp_path):
    out = tmp_path / "new" / "results"
    with pytest.raises(ValueError, match="device"):
        study.run_study(seeds=1, quick=True, out=out, device="tpu", progress=False)
    with pytest.raises(ValueError, match="valid methods"):
        study.run_study(seeds=1, quick=True, out=out, methods=["nope"], progress=False)
    assert not (tmp_path / "new").exists()


def test_a_failed_final_write_saves_the_records_elsewhere(tmp_path, monkeypatch):
    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(study, "write_study_folder", full_disk)
    records = [{"schema_version": RESULTS_SCHEMA_VERSION, "dataset": "d", "method": "retrain", "seed": 0, "similar": 0,
                "test_acc": 0.9}]
    with pytest.raises(OSError, match="No space left on device") as info:
        study.write_results(tmp_path, records)
    saved = Path(re.search(r"the records are saved in (\S+results\.json)", str(info.value)).group(1))
    assert load_results(saved) == records
    assert list(tmp_path.iterdir()) == []


def test_a_method_that_diverges_keeps_the_finished_conditions(tmp_path, monkeypatch, capsys):
    real = study.unlearn

    def diverges_at_c0(model, ids, method, **kwargs):
        if method == "finetune" and len(get_context(model).similar or {}) and not any(get_context(model).similar.values()):
            raise FloatingPointError("method 'finetune' produced non-finite parameters: '1.weight' ...")
        return real(model, ids, method, **kwargs)

    monkeypatch.setattr(study, "unlearn", diverges_at_c0)
    argv = ["study", "--quick", "--seeds", "1", "--similar", "2", "0", "--targets", "3", "--methods", "finetune",
            "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(argv) == 2
    err = _one_line_error(capsys)
    assert "method 'finetune' produced non-finite parameters" in err
    saved = Path(re.search(r"are saved in (\S+results\.json)", err).group(1))
    assert {(r["similar"], r["method"]) for r in load_results(saved)} == {(2, m) for m in ("original", "retrain", "oracle", "finetune")}
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["_parser", "_study"])
def test_an_interrupt_anywhere_ends_with_one_line_and_130(where, monkeypatch, capsys):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, where, interrupted)
    assert cli.main(["study", "--quick"]) == 130
    assert "interrupted" in _one_line_error(capsys)


def test_cli_errors_use_cli_words(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "unlearn-fast study --out" in err and "records=" not in err


def _results(tmp_path, records):
    (tmp_path / "results.json").write_text(json.dumps(records))
    return tmp_path / "results.json"


def _record(**extra):
    return {"schema_version": RESULTS_SCHEMA_VERSION, "dataset": "d", "method": "retrain", "seed": 0, "similar": 0,
            "test_acc": 0.9, **extra}


def test_results_must_carry_their_schema_version_and_numbers(tmp_path):
    record = _record()
    del record["schema_version"]
    with pytest.raises(ValueError, match=r"record 1 \('retrain', seed 0\) has no schema_version"):
        load_results(_results(tmp_path, [_record(), record]))
    with pytest.raises(ValueError, match=r"record 1 \('retrain', seed 0\) holds '0.97' under 'test_acc'; a metric must be a number or null"):
        load_results(_results(tmp_path, [_record(), _record(test_acc="0.97")]))
    assert load_results(_results(tmp_path, [_record(), _record(test_acc=None)]))[1]["test_acc"] is None


def test_a_run_cut_short_lists_every_row_it_lacks():
    records = [_record(method=m, seed=s, similar=c) for c in (10, 0) for m in ("retrain", "oracle") for s in (0, 1, 2)
               if not (c == 0 and s == 2)]  # cut during the last seed's C=0 condition
    assert missing_rows(records) == [("d", 0, "retrain", 2), ("d", 0, "oracle", 2)]


def test_list_shows_whole_descriptions_without_internal_names():
    for registry in (DATASETS, MODELS, METHODS, METRICS):
        for entry in registry:
            doc = inspect.getdoc(entry.fn) or ""
            first = " ".join(doc.split("\n\n", 1)[0].split()).replace("``", "")
            if first.startswith(entry.description):  # taken from the docstring: its whole first paragraph
                assert entry.description == first, (entry.name, entry.description)
            assert not re.search(r"\b[A-Z][A-Z0-9]*_[A-Z0-9_]+\b", entry.description), (entry.name, entry.description)
            assert "``" not in entry.description, entry.name


def test_the_command_ignores_an_interrupt_after_its_work_is_done():
    # Python restores SIGINT's default action while it shuts down; a late Ctrl-C then killed the finished
    # command with exit code -2 and no message. After console_main the process keeps main's exit code.
    code = ("import os, signal, sys; from unlearn_fast.cli import console_main; sys.argv = ['unlearn-fast', 'list']; "
            "code = console_main(); os.kill(os.getpid(), signal.SIGINT); sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0 and "Traceback" not in done.stderr and "datasets:" in done.stdout


def test_the_terminal_shows_the_headline_first(tmp_path, monkeypatch, capsys):
    records = [_record(method=m, seed=s, similar=c, residual_influence=value + 0.01 * s, seconds=1.0, seconds_vs_retrain=1.0)
               for c in (10, 0) for m, value in (("original", 1.0), ("retrain", 0.9 if c else 0.0), ("oracle", 0.0))
               for s in (0, 1, 2)]

    def fake_study(**kwargs):
        study.write_results(Path(kwargs["out"]), records)
        return records

    monkeypatch.setattr(study, "run_study", fake_study)
    assert cli.main(["study", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Headline. With 10 near-duplicates per target (d, 3 seeds), retraining without the targets "
                          "(retrain) leaves RI 0.91 ± 0.02")
    wrote = out.splitlines()[-1]
    assert f"open {tmp_path / 'report.html'}" in wrote
    assert all(f" {p.name}" in wrote for p in tmp_path.iterdir())  # every file of the set is named


def test_report_into_an_unwritable_folder_is_one_line(tmp_path, monkeypatch, capsys):
    study.write_results(tmp_path, [_record(method=m) for m in ("original", "retrain", "oracle")])

    def denied(*_args, **_kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(atomic_io.tempfile, "mkdtemp", denied)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "Permission denied" in _one_line_error(capsys)
