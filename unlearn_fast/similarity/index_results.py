"""Range-search results: the exact threshold test, best-first order and the ``max_results`` cap."""

from __future__ import annotations

import warnings

import numpy as np

from .index_vectors import closer_sign

Result = tuple[np.ndarray, np.ndarray]  # (ids int64 [m], scores float32 [m]), best first


def select(rows: np.ndarray, ids: np.ndarray, scores: np.ndarray, threshold: float, metric: str) -> dict[int, Result]:
    """Pairs (query rows[i], vector ids[i]) with exact ``scores`` → {query: Result} of those within ``threshold``.

    Within ``threshold`` means similarity ≥ threshold (cosine) or distance ≤ threshold (l2). Each
    query's list is ordered closest first, ties by lower id, so results do not depend on the index kind.
    """
    keep = scores >= threshold if metric == "cosine" else scores <= threshold
    rows, ids, scores = rows[keep], ids[keep], scores[keep]
    order = np.lexsort((ids, -closer_sign(metric) * scores, rows))
    rows, ids, scores = rows[order], ids[order], scores[order]
    queries, starts = np.unique(rows, return_index=True)
    return {int(q): (i, s) for q, i, s in zip(queries, np.split(ids, starts[1:]), np.split(scores, starts[1:]))}


class CappedResults:
    """Gathers per-query results chunk by chunk and holds at most about 2·``max_results`` of them.

    When there are more than ``max_results`` results, the kept ones are chosen rank by rank: every
    query's best result, then every query's second best, and so on. In the last rank, which fits only
    in part, the closest pairs win (ties: lower query index). Each query thus keeps a best-first prefix
    of its full list, and loses its best match only when more than ``max_results`` queries have one.
    The choice is a fixed total order on pairs, so trimming chunk by chunk keeps what trimming all the
    results at once would.
    """

    def __init__(self, n_queries: int, max_results: int | None, metric: str, *,
                 source: str = "SimilarityIndex.range_search") -> None:
        self.n_queries, self.cap, self.metric, self.source = n_queries, max_results, metric, source
        self.kept: dict[int, Result] = {}
        self.size = 0
        self.found = 0

    def add(self, results: dict[int, Result]) -> None:
        count = sum(len(ids) for ids, _ in results.values())
        self.found += count
        self.size += count
        self.kept.update(results)
        # Trimming costs O(kept); waiting for 2·cap makes its cost amortised O(1) per result.
        if self.cap is not None and self.size > 2 * self.cap:
            self._trim()

    def _trim(self) -> None:
        assert self.cap is not None
        queries = np.fromiter(self.kept, dtype=np.int64, count=len(self.kept))
        lens = np.array([len(self.kept[q][0]) for q in queries.tolist()], dtype=np.int64)
        if lens.sum() <= self.cap:
            return
        lo, hi = 0, int(lens.max())  # deepest rank r that fits whole: Σ min(len, r) ≤ cap
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if np.minimum(lens, mid).sum() <= self.cap else (lo, mid - 1)
        keep = np.minimum(lens, lo)
        left = self.cap - int(keep.sum())
        if left:
            over = np.nonzero(lens > lo)[0]
            key = np.array([self.kept[q][1][lo] for q in queries[over].tolist()])
            keep[over[np.lexsort((queries[over], -closer_sign(self.metric) * key))[:left]]] += 1
        trimmed: dict[int, Result] = {}
        for q, n, full in zip(queries.tolist(), keep.tolist(), lens.tolist()):
            if n:
                ids, scores = self.kept[q]
                # A copy lets the chunk-wide arrays the slices came from be freed.
                trimmed[q] = (ids, scores) if n == full else (ids[:n].copy(), scores[:n].copy())
        self.kept, self.size = trimmed, int(keep.sum())

    def results(self) -> list[Result]:
        """One (ids, scores) per query, in query order; empty arrays where nothing is within range."""
        if self.cap is not None:
            self._trim()
            if self.found > self.size:
                warnings.warn(f"{self.source.rsplit('.', 1)[-1]} found {self.found} results and kept {self.size} "
                              f"(max_results={self.cap}); see {self.source} for which are kept", stacklevel=3)
        empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
        return [self.kept.get(q, empty) for q in range(self.n_queries)]
