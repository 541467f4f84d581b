"""Checkpoints: parameters in safetensors plus a JSON of the model spec and training recipe.

The tensors file holds the model's state under ``model/`` and, when the model was trained with
:func:`unlearn_fast.train`, its initial weights under ``initial/``, so that ``retrain`` after a
reload starts from the same point as before. Both files are written atomically, tensors first;
the JSON records the tensors file's SHA-256, so a pair left mismatched by a crash between the two
writes is detected on load instead of silently mixing two checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import atomic_io
from .context import CONTEXT_ATTRIBUTE, attach

FORMAT_VERSION = 2  # 2: tensors under model/ and initial/ prefixes, tensors_sha256 in the JSON
SUFFIXES = (".safetensors", ".json")


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(tensors file, metadata file) for a checkpoint stem such as ``out/model`` or ``out/lr0.1``."""
    stem = Path(path)
    if stem.suffix in SUFFIXES:
        stem = stem.with_suffix("")
    # Append rather than with_suffix: a stem like "lr0.1" has no suffix to replace.
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json``; returns both paths."""
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
        "model": getattr(model, "unlearn_fast_spec", None),
        "recipe": ctx.recipe if ctx else None,
        "loss": (ctx.loss if isinstance(ctx.loss, str) else "callable") if ctx else None,
        "weight_decay": ctx.weight_decay if ctx else None,
        "removed_ids": list(ctx.removed_ids) if ctx else [],
    }
    atomic_io.write_bytes(tensors_path, blob)
    atomic_io.write_json(meta_path, meta)
    return tensors_path, meta_path


def _read_meta(meta_path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"checkpoint metadata {meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path} is not an unlearn_fast checkpoint of format {FORMAT_VERSION}")
    return meta


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module | None = None, data: Any = None) -> nn.Module:
    """Load a checkpoint into ``model``, or into a model rebuilt from the recorded spec.

    With ``data`` (the training Dataset or SimilarDataset), the training context is re-attached
    from the recorded loss, weight decay, recipe, removed ids and initial weights.
    """
    from .models import build_model

    tensors_path, meta_path = checkpoint_paths(path)
    for p in (tensors_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} does not exist")
    meta = _read_meta(meta_path)
    blob = tensors_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["tensors_sha256"]:
        raise ValueError(f"{tensors_path} does not match {meta_path} (SHA-256 differs): the pair is from two different saves")
    tensors = load_safetensors(blob)
    if model is None:
        spec = meta.get("model")
        if not spec:
            raise ValueError(f"{meta_path} records no model spec; pass the model to load into")
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec["options"])
    model.load_state_dict({k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")})
    if data is not None:
        if meta.get("loss") in (None, "callable"):
            raise ValueError("the checkpoint's loss was a callable (or none was recorded); call unlearn_fast.attach instead of passing data")
        initial = {k.removeprefix("initial/"): v for k, v in tensors.items() if k.startswith("initial/")}
        attach(model, data, meta["loss"], weight_decay=meta["weight_decay"] or 0.0,
               removed_ids=meta.get("removed_ids") or None, recipe=meta.get("recipe"), initial_state=initial or None)
    return model.eval()
