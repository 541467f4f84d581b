"""Similarity-aware unlearning: expand a deletion request with the near-duplicates of its targets.

Near-duplicates left in the training data keep a target's influence alive (docs/architecture.md), so
``unlearn(..., similar=...)`` and ``influence_unlearn(..., similar=...)`` look them up with
:func:`unlearn_fast.similarity.find_similar` over the model's training data. They either remove
them together with the targets (``similar_action="remove"``) or only list them (``"report"``: for
near-duplicates that belong to someone else, which a request about the targets may not delete).
Both entry points go through :func:`forget_request`, so every method expands the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..context import TrainingContext
from ..similarity.find import AUTO, default_threshold, find_similar, resolve_method
from ..similarity.find import METHODS as SIMILAR_METHODS
from ..validation import check_choice, check_ids, check_number

SIMILAR_ACTIONS = ("remove", "report")
# In a study's method list (and so in its records), "x+similar" names method x run with similar="auto".
SIMILAR_SUFFIX = "+similar"


def similar_base(name: str) -> str | None:
    """The method x of a study name "x+similar", or None for a plain method name."""
    return name[:-len(SIMILAR_SUFFIX)] if name.endswith(SIMILAR_SUFFIX) else None


# Methods whose scores come from the trained model (its features or its gradients); "minhash"
# compares the data alone and takes no model.
MODEL_METHODS = ("embedding", "gradient")


@dataclass(frozen=True)
class SimilarExpansion:
    """What the near-duplicate search of one deletion request found, and what was done with it.

    Attributes:
        targets: the requested forget ids, in request order.
        found: target → [(train id, score), ...] best first: its near-duplicates at or above
            ``threshold``, leaving out the targets themselves and ids removed by earlier requests.
        added_ids: the ids removed on top of the targets (sorted; empty for action "report").
        action: "remove" (the near-duplicates were unlearned too) or "report" (only listed).
        method: the find_similar method used ("embedding", "minhash" or "gradient").
        threshold: the score threshold used.
    """

    targets: list[int]
    found: dict[int, list[tuple[int, float]]]
    added_ids: list[int]
    action: str
    method: str
    threshold: float

    @property
    def similar_ids(self) -> list[int]:
        """Every near-duplicate found, once each (an id may be close to several targets), sorted."""
        return sorted({j for pairs in self.found.values() for j, _ in pairs})

    @property
    def forget_ids(self) -> list[int]:
        """The ids the request removes: the targets, then the added near-duplicates."""
        return [*self.targets, *self.added_ids]


def check_similar_options(similar: Any, method: Any, action: Any) -> None:
    """Reject bad ``similar`` / ``similar_method`` / ``similar_action`` before any work is done."""
    if similar is not None and not (isinstance(similar, str) and similar == AUTO):
        is_number = isinstance(similar, (int, float, np.integer, np.floating)) and not isinstance(similar, bool)
        if not is_number:
            raise ValueError(f"similar={similar!r} is not valid; valid choices: None (no expansion), 'auto' "
                             "(the calibrated default threshold of similar_method) or a score threshold in [-1, 1]")
        # Every method's score lies in [-1, 1]; find_similar narrows this per method (Jaccard: (0, 1]).
        check_number(similar, "similar", low=-1.0, high=1.0)
    check_choice(method, (AUTO, *SIMILAR_METHODS), "similar_method")
    check_choice(action, SIMILAR_ACTIONS, "similar_action")


def expand(model: nn.Module, ctx: TrainingContext, targets: list[int], similar: float | str, *,
           method: str = AUTO, action: str = "remove", device: str | torch.device = "auto",
           progress: bool = True) -> SimilarExpansion:
    """Find the near-duplicates of ``targets`` in ``ctx.data`` and decide which ids to add.

    ``similar`` is a threshold or "auto" (find.py's ``default_threshold`` for the method and the
    kind of data); ``method`` "auto" resolves as in find_similar (find.py's ``resolve_method``);
    ``model`` supplies features or gradients for the "embedding" and "gradient" methods. Assumes
    validated arguments (:func:`check_similar_options`, checked ``targets``).
    """
    method = resolve_method(method, ctx.data)
    search_model = model if method in MODEL_METHODS else None
    # The same data kind find_similar derives: the context's data is always a Dataset of tensors.
    threshold = default_threshold(method, "model" if search_model is not None else "inputs") if similar == AUTO else float(similar)
    hits = find_similar(ctx.data, targets, threshold=threshold, method=method, model=search_model,
                        device=device, progress=progress)
    # Targets are removed anyway and earlier requests' ids are gone already: neither is an addition.
    skip = {*targets, *ctx.removed_ids}
    found = {t: [(int(j), float(s)) for j, s in hits.get(t, []) if j not in skip] for t in targets}
    added = sorted({j for pairs in found.values() for j, _ in pairs}) if action == "remove" else []
    return SimilarExpansion(targets=list(targets), found=found, added_ids=added, action=action, method=method,
                            threshold=threshold)


def forget_request(model: nn.Module, ctx: TrainingContext, forget_ids: Any, similar: float | str | None = None, *,
                   similar_method: str = AUTO, similar_action: str = "remove", device: str | torch.device = "auto",
                   progress: bool = True) -> tuple[list[int], SimilarExpansion | None]:
    """(ids to unlearn, expansion or None) of one deletion request on a model with context ``ctx``.

    Validates ``forget_ids`` against the data and the ids already unlearned, then, unless
    ``similar`` is None, adds the targets' near-duplicates (action "remove") or only lists them
    (action "report").
    """
    check_similar_options(similar, similar_method, similar_action)
    ids = check_ids(forget_ids, len(ctx.data))  # type: ignore[arg-type]
    already = sorted(set(ids) & set(ctx.removed_ids))
    if already:
        raise ValueError(f"forget_ids {already[:10]} were already unlearned from this model")
    if similar is None:
        return ids, None
    expansion = expand(model, ctx, ids, similar, method=similar_method, action=similar_action, device=device,
                       progress=progress)
    return expansion.forget_ids, expansion


def expansion_quality(expansion: SimilarExpansion | None, truth: dict[int, list[int]]) -> dict[str, float | int]:
    """``added``, ``added_precision`` and ``added_recall`` of an expansion against ground truth.

    ``truth`` maps each target to its known near-duplicates. Precision is NaN when nothing was
    added, recall when the targets have no known near-duplicates.
    """
    if expansion is None:
        return {}
    known = {j for t in expansion.targets for j in truth.get(t, [])}
    hits = len(known & set(expansion.added_ids))
    added = len(expansion.added_ids)
    return {"added": added, "added_precision": hits / added if added else math.nan,
            "added_recall": hits / len(known) if known else math.nan}


__all__ = ["SIMILAR_ACTIONS", "SIMILAR_SUFFIX", "SimilarExpansion", "similar_base", "check_similar_options", "expand", "expansion_quality", "forget_request"]
