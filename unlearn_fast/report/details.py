"""Read and check ``details.json``: the per-sample evidence (seed 0) the report draws its figures from.

The file is optional and every part of it may be missing. Nothing here raises on bad content: a
file that cannot be used as a whole (bad JSON, another schema version) is ignored with a reason, and
a malformed part of a condition (an image of the wrong shape, scores that are not numbers) is dropped
with a note, so the report still builds from ``results.json``.

Layout (``schema_version`` 1)::

    {"schema_version": 1, "conditions": [{
        "dataset": str, "similar": int, "seed": int,
        "image_shape": [C, H, W] | null,
        "target_ids": [int, ...], "targets": [image, ...],
        "near_duplicates": [[image, ...], ...],                 # per shown target
        "reconstructions": {model: [image, ...]},             # per shown target
        "mia_scores": {model: {"members": [...], "nonmembers": [...]}},
        "ulira_accuracy": {method: [float per target, ...]}}]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .summary import format_c

DETAILS_SCHEMA_VERSION = 1


@dataclass
class Condition:
    """The checked evidence of one (dataset, C) condition; parts that were missing or malformed are empty."""

    dataset: str
    similar: Any
    seed: Any = None
    image_shape: tuple[int, ...] | None = None
    target_ids: list[Any] = field(default_factory=list)
    targets: list[np.ndarray] = field(default_factory=list)
    near_duplicates: list[list[np.ndarray]] = field(default_factory=list)
    reconstructions: dict[str, list[np.ndarray]] = field(default_factory=dict)
    mia_scores: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    ulira_accuracy: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """``digits-blockmask, C=10``."""
        return f"{self.dataset}, C={format_c(self.similar)}"


@dataclass
class Details:
    """What the report can use from ``details.json``.

    ``status`` is ``"read"``, ``"absent"`` or ``"ignored"``; ``reason`` says why for the latter two;
    ``notes`` list the parts of a read file that were dropped.
    """

    status: str
    reason: str = ""
    conditions: list[Condition] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _image(value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """``value`` as a float array of ``shape`` clipped to [0, 1], or None when it is not one."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.shape != shape or not np.isfinite(arr).all():
        return None
    return np.clip(arr, 0.0, 1.0)


def _scores(value: Any) -> np.ndarray | None:
    """The finite entries of a flat list of numbers (null/NaN dropped), or None when none are left."""
    if not isinstance(value, list):
        return None
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    if arr.ndim != 1:
        return None
    arr = arr[np.isfinite(arr)]
    return arr if arr.size else None


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and 2 <= len(value) <= 3 and all(isinstance(v, int) and v > 0 for v in value):
        return tuple(value)
    return None


def _images(cond: Condition, raw: dict[str, Any], notes: list[str], where: str) -> None:
    """Fill targets, near-duplicates and reconstructions; any malformed image drops its whole part."""
    shape = cond.image_shape
    if shape is None:
        return
    targets = raw.get("targets")
    if not isinstance(targets, list) or not targets:
        if targets not in (None, []):
            notes.append(f"{where}: targets is not a list of images; grids left out")
        return
    images = [_image(t, shape) for t in targets]
    if any(i is None for i in images):
        notes.append(f"{where}: a target image does not have shape {list(shape)}; grids left out")
        return
    cond.targets = [i for i in images if i is not None]
    n = len(cond.targets)
    ids = raw.get("target_ids")
    cond.target_ids = list(ids) if isinstance(ids, list) and len(ids) == n else list(range(n))
    near = raw.get("near_duplicates")
    if isinstance(near, list) and len(near) == n and all(isinstance(group, list) for group in near):
        groups = [[_image(img, shape) for img in group] for group in near]
        if all(img is not None for group in groups for img in group):
            cond.near_duplicates = [[img for img in group if img is not None] for group in groups]
        else:
            notes.append(f"{where}: a near-duplicate image does not have shape {list(shape)}; left out")
    elif near not in (None, []):
        notes.append(f"{where}: near_duplicates is not one list of images per target; left out")
    recon = raw.get("reconstructions")
    if not isinstance(recon, dict):
        if recon is not None:
            notes.append(f"{where}: reconstructions is not a dict; left out")
        return
    for model, imgs in recon.items():
        got = [_image(img, shape) for img in imgs] if isinstance(imgs, list) else []
        if len(got) == n and all(img is not None for img in got):
            cond.reconstructions[str(model)] = [img for img in got if img is not None]
        else:
            notes.append(f"{where}: reconstructions[{model!r}] is not {n} images of shape {list(shape)}; left out")


