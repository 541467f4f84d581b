"""Checkpoints: parameters in safetensors plus a JSON of the model spec and training recipe.

Both files are written atomically, so an interrupted save leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from . import atomic_io
from .context import CONTEXT_ATTRIBUTE, attach

FORMAT_VERSION = 1


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(tensors file, metadata file) for a checkpoint stem such as ``out/model``."""
    stem = Path(path)
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_checkpoint(model: nn.Module, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``path.safetensors`` and ``path.json``; returns both paths."""
    tensors_path, meta_path = checkpoint_paths(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ctx = getattr(model, CONTEXT_ATTRIBUTE, None)
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": getattr(model, "unlearn_fast_spec", None),
        "recipe": ctx.recipe if ctx else None,
        "loss": (ctx.loss if isinstance(ctx.loss, str) else "callable") if ctx else None,
        "weight_decay": ctx.weight_decay if ctx else None,
        "removed_ids": list(ctx.removed_ids) if ctx else [],
    }
    atomic_io.write_bytes(tensors_path, save_safetensors(state))
    atomic_io.write_json(meta_path, meta)
    return tensors_path, meta_path


def load_checkpoint(path: str | os.PathLike[str], model: nn.Module | None = None, data: Any = None) -> nn.Module:
    """Load a checkpoint into ``model``, or into a model rebuilt from the recorded spec.

    With ``data`` (the training Dataset or SimilarDataset), the training context is re-attached
    from the recorded loss, weight decay, recipe and removed ids.
    """
    from .models import build_model

    tensors_path, meta_path = checkpoint_paths(path)
    for p in (tensors_path, meta_path):
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint file {p} does not exist")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if model is None:
        spec = meta.get("model")
        if not spec:
            raise ValueError(f"{meta_path} records no model spec; pass the model to load into")
        model = build_model(spec["name"], spec["input_shape"], spec["num_classes"], **spec["options"])
    model.load_state_dict(load_safetensors(tensors_path.read_bytes()))
    if data is not None:
        if meta.get("loss") in (None, "callable"):
            raise ValueError("the checkpoint's loss was a callable; call unlearn_fast.attach with it instead of passing data")
        attach(model, data, meta["loss"], weight_decay=meta["weight_decay"] or 0.0,
               removed_ids=meta.get("removed_ids") or None, recipe=meta.get("recipe"))
    return model.eval()
