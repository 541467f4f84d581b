"""Atomic writes: a temporary file in the target's folder, fsync, then rename over the target.

A reader never sees a half-written file, and a failure leaves the earlier file intact.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


# Read once: os.umask can only be read by setting it, which would race with other threads later.
_UMASK = os.umask(0)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable, not only the file's bytes.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600; give the result the mode a plain open() would (0666 less the umask).
    os.chmod(tmp, 0o666 & ~_UMASK)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        _fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±inf) inside dicts, lists and tuples replaced by None:
    strict JSON has no NaN, and "undefined" reads as null in every consumer."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, allow_nan=True) + "\n")


@contextmanager
def staged_files(folder: str | os.PathLike[str], names: tuple[str, ...], remove_missing: bool = False) -> Iterator[Path]:
    """Yield a staging folder inside ``folder``; if the block succeeds, move ``names`` from it into ``folder``.

    Everything is produced before anything is replaced, so a failure anywhere leaves every earlier
    file in ``folder`` intact. Each move is an atomic rename; other files in ``folder`` are untouched.
    With ``remove_missing``, a name the block did not produce is deleted from ``folder`` after the
    moves, so no earlier run's file (a figure, per-sample details) is left beside the new results.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target))
    try:
        yield staging
        produced = [name for name in names if (staging / name).exists()]
        for name in produced:
            os.replace(staging / name, target / name)
        if remove_missing:
            for name in set(names) - set(produced):
                if (target / name).exists():
                    (target / name).unlink()
        _fsync_dir(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
