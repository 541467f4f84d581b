"""Atomic writes: the target is replaced whole or not at all."""

from __future__ import annotations

import os
import stat

import pytest

from unlearn_fast import atomic_io


def test_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_io.write_json(path, {"a": 1})
    atomic_io.write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 2\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_failure_keeps_previous_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_io.write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_io.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_io.write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
