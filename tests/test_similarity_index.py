"""SimilarityIndex against numpy brute force on planted near-duplicates."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

from unlearn_fast.similarity import index_io, index_kinds
from unlearn_fast.similarity.index import SimilarityIndex

THRESHOLD = {"cosine": 0.9, "l2": 0.45}  # ≈ the same pairs: ‖a − b‖² = 2 − 2 cos for unit vectors


def planted(n: int = 3000, copies: int = 400, d: int = 32, seed: int = 0) -> np.ndarray:
    """Random unit vectors, then noisy copies of the first ``copies`` of them (cosine to their source ≈ 0.75..0.99)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    noise = rng.uniform(0.1, 0.9, (copies, 1)) * rng.standard_normal((copies, d)) / np.sqrt(d)
    dup = base[:copies] + noise
    return np.concatenate([base, dup / np.linalg.norm(dup, axis=1, keepdims=True)]).astype(np.float32)


def brute_force(x: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """All query-vector scores [Q, N] in float64."""
    x64, q64 = x.astype(np.float64), q.astype(np.float64)
    if metric == "cosine":
        x64 /= np.linalg.norm(x64, axis=1, keepdims=True)
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
        return q64 @ x64.T
    return np.sqrt(np.maximum((q64 ** 2).sum(1)[:, None] + (x64 ** 2).sum(1)[None] - 2 * q64 @ x64.T, 0))


def true_pairs(scores: np.ndarray, threshold: float, metric: str) -> set[tuple[int, int]]:
    hits = scores >= threshold if metric == "cosine" else scores <= threshold
    return set(zip(*map(np.ndarray.tolist, np.nonzero(hits))))


def found_pairs(results) -> set[tuple[int, int]]:
    return {(q, int(i)) for q, (ids, _) in enumerate(results) for i in ids}


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    # FAISS's OpenMP barriers stall when other processes share the 2 cores: training IVF87,PQ8x6 on
    # 3400 vectors took 3-6 s with 2 threads against 0.2 s with one. These sizes gain nothing from 2.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return planted()


@pytest.fixture(scope="module")
def queries(data: np.ndarray) -> np.ndarray:
    # Sources, their copies and plain vectors; every pair the recall counts involves these.
    return data[np.r_[0:200, 3000:3200, 1000:1100]]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_equals_brute_force(data, queries, metric):
    index = SimilarityIndex(data * 3.0, metric=metric, kind="flat")  # scale: cosine must normalise
    threshold = THRESHOLD[metric] * (3.0 if metric == "l2" else 1.0)
    results = index.range_search(queries * 3.0, threshold, batch_size=128, progress=False)
    reference = brute_force(data * 3.0, queries * 3.0, metric)
    assert found_pairs(results) == true_pairs(reference, threshold, metric)
    assert len(found_pairs(results)) > 300  # planted pairs, not only self-matches
    sign = 1 if metric == "cosine" else -1
    for q, (ids, scores) in enumerate(results):
        assert ids.dtype == np.int64 and scores.dtype == np.float32
        np.testing.assert_allclose(scores, reference[q, ids], atol=1e-5 * (3 if metric == "l2" else 1))
        assert np.all(np.diff(sign * scores) <= 0)  # closest first


@pytest.mark.parametrize("kind", ["ivf", "hnsw", "ivfpq", "IVF32,SQ8"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_approximate_kinds_recall_and_exact_scores(data, queries, kind, metric):
    index = SimilarityIndex(data, metric=metric, kind=kind)
    assert index.kind != "flat"
    threshold = THRESHOLD[metric]
    results = index.range_search(queries, threshold, progress=False)
    reference = brute_force(data, queries, metric)
    truth, found = true_pairs(reference, threshold, metric), found_pairs(results)
    assert found <= truth  # exact verification: never a pair outside the threshold
    assert len(found) / len(truth) >= 0.99
    for q, (ids, scores) in enumerate(results):
        np.testing.assert_allclose(scores, reference[q, ids], atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_knn(data, queries, kind):
    index = SimilarityIndex(torch.from_numpy(data), kind=kind)
    ids, scores = index.knn(torch.from_numpy(queries), 5, progress=False)
    reference = brute_force(data, queries, "cosine")
    best = np.argsort(-reference, axis=1, kind="stable")[:, :5]
    assert ids.shape == scores.shape == (len(queries), 5)
    np.testing.assert_allclose(scores, np.take_along_axis(reference, ids, axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)
    if kind == "flat":
        np.testing.assert_array_equal(ids, best)
    else:  # near-duplicates (cos ≥ 0.9) are found; farther neighbours (cos ≈ 0.5 at d=32) may not be
        near = np.take_along_axis(reference, best, axis=1)[:, 1] >= 0.9
        assert near.sum() > 100 and np.mean(ids[near, :2] == best[near, :2]) >= 0.99
    if kind == "ivf":
        index.nprobe = 10**6  # clipped to nlist: every list visited, so the search is exact
        np.testing.assert_array_equal(index.knn(queries, 5, progress=False)[0], best)


def test_hnsw_range_search_grows_past_the_beam(data):
    # 150 copies of one vector: more than the first k (32) and than efSearch, so k must grow twice.
    rng = np.random.default_rng(1)
    copies = data[0] + 0.02 * rng.standard_normal((150, data.shape[1])).astype(np.float32)
    index = SimilarityIndex(np.concatenate([data[:1000], copies]), kind="hnsw", ef_search=16)
    ids, _ = index.range_search(data[:1], 0.95, progress=False)[0]
    assert set(ids.tolist()) == {0, *range(1000, 1150)}
    assert index.ef_search == 16  # the per-search widening does not stick


def test_max_results_keeps_each_querys_best_rank_by_rank(data, queries):
    index = SimilarityIndex(data, kind="flat")
    full = index.range_search(queries, 0.3, progress=False)
    cap = sum(len(ids) for ids, _ in full) // 3
    with pytest.warns(UserWarning, match="kept"):
        capped = index.range_search(queries, 0.3, max_results=cap, batch_size=64, progress=False)
    # The documented order: rank within the query, then closer first, then lower query index.
    pairs = sorted((r, -float(s), q, int(i)) for q, (ids, scores) in enumerate(full)
                   for r, (i, s) in enumerate(zip(ids, scores)))[:cap]
    assert found_pairs(capped) == {(q, i) for _, _, q, i in pairs}
    for (ids, scores), (full_ids, _) in zip(capped, full):
        np.testing.assert_array_equal(ids, full_ids[:len(ids)])  # a best-first prefix


def test_add_extends_the_index(data):
    index = SimilarityIndex(data[:2000], kind="ivf")
    index.add(data[2000:])
    assert len(index) == len(data)
    ids, _ = index.range_search(data[3000:3001], 0.999, progress=False)[0]
    assert 3000 in ids.tolist()


def test_l2_threshold_zero_finds_exact_duplicates(data):
    index = SimilarityIndex(np.concatenate([data[:100], data[:3]]), metric="l2", kind="flat")
    results = index.range_search(data[:3], 0.0, progress=False)
    assert [sorted(ids.tolist()) for ids, _ in results] == [[0, 100], [1, 101], [2, 102]]


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_save_load_roundtrip(tmp_path, data, queries, kind):
    index = SimilarityIndex(data, kind=kind, nprobe=7 if kind != "flat" else None)
    path = tmp_path / "sub" / "index.ufs"
    index.save(path)
    loaded = SimilarityIndex.load(path)
    assert (loaded.kind, loaded.factory, loaded.nprobe, len(loaded)) == (index.kind, index.factory, index.nprobe, len(index))
    for (a_ids, a_sc), (b_ids, b_sc) in zip(index.range_search(queries, 0.8, progress=False),
                                             loaded.range_search(queries, 0.8, progress=False)):
        np.testing.assert_array_equal(a_ids, b_ids)
        np.testing.assert_array_equal(a_sc, b_sc)


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "not_ours"])
def test_corrupt_file_is_detected(tmp_path, data, damage):
    path = tmp_path / "index.ufs"
    SimilarityIndex(data[:500], kind="hnsw").save(path)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-100] ^= 0x01
    elif damage == "truncate":
        raw = raw[:-10]
    elif damage == "header":
        raw[20] ^= 0x40
    else:
        raw[:4] = b"PK\x03\x04"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt|truncated|not a SimilarityIndex"):
        SimilarityIndex.load(path)


def test_failed_save_leaves_the_old_file(tmp_path, data, monkeypatch):
    path = tmp_path / "index.ufs"
    SimilarityIndex(data[:100], kind="flat").save(path)
    before = path.read_bytes()

    def half_then_fail(fh, section):
        fh.write(section[: len(section) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(index_io, "_write_section", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        SimilarityIndex(data[:300], kind="flat").save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["index.ufs"]
    assert len(SimilarityIndex.load(path)) == 100


def _with(array: np.ndarray, row: int, value: float) -> np.ndarray:
    out = array.copy()
    out[row] = value
    return out


@pytest.mark.parametrize("make, match", [
    (lambda x: SimilarityIndex(_with(x, 7, np.nan)), r"NaN or inf in rows \[7\]"),
    (lambda x: SimilarityIndex(_with(x, 3, np.inf), metric="l2"), r"NaN or inf in rows \[3\]"),
    (lambda x: SimilarityIndex(_with(_with(x, 2, 0.0), 5, 0.0)), r"zero vectors in rows \[2, 5\]"),
    (lambda x: SimilarityIndex(x[:0]), "non-empty 2-D"),
    (lambda x: SimilarityIndex(x[0]), "non-empty 2-D"),
    (lambda x: SimilarityIndex(x, metric="dot"), "metric='dot'.*'cosine', 'l2'"),
    (lambda x: SimilarityIndex(x, kind="ivf-flat"), "kind='ivf-flat'.*'flat'.*index_factory"),
    (lambda x: SimilarityIndex(x, nprobe=0), "nprobe=0"),
    (lambda x: SimilarityIndex(x).range_search(x[:, :5], 0.9), "d=5.*d=32"),
    (lambda x: SimilarityIndex(x).range_search(_with(x[:4], 1, 0.0), 0.9), r"queries has zero vectors in rows \[1\]"),
    (lambda x: SimilarityIndex(x).range_search(x[:4], 1.5), r"threshold=1.5.*\[-1.0, 1.0\]"),
    (lambda x: SimilarityIndex(x, metric="l2").range_search(x[:4], -0.1), r"threshold=-0.1.*\[0.0, inf\]"),
    (lambda x: SimilarityIndex(x).range_search(x[:4], 0.9, max_results=0), "max_results=0"),
    (lambda x: SimilarityIndex(x).range_search(x[:4], 0.9, batch_size=0), "batch_size=0"),
    (lambda x: SimilarityIndex(x).knn(x[:4], 0), r"k=0 must be an int in \[1, 50\]"),
    (lambda x: SimilarityIndex(x).knn(x[:4], len(x) + 1), r"k=51 must be an int in \[1, 50\]"),
    (lambda x: SimilarityIndex(x).add(x[:, :3]), "d=3.*d=32"),
])
def test_bad_input_is_named(data, make, match):
    with pytest.raises(ValueError, match=match):
        make(data[:50])


def test_auto_kind_follows_the_guidelines():
    assert index_kinds.auto_kind(50_000, None) == "flat"
    assert index_kinds.auto_kind(200_000, None) == "ivf"
    assert index_kinds.auto_kind(200_000, expected_queries=1000) == "flat"
    assert index_kinds.auto_kind(20_000_000, None) == "ivfsq8"
    assert index_kinds.factory_string("ivf", 1_000_000, 384) == "IVF4000,Flat"  # 4√N
    assert index_kinds.n_lists(3000) == 3000 // 39  # enough training points per centroid
    assert index_kinds.factory_string("ivfpq", 1_000_000, 384) == "IVF4000,PQ64x8"


def test_default_on_small_data_is_exact(data):
    assert SimilarityIndex(data).kind == "flat"
