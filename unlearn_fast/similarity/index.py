"""SimilarityIndex: exact-scored range and k-NN search over a FAISS index (faiss-cpu).

FAISS finds candidates; every score the index returns, and every threshold decision, is then taken
on the exact similarity between the original float32 vectors, whatever the index kind. Approximate
kinds can therefore miss pairs (recall < 1) but never report a wrong score or a pair outside the
threshold.

How candidates are found per kind (FAISS 1.15):

- Flat, IVF (Flat, SQ8, PQ) and other factory strings: FAISS's own ``range_search``, at a radius
  widened by the index's score margin (the largest gap seen between FAISS's scores and exact ones,
  doubled; 0 for Flat and IVF,Flat, where FAISS's scores are already exact) plus float rounding.
- HNSW: FAISS's ``range_search`` exists but only reports the nodes its efSearch-bounded beam
  visits (HNSW32, d=64, 500 planted duplicates of one query, efSearch=16: it returned 195), so
  ranges are found by k-NN with growing k: k = 32, then ×4 while the k-th neighbour is still
  within the widened radius, with efSearch ≥ k.

The exact vectors that verify the candidates live inside FAISS for Flat (no copy), and in a
float32 copy for every other kind (N·d·4 bytes on top of the index).
"""

from __future__ import annotations

import os
from typing import Any

import faiss
import numpy as np
from tqdm.auto import tqdm

from ..validation import check_int_in, check_number, check_positive_int
from . import index_io, index_kinds
from .index_results import CappedResults, Result, select
from .index_vectors import as_vectors, closer_sign, exact_scores

ROUNDING = 1e-5  # float32 scores from FAISS's BLAS path vs ours differ by ~1e-7; widen by far more
FIRST_K = 32  # first k of the growing k-NN that stands in for HNSW range search
# Flat cosine range search computes [rows, N] float32 score blocks of about this many entries (100 MB).
SCORE_BLOCK = 1 << 25
MARGIN_SAMPLE, MARGIN_K = 256, 16  # queries and neighbours compared to estimate the score margin


