"""Checkpoints: parameters in safetensors plus a JSON of the model spec, training recipe and data.

The tensors file holds the model's state under ``model/`` and, when the model was trained with
:func:`unlearn_fast.train`, its initial weights under ``initial/``, so that ``retrain`` after a
reload starts from the same point as before. The pair commits as one set
(:func:`unlearn_fast.atomic_io.commit_set`): a save cut at any point leaves the earlier checkpoint
or the new one, never a pair that will not load. The JSON records the tensors file's size and
SHA-256 (a truncated or altered file is named as such on load) and a fingerprint of the training
data (:func:`unlearn_fast.context.data_fingerprint`), so that the context is never re-attached to
data the model was not trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import atomic_io
from .context import CONTEXT_ATTRIBUTE, attach, data_fingerprint

# 3: the pair commits as a set; tensors_bytes and data_sha256 recorded. 2 (readable): no data fingerprint.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
SUFFIXES = (".safetensors", ".json")
REQUIRED_KEYS = ("format_version", "tensors_sha256", "model", "recipe", "loss", "weight_decay", "removed_ids")


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(tensors file, metadata file) for a checkpoint stem such as ``out/model`` or ``out/lr0.1``."""
    stem = Path(path)
    if stem.suffix in SUFFIXES:
        stem = stem.with_suffix("")
    # Append rather than with_suffix: a stem like "lr0.1" has no suffix to replace.
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json`` as one set; returns both paths."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tensors_path, meta_path = checkpoint_paths(path)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ctx = getattr(model, CONTEXT_ATTRIBUTE, None)
    if ctx is not None and ctx.initial_state is not None:
        tensors.update({f"initial/{k}": v.contiguous() for k, v in ctx.initial_state.items()})
    blob = save_safetensors(tensors)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
        "tensors_bytes": len(blob),
        "model": getattr(model, "unlearn_fast_spec", None),
        "recipe": ctx.recipe if ctx else None,
        "loss": (ctx.loss if isinstance(ctx.loss, str) else "callable") if ctx else None,
        "weight_decay": ctx.weight_decay if ctx else None,
        "removed_ids": list(ctx.removed_ids) if ctx else [],
        "data_sha256": ctx.fingerprint() if ctx else None,
    }
    names = (tensors_path.name, meta_path.name)
    with atomic_io.commit_set(tensors_path.parent, names, _set_name(tensors_path)) as staging:
        atomic_io.write_bytes(staging / tensors_path.name, blob)
        atomic_io.write_json(staging / meta_path.name, meta)
    return tensors_path, meta_path


def _set_name(tensors_path: Path) -> str:
    return tensors_path.name.removesuffix(".safetensors")


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint metadata {meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") not in READABLE_VERSIONS:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path} is not an unlearn_fast checkpoint of a format this version reads "
                         f"(format_version {version!r}; readable: {', '.join(map(str, READABLE_VERSIONS))})")
    missing = [key for key in REQUIRED_KEYS if key not in meta]
    if missing:
        raise ValueError(f"checkpoint metadata {meta_path} lacks the key(s) {missing}; a save writes all of "
                         f"{', '.join(REQUIRED_KEYS)}: the file was edited or is not a checkpoint")
    return meta


def _read_tensors(tensors_path: Path, meta: dict[str, Any], meta_path: Path) -> dict[str, Any]:
    blob = tensors_path.read_bytes()
    expected = meta.get("tensors_bytes")
    if expected is not None and len(blob) != expected:
        raise ValueError(f"{tensors_path} holds {len(blob)} bytes where {meta_path} records {expected}: the file was "
                         "truncated or replaced after the save")
    if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise ValueError(f"{tensors_path} does not match the SHA-256 that {meta_path} records: the file was changed "
                         "or damaged after the save")
    try:
        return load_safetensors(blob)
    except SafetensorError as exc:
        raise ValueError(f"{tensors_path} is not a readable safetensors file ({exc}), although it matches its "
                         "recorded SHA-256: it was saved damaged") from exc


def _check_data(meta: dict[str, Any], data: Any, meta_path: Path, allow_other_data: bool) -> None:
    recorded = meta.get("data_sha256")
    if recorded is None:
        warnings.warn(f"{meta_path} records no fingerprint of its training data (format {meta['format_version']}): "
                      "the data given cannot be checked against it", UserWarning, stacklevel=3)
        return
    given = data_fingerprint(data)
    if given == recorded:
        return
    if not allow_other_data:
        raise ValueError(f"data does not match the training data recorded in {meta_path} (data SHA-256 {given[:12]}…, "
                         f"recorded {recorded[:12]}…): retraining and influence steps would use samples the model was not "
                         "trained on. Pass the same dataset (same name, options and seed), or allow_other_data=True to "
                         "attach it anyway")
    warnings.warn(f"attaching data whose fingerprint {given[:12]}… differs from the training data's {recorded[:12]}… "
                  f"({meta_path}): retrain, oracle and influence steps will treat it as the training set", UserWarning,
                  stacklevel=3)


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module | None = None, data: Any = None, *,
                    allow_other_data: bool = False) -> nn.Module:
    """Load a checkpoint into ``model``, or into a model rebuilt from the recorded spec.

    With ``data`` (the training Dataset or SimilarDataset), the training context is re-attached
    from the recorded loss, weight decay, recipe, removed ids and initial weights, after checking
    that ``data`` is the training data the checkpoint records (same samples, same order). A
    mismatch raises; ``allow_other_data=True`` attaches it anyway, with a warning, and methods then
    treat it as the training set. A save that was cut is completed or discarded first (needs write
    access to the folder only then).
    """
    from .models import build_model

    tensors_path, meta_path = checkpoint_paths(path)
    if tensors_path.parent.is_dir():
        atomic_io.settle(tensors_path.parent, _set_name(tensors_path))
    for p in (tensors_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} does not exist")
    meta = _read_meta(meta_path)
    tensors = _read_tensors(tensors_path, meta, meta_path)
    if model is None:
        spec = meta.get("model")
        if not spec:
            raise ValueError(f"{meta_path} records no model spec; pass the model to load into")
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec["options"])
    model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    if data is not None:
        if meta.get("loss") in (None, "callable"):
            raise ValueError("the checkpoint's loss was a callable (or none was recorded); call unlearn_fast.attach instead of passing data")
        _check_data(meta, data, meta_path, allow_other_data)
        initial = {k.removeprefix("initial/"): v for k, v in tensors.items() if k.startswith("initial/")}
        attach(model, data, meta["loss"], weight_decay=meta["weight_decay"] or 0.0,
               removed_ids=meta.get("removed_ids") or None, recipe=meta.get("recipe"), initial_state=initial or None)
    return model.eval()
