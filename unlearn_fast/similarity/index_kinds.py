"""Which FAISS index a :class:`~unlearn_fast.similarity.index.SimilarityIndex` builds, and how.

``kind="auto"`` follows FAISS's "Guidelines to choose an index"
(https://github.com/facebookresearch/faiss/wiki/Guidelines-to-choose-an-index):

- "Will you perform few searches?" (the page says 1000-10000): building an index is not amortised,
  direct computation ("Flat") is the most efficient. We take ``expected_queries <= 10_000``.
- "Do you need exact results?": only "Flat" guarantees them. Below ``FLAT_BELOW`` = 1e5 vectors a
  brute-force scan is cheap enough that exactness costs nothing worth saving.
- "How big is the dataset?": below 1M vectors the page gives "IVFK" with K between 4√N and 16√N,
  trained on 30·K to 256·K vectors. We take K = 4√N, the cheapest k-means, and 80·K training
  vectors, and keep IVF,Flat up to 1e7. At N=2e5, d=384 on 2 cores: K=4√N with 80·K built in 14 s
  and K=8√N with 30·K in 22 s, for the same speed and recall within noise (see default_nprobe).
  The page recommends an HNSW coarse quantizer (IVF65536_HNSW32 ...) from 1M vectors; pass that
  factory string yourself where the flat coarse quantizer is too slow.
- "Is memory a concern?": from ``COMPRESSED_FROM`` = 1e7 vectors the IVF lists hold SQ8 codes
  (4× smaller scans). Every threshold decision is still taken on exact similarities: the index
  keeps the original vectors and re-scores every candidate (see ``index.py``).

HNSW ("If you have a lots of RAM or the dataset is small, HNSW is the best option") is available as
``kind="hnsw"`` but never chosen by "auto", for two reasons measured here. Building HNSW32 over
1e5×384 vectors took about 60 s on 2 CPU cores, against about 9 s for IVF. And dense clusters of
near-duplicates, the very thing we look for, fall out of the graph: with 150 copies of one vector
among 1000, HNSW32 could reach only 138 of the 151 even at k = efSearch = N. With M = 64, the top of
the guidelines' 4 ≤ M ≤ 64 range, it reached all of them (and all of 501 copies), so "hnsw" is HNSW64,
at (d·4 + 64·2·4) bytes per vector.
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from ..validation import check_choice

FLAT_BELOW = 100_000
COMPRESSED_FROM = 10_000_000
FEW_QUERIES = 10_000
TRAIN_PER_CENTROID = 80  # the guidelines ask 30..256 per centroid; FAISS warns below 39
HNSW_M = 64  # links per vector; the guidelines allow 4..64 (see above for why the top)
HNSW_EF_CONSTRUCTION = 64
DEFAULT_EF_SEARCH = 128
NAMED_KINDS = ("auto", "flat", "ivf", "hnsw", "ivfpq", "ivfsq8")
METRICS = {"cosine": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


def auto_kind(n: int, expected_queries: int | None) -> str:
    """The named kind the guidelines point to for ``n`` vectors (see the module docstring)."""
    if n < FLAT_BELOW or (expected_queries is not None and expected_queries <= FEW_QUERIES):
        return "flat"
    return "ivf" if n < COMPRESSED_FROM else "ivfsq8"


def n_lists(n: int) -> int:
    """IVF list count: 4√N, capped so that every centroid gets the 39 training points FAISS asks for."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