class SimilarityIndex:
    """Range and k-NN search over ``vectors`` [N, d] with exact scores.

    Args:
        vectors: [N, d], numpy or torch, any real dtype (stored as float32).
        metric: ``"cosine"`` (inner product of L2-normalised vectors; scores are similarities in
            [-1, 1], higher is closer) or ``"l2"`` (scores are Euclidean distances, NOT squared,
            lower is closer).
        kind: ``"auto"``, ``"flat"`` (exact), ``"ivf"`` (IVF{4√N},Flat), ``"hnsw"`` (HNSW64),
            ``"ivfpq"`` (IVF{4√N},PQ{m}x{bits}), ``"ivfsq8"`` (IVF{4√N},SQ8), or any FAISS
            ``index_factory`` string. "auto" rules and citations: :mod:`.index_kinds`.
        nprobe: IVF lists visited per query; default :func:`.index_kinds.default_nprobe`. Can be
            changed later through the attribute.
        ef_search: HNSW beam width; default 128 (raised to k when a search asks for more).
        expected_queries: how many queries you will run, if known; few (≤ 10 000) makes "auto" pick Flat.
        seed: seeds the training sample and k-means, so equal inputs give equal indexes.
        score_margin: how far FAISS's scores may stray from exact ones (cosine: similarity units;
            l2: distance units); default: estimated on a seeded sample of the vectors.

    Attributes:
        kind: the named kind built (``"factory"`` for a factory string); ``factory``: its FAISS string.
    """

    def __init__(self, vectors: Any, metric: str = "cosine", kind: str = "auto", *, nprobe: int | None = None,
                 ef_search: int | None = None, expected_queries: int | None = None, seed: int = 0,
                 score_margin: float | None = None) -> None:
        index_kinds.check_metric(metric)
        if expected_queries is not None:
            check_positive_int(expected_queries, "expected_queries")
        x = as_vectors(vectors, "vectors", metric)
        self.metric, self.dim = metric, x.shape[1]
        self.kind, self.factory = index_kinds.resolve_kind(kind, len(x), self.dim, expected_queries)
        self._index = index_kinds.build(self.factory, x, metric, check_positive_int(seed, "seed", minimum=0))
        self._index.add(x)
        self._store = None if self.kind == "flat" else x
        self._max_sq_norm = float(np.einsum("ij,ij->i", x, x).max())
        self.nprobe = index_kinds.default_nprobe(self._index) if nprobe is None else nprobe
        self.ef_search = index_kinds.DEFAULT_EF_SEARCH if ef_search is None else ef_search
        self.score_margin = self._estimate_margin(x, seed) if score_margin is None else \
            check_number(score_margin, "score_margin")

    # -- settings -------------------------------------------------------------------------------
    @property
    def nprobe(self) -> int | None:
        """IVF lists visited per query, at most nlist (None without IVF lists); more lists, higher recall."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int | None) -> None:
        self._nprobe = index_kinds.set_nprobe(self._index, None if value is None else check_positive_int(value, "nprobe"))

    @property
    def ef_search(self) -> int:
        """HNSW beam width (ignored by other kinds); raised to k for a k-NN search of k > ef_search."""
        return self._ef_search

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        self._ef_search = check_positive_int(value, "ef_search")  # applied per search, as max(ef_search, k)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return f"SimilarityIndex(n={len(self)}, d={self.dim}, metric={self.metric!r}, kind={self.kind!r}, factory={self.factory!r})"

    # -- data -----------------------------------------------------------------------------------
    def _vectors(self) -> np.ndarray:
        """The exact vectors [N, d]: a view of FAISS's storage for Flat (re-taken, since add() may move it)."""
        if self._store is not None:
            return self._store
        flat = faiss.downcast_index(self._index)
        return faiss.rev_swig_ptr(flat.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)

    def add(self, vectors: Any) -> None:
        """Append ``vectors`` [M, d]; they get ids len(self) .. len(self)+M-1.

        The kind, IVF centroids and codebooks stay those trained at construction, and so does the
        score margin; build a new index when the data has changed a lot.
        """
        x = as_vectors(vectors, "vectors", self.metric, self.dim)
        self._index.add(x)
        if self._store is not None:
            self._store = np.concatenate([self._store, x])
        self._max_sq_norm = max(self._max_sq_norm, float(np.einsum("ij,ij->i", x, x).max()))

    def _estimate_margin(self, x: np.ndarray, seed: int) -> float:
        # Compares FAISS's scores of a seeded sample's neighbours with exact ones. An estimate, not a
        # bound: compressed codes (PQ) may stray further on pairs outside the sample.
        if self.kind == "flat":
            return 0.0
        rows = np.sort(np.random.default_rng(seed).choice(len(x), min(len(x), MARGIN_SAMPLE), replace=False))
        scores, ids = self._faiss_knn(x[rows], min(len(x), MARGIN_K))
        hit = ids >= 0
        if not hit.any():
            return 0.0
        approx = scores[hit] if self.metric == "cosine" else np.sqrt(np.maximum(scores[hit], 0))
        exact = exact_scores(x[rows], np.nonzero(hit)[0], x, ids[hit], self.metric)
        return 2.0 * float(np.abs(approx - exact).max())

    # -- search ---------------------------------------------------------------------------------
    def _queries(self, queries: Any, batch_size: int) -> np.ndarray:
        check_positive_int(batch_size, "batch_size")
        return as_vectors(queries, "queries", self.metric, self.dim)

    def _faiss_knn(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        hnsw = index_kinds.hnsw_index(self._index)
        if hnsw is not None:  # a beam narrower than k cannot return k neighbours
            hnsw.hnsw.efSearch = max(self._ef_search, k)
        return self._index.search(q, k)

    def _radius(self, q: np.ndarray, threshold: float) -> float:
        """The threshold widened by the score margin and rounding, in FAISS's units (squared for l2)."""
        if self.metric == "cosine":
            return threshold - self.score_margin - ROUNDING
        scale = float(np.einsum("ij,ij->i", q, q).max()) + self._max_sq_norm
        return (threshold + self.score_margin) ** 2 + ROUNDING * scale

    def _within(self, faiss_scores: np.ndarray, radius: float) -> np.ndarray:
        return faiss_scores >= radius if self.metric == "cosine" else faiss_scores <= radius

    def _range_candidates(self, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
        """(query rows [M], vector ids [M]) of the candidates within ``radius`` of each of ``q`` [B, d]."""
        if self.kind == "flat" and self.metric == "cosine":
            # numpy's sgemm on blocks of queries, then a per-row threshold scan. FAISS's Flat range
            # search reached 65-85% of sgemm in our benchmark runs (its OpenMP threads compete with
            # OpenBLAS's spinning ones after any numpy work); this path stays in one thread pool.
            vectors, rows_out, ids_out = self._vectors(), [], []
            step = max(1, SCORE_BLOCK // max(len(self), 1))
            for s in range(0, len(q), step):
                for r, row in enumerate(q[s:s + step] @ vectors.T):
                    hits = np.flatnonzero(row >= radius)
                    rows_out.append(np.full(len(hits), s + r, dtype=np.int64))
                    ids_out.append(hits)
            return np.concatenate(rows_out), np.concatenate(ids_out).astype(np.int64)
        if index_kinds.hnsw_index(self._index) is None:
            lims, _, ids = self._index.range_search(q, radius)
            return np.repeat(np.arange(len(q)), np.diff(lims.astype(np.int64))), ids.astype(np.int64)
        rows_out, ids_out = [], []
        pending, k = np.arange(len(q)), min(FIRST_K, len(self))
        while pending.size:
            scores, ids = self._faiss_knn(q[pending], k)
            inside = self._within(scores, radius) & (ids >= 0)
            # Rows whose k-th neighbour is still inside may have more: search them again with 4k.
            again = inside[:, -1] if k < len(self) else np.zeros(len(pending), dtype=bool)
            done = ~again
            r, c = np.nonzero(inside[done])
            rows_out.append(pending[done][r])
            ids_out.append(ids[done][r, c])
            pending, k = pending[again], min(4 * k, len(self))
        return np.concatenate(rows_out), np.concatenate(ids_out).astype(np.int64)

    def range_search(self, queries: Any, threshold: float, max_results: int | None = None, *,
                     batch_size: int = 1024, progress: bool = True) -> list[Result]:
        """Every indexed vector within ``threshold`` of each query, with its exact score.

        Args:
            queries: [Q, d]; run in chunks of ``batch_size`` queries.
            threshold: cosine: keep similarity ≥ threshold, in [-1, 1]. l2: keep Euclidean distance
                ≤ threshold (not squared), threshold ≥ 0.
            max_results: cap on the total number of results over all queries (self-joins near N²).
                When it binds, results are kept rank by rank: every query's best match, then every
                query's second best, ...; the last rank, kept in part, goes to the closest pairs
                (ties: lower query index). Each query keeps a best-first prefix of its list, and a
                warning says how many were found. One chunk's results must still fit in memory:
                lower ``batch_size`` for very dense thresholds.

        Returns:
            One ``(ids int64 [m], scores float32 [m])`` per query, closest first (ties: lower id).
            A query that is itself in the index finds itself (similarity 1, distance 0).
        """
        q = self._queries(queries, batch_size)
        if self.metric == "cosine":
            threshold = check_number(threshold, "threshold", low=-1.0, high=1.0)
        else:
            threshold = check_number(threshold, "threshold", low=0.0)
        if max_results is not None:
            check_positive_int(max_results, "max_results")
        out = CappedResults(len(q), max_results, self.metric)
        vectors = self._vectors()
        for start in tqdm(range(0, len(q), batch_size), desc="range search", disable=not progress, leave=False):
            chunk = q[start:start + batch_size]
            rows, ids = self._range_candidates(chunk, self._radius(chunk, threshold))
            scores = exact_scores(chunk, rows, vectors, ids, self.metric)
            out.add(select(rows + start, ids, scores, threshold, self.metric))
        return out.results()

    def knn(self, queries: Any, k: int, *, batch_size: int = 1024, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` closest indexed vectors of each query: (ids int64 [Q, k], exact scores float32 [Q, k]).

        Rows are closest first (ties: lower id). Approximate kinds fetch max(2k, k+16) candidates and
        keep the k best by exact score; where they found fewer than k (IVF with few lists probed),
        the missing entries are id -1 with score -inf (cosine) or +inf (l2). Flat never pads.
        """
        q = self._queries(queries, batch_size)
        k = check_int_in(k, "k", 1, len(self), hint="at most the number of indexed vectors")
        fetch = k if self.kind == "flat" else min(len(self), max(2 * k, k + 16))
        sign, worst = closer_sign(self.metric), -closer_sign(self.metric) * np.inf
        ids_out = np.empty((len(q), k), dtype=np.int64)
        scores_out = np.empty((len(q), k), dtype=np.float32)
        vectors = self._vectors()
        for start in tqdm(range(0, len(q), batch_size), desc="knn", disable=not progress, leave=False):
            chunk = q[start:start + batch_size]
            _, ids = self._faiss_knn(chunk, fetch)
            rows, cols = np.nonzero(ids >= 0)
            scores = np.full(ids.shape, worst, dtype=np.float32)
            scores[rows, cols] = exact_scores(chunk, rows, vectors, ids[rows, cols], self.metric)
            # Padding (-1) sorts last through its worst score; among real ids, ties go to the lower id.
            order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -sign * scores), axis=1)[:, :k]
            ids_out[start:start + len(chunk)] = np.take_along_axis(ids, order, axis=1)
            scores_out[start:start + len(chunk)] = np.take_along_axis(scores, order, axis=1)
        return ids_out, scores_out

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index to ``path`` atomically (temp file + rename) with a SHA-256 checksum."""
        meta = {"metric": self.metric, "kind": self.kind, "factory": self.factory, "dim": self.dim,
                "ntotal": len(self), "nprobe": self.nprobe, "ef_search": self.ef_search,
                "score_margin": self.score_margin, "max_sq_norm": self._max_sq_norm, "store": self._store is not None}
        sections = [faiss.serialize_index(self._index)]
        if self._store is not None:
            sections.append(self._store)
        index_io.write(path, meta, sections)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SimilarityIndex:
        """Read an index written by :meth:`save`; ValueError if the file is corrupt or truncated."""
        meta, sections = index_io.read(path)
        self = cls.__new__(cls)
        self.metric, self.kind, self.factory, self.dim = meta["metric"], meta["kind"], meta["factory"], meta["dim"]
        self._index = faiss.deserialize_index(sections[0])
        self._store = sections[1].view(np.float32).reshape(meta["ntotal"], self.dim).copy() if meta["store"] else None
        self._max_sq_norm, self.score_margin = meta["max_sq_norm"], meta["score_margin"]
        self.nprobe, self.ef_search = meta["nprobe"], meta["ef_search"]
        return self
