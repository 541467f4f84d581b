"""A study's output folder as one set: results, details, reports and a manifest, committed together.

The study writes ``results.json``, ``results.csv``, ``details.json``, the reports and their figures,
and ``manifest.json`` (each file's SHA-256) through :func:`unlearn_fast.atomic_io.commit_set`: a
reader that goes through :func:`read_study_folder` sees the whole earlier set or the whole new one,
wherever a write was cut, never a mix. ``unlearn-fast report DIR`` rebuilds the reports the same way
and refuses a folder whose results or details differ from what its manifest records.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import atomic_io
from .markdown import DETAILS_NAME, REPORT_FILES, RESULTS_NAME, build_report, load_results

SET_NAME = "study"
CSV_NAME = "results.csv"
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Every name the study owns in its folder; one a run does not write (details, a figure) is removed
# when the set commits, so the folder never mixes this run's results with an earlier run's evidence.
STUDY_FILES = (RESULTS_NAME, CSV_NAME, DETAILS_NAME, *REPORT_FILES, MANIFEST_NAME)
# The study's data, which `report` keeps and checks against the manifest (the reports it rebuilds).
DATA_FILES = (RESULTS_NAME, CSV_NAME, DETAILS_NAME)


def _write_manifest(staging: Path, kept: Mapping[str, str] | None = None) -> None:
    """manifest.json in ``staging``: the SHA-256 of every study file staged there, plus ``kept`` (name →
    SHA-256) for files of the set that stay as they are."""
    files = dict(kept or {})
    files.update({name: atomic_io.sha256_file(staging / name) for name in STUDY_FILES
                  if name != MANIFEST_NAME and (staging / name).is_file()})
    atomic_io.write_json(staging / MANIFEST_NAME, {"manifest_version": MANIFEST_VERSION,
                                                   "files": dict(sorted(files.items()))})


def write_study_folder(out_dir: str | os.PathLike[str], records: Sequence[Mapping[str, Any]],
                       details: Mapping[str, Any] | None = None) -> list[str]:
    """Commit results.json, results.csv, details.json (when given), the reports and the manifest into
    ``out_dir`` as one set; returns the names written. ``records`` must already be JSON-safe."""
    columns = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    with atomic_io.commit_set(out_dir, STUDY_FILES, SET_NAME, remove_missing=True) as staging:
        atomic_io.write_json(staging / RESULTS_NAME, list(records))
        if details is not None:
            atomic_io.write_json(staging / DETAILS_NAME, details)
        atomic_io.write_text(staging / CSV_NAME, buffer.getvalue())
        build_report(staging, records)
        _write_manifest(staging)
        written = [name for name in STUDY_FILES if (staging / name).is_file()]
    return written


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, str] | None:
    """name → SHA-256 of the settled folder's manifest, or None when the folder has none (written by
    hand or by a version before manifests)."""
    path = Path(out_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("manifest_version") != MANIFEST_VERSION or not isinstance(files, dict):
            raise ValueError(f"manifest_version {manifest.get('manifest_version')!r}, expected {MANIFEST_VERSION}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a study manifest ({exc}); re-run the study into this folder") from exc
    return {str(k): str(v) for k, v in files.items()}


def check_against_manifest(out_dir: str | os.PathLike[str], names: Sequence[str] = DATA_FILES) -> dict[str, str] | None:
    """The manifest (see :func:`read_manifest`) after checking that each of ``names`` is present exactly
    when the manifest lists it, with the recorded SHA-256; a ValueError naming the file otherwise."""
    folder = Path(out_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for name in names:
        path = folder / name
        recorded = manifest.get(name)
        if recorded is None and not path.exists():
            continue
        actual = atomic_io.sha256_file(path) if path.is_file() else None
        if actual != recorded:
            state = "is missing" if actual is None else ("is not listed in it" if recorded is None else "differs from it")
            raise ValueError(f"{path} {state} ({MANIFEST_NAME} records the set the study wrote): the file was changed "
                             f"after the study, or the folder mixes two runs. Re-run the study, or delete {MANIFEST_NAME} "
                             "to report on the files as they are")
    return manifest


def read_study_folder(out_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a study folder, after finishing or discarding any interrupted write of it and
    checking its inputs against the manifest."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"no study folder at {folder}; run `unlearn-fast study --out {folder}` first")
    atomic_io.settle(folder, SET_NAME)
    check_against_manifest(folder)
    return load_results(folder / RESULTS_NAME)


def rebuild_report(out_dir: str | os.PathLike[str]) -> Path:
    """Rebuild the reports of a study folder from its results.json and details.json, committed with an
    updated manifest as one set; returns the Markdown report's path."""
    folder = Path(out_dir)
    records = read_study_folder(folder)
    kept = {name: atomic_io.sha256_file(folder / name) for name in DATA_FILES if (folder / name).is_file()}
    with atomic_io.commit_set(folder, (*REPORT_FILES, MANIFEST_NAME), SET_NAME, remove_missing=True) as staging:
        build_report(staging, records, source=folder)
        _write_manifest(staging, kept)
    return folder / REPORT_FILES[0]


__all__ = ["CSV_NAME", "MANIFEST_NAME", "SET_NAME", "STUDY_FILES", "check_against_manifest", "read_manifest",
           "read_study_folder", "rebuild_report", "write_study_folder"]