def _pq_shape(d: int, n_train: int) -> tuple[int, int]:
    """(sub-quantizers m, bits per code): m divides d with about 4 dims each, bits fit the training set."""
    m = max(k for k in range(1, min(64, max(1, d // 4)) + 1) if d % k == 0)
    bits = int(np.clip(math.floor(math.log2(max(n_train, 1) / 39)), 4, 8))
    return m, bits


def factory_string(kind: str, n: int, d: int) -> str:
    """The FAISS ``index_factory`` string of a named kind (not "auto") for ``n`` vectors of dim ``d``."""
    k = n_lists(n)
    if kind == "flat":
        return "Flat"
    if kind == "ivf":
        return f"IVF{k},Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M}"
    if kind == "ivfsq8":
        return f"IVF{k},SQ8"
    m, bits = _pq_shape(d, min(n, TRAIN_PER_CENTROID * k))
    return f"IVF{k},PQ{m}x{bits}"


def resolve_kind(kind: str, n: int, d: int, expected_queries: int | None) -> tuple[str, str]:
    """(named kind or "factory", factory string). A string that is no named kind must parse as a factory string."""
    if not isinstance(kind, str):
        raise ValueError(f"kind={kind!r} is not valid; valid choices: {', '.join(map(repr, NAMED_KINDS))} "
                         "or a FAISS index_factory string such as 'IVF256,Flat'")
    if kind.lower() in NAMED_KINDS:
        named = kind.lower()
        named = auto_kind(n, expected_queries) if named == "auto" else named
        return named, factory_string(named, n, d)
    try:
        faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no reason given"
        raise ValueError(f"kind={kind!r} is neither a named kind ({', '.join(map(repr, NAMED_KINDS))}) nor a FAISS "
                         f"index_factory string that builds for d={d} (e.g. 'IVF256,Flat', 'HNSW32'); FAISS says: {reason}") from None
    return "factory", kind


def check_metric(metric: str) -> int:
    """The FAISS metric constant of ``metric`` ("cosine" or "l2")."""
    return METRICS[check_choice(metric, METRICS, "metric")]


def build(factory: str, vectors: np.ndarray, metric: str, seed: int) -> faiss.Index:
    """An empty-but-trained FAISS index for ``vectors`` [N, d] (float32, already normalised for cosine).

    Training (IVF centroids, PQ/SQ codebooks) uses a seeded random sample of TRAIN_PER_CENTROID
    vectors per IVF list, so the same data and seed give the same index.
    """
    index = faiss.index_factory(vectors.shape[1], factory, check_metric(metric))
    hnsw = _hnsw_of(index)
    if hnsw is not None:
        hnsw.hnsw.efConstruction = max(hnsw.hnsw.efConstruction, HNSW_EF_CONSTRUCTION)
    if hasattr(_unwrap(index), "do_polysemous_training"):
        # Polysemous codes speed up Hamming pre-filtering, which we never use; training them
        # took 3 s of the 3 s of training IVF84,PQ8x6 on 3300 vectors.
        _unwrap(index).do_polysemous_training = False
    if not index.is_trained:
        ivf = _ivf_of(index)
        per = TRAIN_PER_CENTROID * (ivf.nlist if ivf is not None else 256)
        n_train = min(len(vectors), max(per, 10_000))
        rows = np.sort(np.random.default_rng(seed).choice(len(vectors), n_train, replace=False))
        if ivf is not None:
            ivf.cp.seed = seed  # k-means draws its initial centroids from FAISS's own generator
        index.train(np.ascontiguousarray(vectors[rows]))
    return index


def _unwrap(index: faiss.Index) -> faiss.Index:
    # Pre-transforms (PCA, OPQ) and refine wrappers hide the index that does the searching.
    index = faiss.downcast_index(index)
    while isinstance(index, (faiss.IndexPreTransform, faiss.IndexRefine)):
        index = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index.base_index)
    return index


def _ivf_of(index: faiss.Index) -> faiss.IndexIVF | None:
    inner = _unwrap(index)
    return inner if isinstance(inner, faiss.IndexIVF) else None


def _hnsw_of(index: faiss.Index) -> faiss.IndexHNSW | None:
    inner = _unwrap(index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def default_nprobe(index: faiss.Index) -> int | None:
    """IVF lists visited per query: max(8, nlist/256), at most nlist; None for non-IVF indexes.

    nlist/256 keeps the scanned share of the data near 0.4% as N grows. Measured on planted
    near-duplicates (benchmarks/test_bench_similarity_index.py: N=2e5, d=384, nlist=1789, 1000
    queries): 8 lists found 99.97% of the pairs at cosine ≥ 0.9 and 99.65% at ≥ 0.8, 17.8× faster
    than Flat; 16 lists 99.97% and 99.82%, 9.4× faster. Lower thresholds need more lists (at ≥ 0.7,
    8 lists found about 97%): set ``nprobe`` higher; nprobe = nlist makes IVF exact.
    """
    ivf = _ivf_of(index)
    return None if ivf is None else int(min(ivf.nlist, max(8, math.ceil(ivf.nlist / 256))))


def set_nprobe(index: faiss.Index, nprobe: int | None) -> int | None:
    """Set the IVF lists visited per query, clipped to nlist; returns the value set (None without IVF)."""
    ivf = _ivf_of(index)
    if ivf is None or nprobe is None:
        return None
    ivf.nprobe = min(int(nprobe), ivf.nlist)
    return int(ivf.nprobe)


def hnsw_index(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW index inside ``index``, if any.

    Its efSearch must be ≥ k for a k-NN search; and its range_search only reports the nodes the
    efSearch-bounded beam visits, so SimilarityIndex emulates ranges with k-NN of growing k."""
    return _hnsw_of(index)
