"""Multi-file outputs commit as a set: a write cut at any filesystem call leaves the old set or the new one.

A cut is simulated by making the k-th filesystem call that changes the disk (os.replace, os.unlink,
os.rmdir, os.fsync) raise, and every later one too, as if the process had been killed there: its
clean-up code cannot run either. The folder is then read the way the project reads it, and must hold
exactly the complete old set or the complete new one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch

import unlearn_fast as uf
from unlearn_fast import atomic_io
from unlearn_fast.report import folder as study_folder
from unlearn_fast.report.summary import RESULTS_SCHEMA_VERSION

CALLS = ("replace", "unlink", "rmdir", "fsync")


class Killed(BaseException):
    """The process died here: not an Exception, so no `except Exception` clean-up runs."""


@contextmanager
def killed_at(k: int | None, monkeypatch: pytest.MonkeyPatch, count: list[int]) -> Iterator[None]:
    """Kill at the k-th disk-changing call (0-based); k=None only counts them into ``count``."""
    state = {"dead": False}
    originals = {name: getattr(os, name) for name in CALLS}

    def wrap(name: str) -> Callable:
        def call(*args, **kwargs):
            if state["dead"] or (k is not None and count[0] == k):
                state["dead"] = True
                raise Killed(f"killed at call {count[0]} ({name})")
            count[0] += 1
            return originals[name](*args, **kwargs)
        return call

    with monkeypatch.context() as m:
        for name in CALLS:
            m.setattr(os, name, wrap(name))
        yield


def snapshot(folder: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in names if (folder / name).is_file()}


def every_cut(write: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """The cut positions of ``write``: 0 .. n, n the number of its disk-changing calls (n: after the last)."""
    count = [0]
    with killed_at(None, monkeypatch, count):
        write()
    return iter(range(count[0] + 1))


# ---------------------------------------------------------------- the primitive

def test_a_failure_before_the_commit_point_keeps_the_old_set(tmp_path):
    (tmp_path / "a.txt").write_text("old a")
    (tmp_path / "b.png").write_text("old figure")
    (tmp_path / "mine.txt").write_text("not the set's")
    with pytest.raises(RuntimeError):
        with atomic_io.commit_set(tmp_path, ("a.txt", "b.png"), "s", remove_missing=True) as staging:
            atomic_io.write_text(staging / "a.txt", "new a")
            raise RuntimeError("plotting failed")
    assert snapshot(tmp_path, ("a.txt", "b.png")) == {"a.txt": b"old a", "b.png": b"old figure"}
    with atomic_io.commit_set(tmp_path, ("a.txt", "b.png"), "s") as staging:
        atomic_io.write_text(staging / "a.txt", "new a")
    assert (tmp_path / "b.png").exists()  # by default a name not produced is left alone
    with atomic_io.commit_set(tmp_path, ("a.txt", "b.png"), "s", remove_missing=True) as staging:
        atomic_io.write_text(staging / "a.txt", "newer a")
    assert snapshot(tmp_path, ("a.txt", "b.png")) == {"a.txt": b"newer a"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "mine.txt"]


def test_a_failed_second_move_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    names = ("a.txt", "b.txt", "c.txt")
    for name in names:
        (tmp_path / name).write_text(f"old {name}")
    real_replace, moves = os.replace, []

    def second_move_fails(src, dst, *args, **kwargs):
        if Path(src).parent.name.startswith(atomic_io.STAGING_PREFIX) and Path(dst).parent == tmp_path:
            moves.append(dst)
            if len(moves) == 2:
                raise OSError(28, "No space left on device")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", second_move_fails)
    with pytest.raises(OSError, match="No space"):
        with atomic_io.commit_set(tmp_path, names, "s") as staging:
            for name in names:
                atomic_io.write_text(staging / name, f"new {name}")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "a.txt").read_text() == "new a.txt" and (tmp_path / "b.txt").read_text() == "old b.txt"  # mixed on disk
    atomic_io.settle(tmp_path, "s")
    assert snapshot(tmp_path, names) == {name: f"new {name}".encode() for name in names}
    assert sorted(p.name for p in tmp_path.iterdir()) == list(names)


def test_sets_in_one_folder_do_not_touch_each_other(tmp_path):
    with atomic_io.commit_set(tmp_path, ("model.json",), "model") as staging:
        atomic_io.write_text(staging / "model.json", "m")
    leftover = Path(tmp_path / "keep")
    leftover.mkdir()
    stale = Path(atomic_io.tempfile.mkdtemp(prefix=atomic_io._staging_prefix("model-2"), dir=tmp_path))
    atomic_io.settle(tmp_path, "model")
    assert stale.exists() and leftover.exists()  # another set's staging is not "model"'s to clean
    atomic_io.settle(tmp_path, "model-2")
    assert not stale.exists()


# ---------------------------------------------------------------- checkpoints

def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return uf.build_model("mlp", (1, 8, 8), 10, hidden=(8,))


def test_checkpoint_save_cut_anywhere_loads_old_or_new(tmp_path, monkeypatch):
    old, new = _model(0), _model(1)
    path = tmp_path / "ckpt" / "model"

    def params(model: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in model.parameters()]

    uf.save_checkpoint(old, tmp_path / "probe" / "model")
    cuts = list(every_cut(lambda: uf.save_checkpoint(new, tmp_path / "probe" / "model"), monkeypatch))
    assert len(cuts) > 8
    seen = set()
    for k in cuts:
        uf.save_checkpoint(old, path)
        try:
            with killed_at(k, monkeypatch, [0]):
                uf.save_checkpoint(new, path)
        except Killed:
            pass
        loaded = [p.detach() for p in uf.load_checkpoint(path).parameters()]
        which = [name for name, ref in (("old", params(old)), ("new", params(new)))
                 if all(torch.equal(a, b) for a, b in zip(loaded, ref))]
        assert len(which) == 1, f"cut at call {k}: the checkpoint loads as neither the old nor the new save"
        seen.add(which[0])
        assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"], f"cut at {k}"
    assert seen == {"old", "new"}


# ---------------------------------------------------------------- the study folder

def _records(value: float) -> list[dict]:
    return [{"schema_version": RESULTS_SCHEMA_VERSION, "dataset": "digits-blockmask", "method": method, "seed": seed,
             "similar": c, "targets": 5, "model": "mlp", "test_acc": value + 0.01 * seed, "residual_influence": value}
            for c in (3, 0) for method in ("original", "retrain", "oracle") for seed in (0, 1)]


def test_study_folder_cut_anywhere_reads_old_or_new(tmp_path, monkeypatch):
    names = study_folder.STUDY_FILES
    reference = {}
    for label, value in (("old", 0.5), ("new", 0.9)):
        study_folder.write_study_folder(tmp_path / label, _records(value), {"schema_version": 1, "conditions": []}
                                        if label == "old" else None)
        reference[label] = snapshot(tmp_path / label, names)
    assert set(reference["old"]) - set(reference["new"]) == {"details.json"}  # the new set drops a file

    out = tmp_path / "out"
    cuts = list(every_cut(lambda: study_folder.write_study_folder(tmp_path / "probe", _records(0.9)), monkeypatch))
    seen = set()
    for k in cuts:
        study_folder.write_study_folder(out, _records(0.5), {"schema_version": 1, "conditions": []})
        try:
            with killed_at(k, monkeypatch, [0]):
                study_folder.write_study_folder(out, _records(0.9))
        except Killed:
            pass
        records = study_folder.read_study_folder(out)
        got = snapshot(out, names)
        which = [label for label, files in reference.items() if got == files]
        assert len(which) == 1, f"cut at call {k}: the folder mixes the two sets ({sorted(got)})"
        assert records[0]["residual_influence"] == {"old": 0.5, "new": 0.9}[which[0]]
        seen.add(which[0])
        assert not [p.name for p in out.iterdir() if p.name.startswith(".")], f"cut at {k}: leftovers after reading"
    assert seen == {"old", "new"} and len(cuts) > 20


def test_report_refuses_a_folder_that_disagrees_with_its_manifest(tmp_path):
    study_folder.write_study_folder(tmp_path, _records(0.5))
    study_folder.rebuild_report(tmp_path)  # agrees: rebuilt
    (tmp_path / "results.csv").write_text("edited\n")
    with pytest.raises(ValueError, match="results.csv differs from it"):
        study_folder.rebuild_report(tmp_path)
    (tmp_path / study_folder.MANIFEST_NAME).unlink()  # the documented way to report on edited files
    study_folder.rebuild_report(tmp_path)
    assert study_folder.read_manifest(tmp_path)["results.csv"] == atomic_io.sha256_file(tmp_path / "results.csv")
