"""Influence machinery: per-sample gradient operations, curvature-vector products, inverse solvers
and the Newton/influence unlearning step."""

from __future__ import annotations

from .curvature import CURVATURES, CurvatureOperator, curvature_vp
from .kfac import KroneckerCurvature, fit_kronecker
from .per_sample import fisher_vp, grad_dots, grad_gram, grad_norms, per_sample_grads
from .solvers import SOLVERS, SolveResult, solve
from .unlearn import UnlearnReport, influence_unlearn
from .vectors import as_dict, as_flat, flat_params, trainable

__all__ = [
    "CURVATURES", "CurvatureOperator", "KroneckerCurvature", "SOLVERS", "SolveResult", "UnlearnReport", "as_dict", "as_flat",
    "curvature_vp", "fisher_vp", "fit_kronecker", "flat_params", "grad_dots", "grad_gram", "grad_norms", "influence_unlearn",
    "per_sample_grads", "solve", "trainable",
]
