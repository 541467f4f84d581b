"""Near-duplicate discovery: embeddings, a FAISS similarity index, MinHash-LSH (C++), gradient similarity."""

from __future__ import annotations

from .embeddings import input_features, model_features
from .find import DEFAULT_THRESHOLDS, default_method, find_similar
from .index import SimilarityIndex
from .minhash import (
    candidate_pairs, exact_jaccard, jaccard_estimate, lsh_params, minhash_signatures, near_duplicate_groups,
    near_duplicate_pairs,
)
from .text import text_features

__all__ = [
    "DEFAULT_THRESHOLDS", "SimilarityIndex", "candidate_pairs", "default_method", "exact_jaccard", "find_similar", "input_features",
    "jaccard_estimate", "lsh_params", "minhash_signatures", "model_features", "near_duplicate_groups",
    "near_duplicate_pairs", "text_features",
]
