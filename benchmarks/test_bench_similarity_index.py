"""SimilarityIndex range search: exact (Flat) against numpy brute force, and IVF against Flat.

Data: random unit vectors (d=384) where 5% of them have 3 noisy copies each (cosine to the source
spread over about 0.86..0.99); the 1000 queries are sources, so every query has near-duplicates.
Threshold: cosine ≥ 0.9.

- "exact range search": ``SimilarityIndex(kind="flat").range_search`` (FAISS's blocked BLAS scan)
  against numpy (peer): ``queries @ vectors.T`` in chunks of 256 queries, then the threshold.
  ``extra_info`` holds the GFLOP/s of both (2·Q·N·d per search) and numpy's sgemm GFLOP/s on one
  4096³ product, for the issue's target: ours ≥ 70% of sgemm.
- "ANN range search": IVF (``kind="ivf"``, default nprobe) against our Flat (peer), with the recall
  of the Flat pairs in ``extra_info["quality"]`` (and, untimed, at cosine ≥ 0.8). Target: recall
  ≥ 0.99 at ≥ 10× the speed.
  The issue asks N = 1e6; ANN_N = 2e5 here, because on 2 cores building IVF over 1e6×384 vectors
  (k-means with 4000 lists on 320 000 training vectors) alone would take minutes. Raise ANN_N on a
  bigger machine; the IVF build time is in ``extra_info["build_s"]``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from unlearn_fast.similarity.index import SimilarityIndex

D = 384
EXACT_N = 100_000
ANN_N = int(os.environ.get("UNLEARN_FAST_BENCH_ANN_N", 200_000))  # the issue asks 1e6: set the variable
QUERIES = 1000
THRESHOLD = 0.9
LOWER_THRESHOLD = 0.8  # recall only: IVF needs more lists as the threshold drops
NUMPY_CHUNK = 256
ROUNDS = 7
EXACT_GROUP = f"exact range search N={EXACT_N} d={D} Q={QUERIES}"
ANN_GROUP = f"ANN range search N={ANN_N} d={D} Q={QUERIES}"


def near_duplicates(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(vectors [n, D] unit float32, query rows [QUERIES]): the last 15% of rows are copies of the sources."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, D), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sources = rng.choice(int(n * 0.85), n * 5 // 100, replace=False)
    copies = np.repeat(x[sources], 3, axis=0)
    copies += rng.uniform(0.1, 0.6, (len(copies), 1)).astype(np.float32) * rng.standard_normal(copies.shape, dtype=np.float32) / np.sqrt(D)
    x[n - len(copies):] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return x, sources[:QUERIES]


def numpy_range_search(vectors: np.ndarray, queries: np.ndarray, threshold: float) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for start in range(0, len(queries), NUMPY_CHUNK):
        scores = queries[start:start + NUMPY_CHUNK] @ vectors.T
        for row in scores:
            ids = np.flatnonzero(row >= threshold)
            out.append((ids, row[ids]))
    return out


def pairs(results) -> set[tuple[int, int]]:
    return {(q, int(i)) for q, (ids, _) in enumerate(results) for i in ids}


def gflops(benchmark, n: int) -> float:
    return 2 * QUERIES * n * D / benchmark.stats.stats.median / 1e9


@pytest.fixture(scope="module")
def sgemm_gflops() -> float:
    a = np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32)
    a @ a  # warm-up: thread pool start
    times = []
    for _ in range(5):  # the median, like the entries it is compared with: one timing is noise here
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * 4096**3 / float(np.median(times)) / 1e9


@pytest.fixture(scope="module")
def exact_setting():
    vectors, rows = near_duplicates(EXACT_N)
    return SimilarityIndex(vectors, kind="flat"), vectors, vectors[rows]


@pytest.fixture(scope="module")
def ann_setting():
    vectors, rows = near_duplicates(ANN_N, seed=1)
    start = time.perf_counter()
    ivf = SimilarityIndex(vectors, kind="ivf")
    build_s = time.perf_counter() - start
    flat = SimilarityIndex(vectors, kind="flat")
    queries = vectors[rows]
    truth = {t: pairs(flat.range_search(queries, t, progress=False)) for t in (THRESHOLD, LOWER_THRESHOLD)}
    return flat, ivf, build_s, queries, truth


def test_exact_ours(benchmark, exact_setting, sgemm_gflops):
    index, vectors, queries = exact_setting
    benchmark.group = EXACT_GROUP
    results = benchmark.pedantic(index.range_search, args=(queries, THRESHOLD), kwargs={"progress": False},
                                 rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert pairs(results) == pairs(numpy_range_search(vectors, queries, THRESHOLD))
    ours = gflops(benchmark, EXACT_N)
    benchmark.extra_info.update({"gflops": ours, "sgemm_gflops": sgemm_gflops, "fraction_of_sgemm": ours / sgemm_gflops})
    benchmark.extra_info["quality"] = {"throughput": {"GFLOP/s": ours, "sgemm GFLOP/s": sgemm_gflops,
                                                      "of sgemm": ours / sgemm_gflops}}


def test_exact_numpy_peer(benchmark, exact_setting, sgemm_gflops):
    _, vectors, queries = exact_setting
    benchmark.group = EXACT_GROUP
    benchmark.extra_info["peer"] = True
    benchmark.pedantic(numpy_range_search, args=(vectors, queries, THRESHOLD), rounds=ROUNDS, iterations=1, warmup_rounds=1)
    peer = gflops(benchmark, EXACT_N)
    benchmark.extra_info.update({"gflops": peer, "sgemm_gflops": sgemm_gflops, "fraction_of_sgemm": peer / sgemm_gflops})
    benchmark.extra_info["quality"] = {"throughput": {"GFLOP/s": peer, "of sgemm": peer / sgemm_gflops}}


def test_ann_ivf(benchmark, ann_setting):
    _, ivf, build_s, queries, truth = ann_setting
    benchmark.group = ANN_GROUP
    results = benchmark.pedantic(ivf.range_search, args=(queries, THRESHOLD), kwargs={"progress": False},
                                 rounds=ROUNDS, iterations=1, warmup_rounds=1)
    found = pairs(results)
    assert found <= truth[THRESHOLD]  # scores are exact: nothing outside the threshold
    recall = len(found) / len(truth[THRESHOLD])
    lower = LOWER_THRESHOLD
    recall_lower = len(pairs(ivf.range_search(queries, lower, progress=False))) / len(truth[lower])
    benchmark.extra_info.update({"recall": recall, f"recall_at_{lower}": recall_lower, "pairs": len(truth[THRESHOLD]),
                                 "factory": ivf.factory, "nprobe": ivf.nprobe, "build_s": build_s})
    benchmark.extra_info["quality"] = {ivf.factory: {"recall": recall, f"recall at {lower}": recall_lower,
                                                     "nprobe": ivf.nprobe, "build s": build_s}}


def test_ann_flat_peer(benchmark, ann_setting):
    flat, _, _, queries, _ = ann_setting
    benchmark.group = ANN_GROUP
    benchmark.extra_info["peer"] = True
    benchmark.pedantic(flat.range_search, args=(queries, THRESHOLD), kwargs={"progress": False},
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info["gflops"] = gflops(benchmark, ANN_N)
