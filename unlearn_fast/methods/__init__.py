"""Unlearning methods: one registry (``METHODS``) and one entry point (:func:`unlearn`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..context import resolve_context
from ..validation import resolve_device
from . import finetune as _finetune  # noqa: F401  (registers finetune, gradient_ascent)
from . import retrain as _retrain  # noqa: F401  (registers retrain, oracle)
from . import relabel as _relabel  # noqa: F401  (registers random_label, salun, boundary_shrink)
from . import regularised as _regularised  # noqa: F401  (registers graddiff, l1_sparse)
from . import dampening as _dampening  # noqa: F401  (registers fisher_forgetting, ssd)
from . import distill as _distill  # noqa: F401  (registers bad_teacher, scrub)
from .expansion import SIMILAR_ACTIONS, SimilarExpansion, forget_request
from .influence import influence_unlearn  # also registers influence
from .registry import METHODS, UnlearnTask, check_method_input, check_method_output


def unlearn(
    model: nn.Module,
    forget_ids: Any,
    method: str = "retrain",
    *,
    data: Any = None,
    loss: Any = None,
    weight_decay: float | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    similar: float | str | None = None,
    similar_method: str = "auto",
    similar_action: str = "remove",
    **hyper: Any,
) -> nn.Module:
    """Unlearn ``forget_ids`` from ``model`` with a registered method; returns a new model.

    ``model`` itself is left unchanged. A model with NaN or inf parameters, or with fewer class scores
    than the labels need, is refused; a method whose result is not finite raises FloatingPointError,
    naming the method and the first non-finite parameter. Its training context supplies data, loss and weight decay;
    ``data``/``loss``/``weight_decay`` override them (or supply them for a model with no context). ``hyper`` overrides the method's
    documented defaults (``METHODS.get(name).defaults``). The returned model's context records the
    removed ids, so a later request removes both.

    Similarity-aware unlearning (:mod:`.expansion`): ``similar`` (None: off; "auto": the calibrated
    default threshold; or a score threshold) finds the targets' near-duplicates in the training
    data with ``find_similar`` (``similar_method``: "auto", "embedding", "minhash" or "gradient").
    ``similar_action="remove"`` unlearns them with the targets; ``"report"`` only lists them. The
    returned model's ``unlearn_fast_similar`` holds the :class:`SimilarExpansion` (None when off).
    """
    entry = METHODS.get(method)
    ctx = resolve_context(model, data=data, loss=loss, weight_decay=weight_decay)
    hyper = METHODS.resolve_hyper(method, hyper)
    dev = resolve_device(device)
    check_method_input(model, ctx, method)
    ids, expansion = forget_request(model, ctx, forget_ids, similar, similar_method=similar_method,
                                    similar_action=similar_action, device=dev, progress=progress)
    task = UnlearnTask(context=ctx, forget_ids=ids, device=dev, progress=progress, similar=expansion)
    out = entry.fn(model, task, **hyper)
    check_method_output(out, f"method {method!r}", f"options {hyper}; the input model is unchanged; the method "
                                                   "diverged: try gentler options (e.g. a smaller lr or fewer epochs)")
    # Set even when None: the copy of ``model`` would otherwise carry an earlier request's record.
    out.unlearn_fast_similar = expansion
    return out


__all__ = ["METHODS", "SIMILAR_ACTIONS", "SimilarExpansion", "UnlearnTask", "influence_unlearn", "unlearn"]
