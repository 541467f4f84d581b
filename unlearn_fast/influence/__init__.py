"""Influence machinery: per-sample gradient operations, curvature-vector products, inverse solvers
and the trust-region Newton steps behind ``unlearn_fast.influence_unlearn`` (which lives with the
methods, since it takes deletion requests and their near-duplicate search)."""

from __future__ import annotations

from .curvature import CURVATURES, CurvatureOperator, curvature_vp
from .kfac import KroneckerCurvature, fit_kronecker
from .per_sample import fisher_vp, grad_dots, grad_gram, grad_norms, per_sample_grads
from .solvers import SOLVERS, SolveResult, solve
from .trust_region import StepRecord
from .unlearn import UnlearnReport, UnlearnWarning, newton_unlearn
from .vectors import as_dict, as_flat, flat_params, trainable

__all__ = [
    "CURVATURES", "CurvatureOperator", "KroneckerCurvature", "SOLVERS", "SolveResult", "StepRecord", "UnlearnReport",
    "UnlearnWarning", "as_dict", "as_flat", "curvature_vp", "fisher_vp", "fit_kronecker", "flat_params", "grad_dots",
    "grad_gram", "grad_norms", "newton_unlearn", "per_sample_grads", "solve", "trainable",
]
