"""Atomic writes: a temporary file in the target's folder, fsync, then rename over the target.

A reader never sees a half-written file, and a failure leaves the earlier file intact. Files that
belong together (a study's results and reports, a checkpoint's tensors and metadata) commit as one
set through a journal (:func:`commit_set`, :func:`settle`).
"""

from __future__ import annotations

import hashlib
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


def check_writable_folder(path: str | os.PathLike[str], name: str) -> Path:
    """``path`` after checking, by writing a probe file, that a folder can be written there: in the folder
    itself, or, when it does not exist yet, in its nearest existing parent (nothing is created). Long
    jobs call this before any work, so that an unwritable output is found in a second, not at the end.
    ``name`` names the option in the errors (a ValueError for a file, a PermissionError otherwise)."""
    folder = Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{name} {folder}: {existing} exists and is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"{name} {folder} cannot be written ({exc.strerror or exc} in {existing}); "
                              "choose another folder or fix its permissions") from exc
    return folder


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


JOURNAL_SUFFIX = ".commit.json"
STAGING_PREFIX = ".staging-"


def _journal(folder: Path, set_name: str) -> Path:
    return folder / f".{set_name}{JOURNAL_SUFFIX}"


def _staging_prefix(set_name: str) -> str:
    # A digest, not the name: set "model" must not match the staging folders of set "model-2".
    return f"{STAGING_PREFIX}{hashlib.sha256(set_name.encode()).hexdigest()[:16]}-"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _roll_forward(folder: Path, journal: Path) -> None:
    """Finish the commit that ``journal`` records. Idempotent: a file already moved is no longer staged."""
    try:
        plan = json.loads(journal.read_text(encoding="utf-8"))
        staging, moves, removals = folder / plan["staging"], list(plan["move"]), list(plan["remove"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{journal} records an interrupted commit but cannot be read ({exc}); delete it and "
                         "the staging folder it names to keep the files as they are") from exc
    if not staging.is_dir():
        raise ValueError(f"{journal} records an interrupted commit whose staging folder {staging} is gone; "
                         "delete the journal to keep the files as they are")
    for name in moves:
        if (staging / name).exists():
            os.replace(staging / name, folder / name)
    for name in removals:
        if (folder / name).exists():
            os.unlink(folder / name)
    _fsync_dir(folder)
    os.unlink(journal)
    _fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)


def pending_commit(folder: str | os.PathLike[str], set_name: str) -> bool:
    """Whether ``folder`` holds a committed but unfinished write of ``set_name`` (:func:`settle` finishes it)."""
    return _journal(Path(folder), set_name).exists()


def settle(folder: str | os.PathLike[str], set_name: str) -> None:
    """Leave ``folder``'s set ``set_name`` (see :func:`commit_set`) as one whole set before it is read.

    A commit cut after its journal was written is completed (the new set); staging folders and journal
    drafts of the set, left by a commit cut before that point, are deleted (the old set stays).
    Needs write access only when there is something to finish or clean up.
    """
    target = Path(folder)
    journal = _journal(target, set_name)
    try:
        if journal.exists():
            _roll_forward(target, journal)
        for stale in target.glob(f"{_staging_prefix(set_name)}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in target.glob(f".{journal.name}.*.tmp"):  # a journal write cut before its rename
            stale.unlink()
    except PermissionError as exc:
        raise PermissionError(f"{target} holds an interrupted write of {set_name!r} that needs write access to "
                              f"finish or clean up: {exc}") from exc


@contextmanager
def commit_set(folder: str | os.PathLike[str], names: tuple[str, ...], set_name: str,
               remove_missing: bool = False) -> Iterator[Path]:
    """Yield a staging folder inside ``folder``; when the block succeeds, commit the ``names`` it produced
    into ``folder`` as one set: a reader that calls :func:`settle` first sees the whole old set or the
    whole new set, wherever the process was cut.

    Each produced file is synced, then a journal naming the moves is written atomically: that write
    is the commit point. The moves (atomic renames) follow; a cut among them is finished by the next
    :func:`settle` or commit of the same set. Before the commit point, a failure or a cut leaves every
    earlier file intact. With ``remove_missing``, a name the block did not produce is deleted too, so
    no earlier run's file (a figure, per-sample details) is left beside the new set. Other files in
    ``folder`` are untouched. One writer per set at a time.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    settle(target, set_name)
    staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(set_name), dir=target))
    journal = _journal(target, set_name)
    try:
        yield staging
        produced = [name for name in names if (staging / name).exists()]
        for name in produced:
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(staging)
        removals = [name for name in names if name not in produced] if remove_missing else []
        write_json(journal, {"staging": staging.name, "move": produced, "remove": removals})
        _roll_forward(target, journal)
    finally:
        # Once the journal is in place (even if a sync after its rename failed) the staged files are
        # the committed set: they stay for settle() to move.
        if not journal.exists():
            shutil.rmtree(staging, ignore_errors=True)
