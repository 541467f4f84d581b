"""Vector checks and exact scores for :class:`~unlearn_fast.similarity.index.SimilarityIndex`.

Scores are similarities for ``metric="cosine"`` (higher is closer, in [-1, 1]) and Euclidean
distances, not squared, for ``metric="l2"`` (lower is closer).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# Candidate pairs re-scored per step: bounds the gathered [rows, d] block (16384·384·4 B = 25 MB).
SCORE_CHUNK = 16384


def as_vectors(values: Any, what: str, metric: str, dim: int | None = None) -> np.ndarray:
    """``values`` [N, d] (numpy or torch, any real dtype) → a new C-contiguous float32 array [N, d].

    Rejects complex dtypes, non-2-D or empty input, a ``d`` other than ``dim``, NaN/inf entries and, under cosine,
    zero rows (they have no direction), naming the offending rows. Cosine rows come back L2-normalised,
    so that inner products are cosine similarities.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        values = values.resolve_conj().numpy() if values.is_complex() else values.numpy()
    try:
        source = np.asarray(values)
        # Refused before the float32 cast, which would drop the imaginary parts with only a warning.
        is_complex = source.dtype.kind == "c"
        array = source if is_complex else np.array(source, dtype=np.float32, order="C", copy=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a real-valued array [N, d], got {type(values).__name__}") from exc
    if is_complex:
        raise ValueError(f"{what} must be real, got complex dtype {source.dtype}; pass the real part, the magnitude, "
                         "or the real and imaginary parts as separate dimensions")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{what} must be a non-empty 2-D array [N, d], got shape {array.shape}")
    if dim is not None and array.shape[1] != dim:
        raise ValueError(f"{what} has dimension d={array.shape[1]}, but the index holds d={dim}")
    bad = np.nonzero(~np.isfinite(array).all(axis=1))[0]
    if bad.size:
        raise ValueError(f"{what} has NaN or inf in rows {_few(bad)}")
    if metric == "cosine":
        norms = np.linalg.norm(array, axis=1)
        zero = np.nonzero(norms == 0)[0]
        if zero.size:
            raise ValueError(f"{what} has zero vectors in rows {_few(zero)}; cosine similarity is undefined for them")
        array /= norms[:, None]
    return array


def _few(rows: np.ndarray) -> str:
    return f"{rows[:10].tolist()}{' ...' if rows.size > 10 else ''} ({rows.size} in all)"


def exact_scores(queries: np.ndarray, rows: np.ndarray, vectors: np.ndarray, ids: np.ndarray, metric: str) -> np.ndarray:
    """Exact score of each pair (queries[rows[i]], vectors[ids[i]]) → float32 [M].

    Distances are taken from the differences, not from ‖q‖² + ‖x‖² − 2q·x, which loses the small
    distances of near-duplicates to cancellation.
    """
    out = np.empty(len(ids), dtype=np.float32)
    for start in range(0, len(ids), SCORE_CHUNK):
        part = slice(start, start + SCORE_CHUNK)
        q, x = queries[rows[part]], vectors[ids[part]]
        out[part] = np.einsum("ij,ij->i", q, x) if metric == "cosine" else np.linalg.norm(q - x, axis=1)
    return out


def closer_sign(metric: str) -> int:
    """+1 when higher scores are closer (cosine), −1 when lower are (l2): sort keys are ``-sign * score``."""
    return 1 if metric == "cosine" else -1
