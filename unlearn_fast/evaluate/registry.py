"""The metric registry, at the bottom of evaluate/: ``METRICS`` and the facts each metric carries.

A metric is ``fn(evaluation) -> float`` (NaN: undefined for this case), registered by its family's
module with the facts that the study and the report read from its entry (``entry.meta``):

- ``default``: computed when no metric names are given (:data:`unlearn_fast.evaluate.DEFAULT_METRICS`);
- ``quick``: kept by a ``--quick`` study; False for the audits that optimise per model;
- ``shadows``: the fewest shadow models it works with; 0 for a metric that needs none;
- ``best``: how the report judges the best value of its column: :data:`CLOSEST_TO_ORACLE`,
  :data:`HIGHEST`, :data:`LOWEST`, or None (bookkeeping, never marked).

The tables that used to list these facts by name are derived here, from the entries.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry

CLOSEST_TO_ORACLE, HIGHEST, LOWEST = "oracle", "max", "min"
BEST_CHOICES = (CLOSEST_TO_ORACLE, HIGHEST, LOWEST, None)


def _check_facts(name: str, facts: dict[str, Any]) -> None:
    if facts["best"] not in BEST_CHOICES:
        raise ValueError(f"metric {name!r}: best={facts['best']!r}; valid: {', '.join(map(repr, BEST_CHOICES))}")
    shadows = facts["shadows"]
    if isinstance(shadows, bool) or not isinstance(shadows, int) or shadows < 0:
        raise ValueError(f"metric {name!r}: shadows={shadows!r}; give the fewest shadow models it needs, 0 for none")


METRICS: Registry = Registry("metric", meta={"default": False, "quick": True, "shadows": 0, "best": None},
                             check_meta=_check_facts)


def default_metrics() -> tuple[str, ...]:
    """The registered metrics with ``default=True``: judged ones in registration order, then the
    bookkeeping ones (``best=None``), as the report's tables put bookkeeping columns last."""
    defaults = [entry for entry in METRICS if entry.meta["default"]]
    return tuple(entry.name for entry in sorted(defaults, key=lambda entry: entry.meta["best"] is None))


def shadow_metrics() -> tuple[str, ...]:
    """The registered metrics that need shadow models, in registration order."""
    return tuple(entry.name for entry in METRICS if entry.meta["shadows"])


def shadows_needed(metric: str) -> int:
    """The fewest shadow models ``metric`` works with (0: none); an unknown name raises, listing the valid ones."""
    return METRICS.get(metric).meta["shadows"]


def skipped_when_quick(metrics: tuple[str, ...]) -> tuple[str, ...]:
    """Those of ``metrics`` that a ``--quick`` study leaves out."""
    return tuple(name for name in metrics if not METRICS.get(name).meta["quick"])