def _mia(cond: Condition, raw: Any, notes: list[str], where: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        notes.append(f"{where}: mia_scores is not a dict; left out")
        return
    for model, sides in raw.items():
        members = _scores(sides.get("members")) if isinstance(sides, dict) else None
        nonmembers = _scores(sides.get("nonmembers")) if isinstance(sides, dict) else None
        if members is None or nonmembers is None:
            notes.append(f"{where}: mia_scores[{model!r}] lacks non-empty members/nonmembers score lists; left out")
            continue
        cond.mia_scores[str(model)] = (members, nonmembers)


def _ulira(cond: Condition, raw: Any, notes: list[str], where: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict):
        notes.append(f"{where}: ulira_accuracy is not a dict; left out")
        return
    for method, values in raw.items():
        arr = _scores(values)
        if arr is None:
            notes.append(f"{where}: ulira_accuracy[{method!r}] is not a list of numbers; left out")
            continue
        cond.ulira_accuracy[str(method)] = arr


def _condition(raw: Any, index: int, notes: list[str]) -> Condition | None:
    if not isinstance(raw, dict) or not isinstance(raw.get("dataset"), str) or "similar" not in raw:
        notes.append(f"condition {index} lacks dataset/similar; left out")
        return None
    cond = Condition(dataset=raw["dataset"], similar=raw["similar"], seed=raw.get("seed"))
    where = f"condition {index} ({cond.label})"
    if raw.get("image_shape") is not None:
        cond.image_shape = _shape(raw["image_shape"])
        if cond.image_shape is None:
            notes.append(f"{where}: image_shape {raw['image_shape']!r} is not [C, H, W] or [H, W]; grids left out")
    _images(cond, raw, notes, where)
    _mia(cond, raw.get("mia_scores"), notes, where)
    _ulira(cond, raw.get("ulira_accuracy"), notes, where)
    return cond


def parse_details(data: Any) -> Details:
    """Check decoded ``details.json`` content; see the module docstring for the layout."""
    if not isinstance(data, dict):
        return Details("ignored", f"it holds a JSON {type(data).__name__}, not an object")
    version = data.get("schema_version")
    if version != DETAILS_SCHEMA_VERSION:
        return Details("ignored", f"its schema_version is {version!r}; this report reads version {DETAILS_SCHEMA_VERSION}")
    raw = data.get("conditions")
    if not isinstance(raw, list):
        return Details("ignored", "it has no 'conditions' list")
    notes: list[str] = []
    conditions = [c for i, item in enumerate(raw) if (c := _condition(item, i, notes)) is not None]
    return Details("read", conditions=conditions, notes=notes)


def load_details(path: str | os.PathLike[str]) -> Details:
    """Read ``path`` (a ``details.json``); never raises for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        return Details("absent", f"there is no {path.name} beside results.json (an older run, or a study that wrote none)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Details("ignored", f"it is not valid JSON ({exc})")
    except RecursionError:
        return Details("ignored", "it is nested too deeply to read")
    return parse_details(data)


def details_status(details: Details) -> str:
    """One sentence on what the report took from ``details.json``."""
    if details.status == "absent":
        return f"No per-sample details: {details.reason}."
    if details.status == "ignored":
        return f"details.json was ignored: {details.reason}. The report uses results.json only."
    seeds = sorted({str(c.seed) for c in details.conditions if c.seed is not None})
    where = f" (seed {', '.join(seeds)})" if seeds else ""
    n = len(details.conditions)
    dropped = f"; {len(details.notes)} malformed part(s) left out" if details.notes else ""
    return f"details.json: {n} condition{'' if n == 1 else 's'}{where}{dropped}."

