"""unlearn_fast: machine unlearning that measures, and removes, the influence near-duplicates keep.

Public face: :func:`load_dataset`, :func:`train`, :func:`attach`, :func:`find_similar`, :func:`unlearn`, :func:`influence_unlearn`, :func:`compute_metrics`,
:func:`run_study`, and the registries ``METHODS`` and ``METRICS``.
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .context import TrainingContext, attach, get_context
from .data import DATASETS, SimilarDataset, load_dataset
from . import evaluate  # the metric module: unlearn_fast.evaluate.METRICS
from .evaluate import METRICS, Evaluation, compute_metrics
from .models import MODELS, build_model
from .similarity import find_similar
from .train import train

__version__ = "0.1.0"


# The method layer sits above influence/, similarity/ and evaluate/: it is loaded on first use, so that
# `import unlearn_fast.influence` (or .evaluate, .similarity) never pulls in the methods above it.
_FROM_METHODS = ("METHODS", "influence_unlearn", "unlearn")


def __getattr__(name: str):  # noqa: ANN202
    if name in _FROM_METHODS:
        from . import methods

        return getattr(methods, name)
    raise AttributeError(f"module 'unlearn_fast' has no attribute {name!r}")


def run_study(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """See :func:`unlearn_fast.study.run_study` (imported lazily: it pulls in the report and plotting code)."""
    from .study import run_study as _run_study

    return _run_study(*args, **kwargs)


__all__ = [
    "DATASETS", "METHODS", "METRICS", "MODELS", "Evaluation", "SimilarDataset", "TrainingContext",
    "attach", "build_model", "compute_metrics", "evaluate", "find_similar", "get_context", "influence_unlearn", "load_checkpoint", "load_dataset", "run_study",
    "save_checkpoint", "train", "unlearn",
]
