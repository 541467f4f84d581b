"""Influence machinery: per-sample gradient operations, curvature-vector products, inverse solvers
and the Newton/influence unlearning step."""

from __future__ import annotations

from .vectors import as_dict, as_flat, flat_params, trainable

__all__ = ["as_dict", "as_flat", "flat_params", "trainable"]
