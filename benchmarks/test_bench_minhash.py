"""MinHash-LSH near-duplicate candidates: ``unlearn_fast.similarity.minhash`` (C++) against datasketch (peer).

2,000 documents of ~1,500 characters: 1,600 random ones, then 400 copies of the first 400 with 1 to 40
of their ~230 words replaced (exact Jaccard from ≈0.97 down to ≈0.3). Both sides shingle the text into
character 5-grams, compute MinHash signatures with 128 permutations and return LSH candidate pairs for
threshold 0.8, with the same S-curve weights (false positive 0.05, false negative 0.95), so that both
use the same bands × rows. The peer is datasketch's ``MinHash.update_batch`` + ``MinHashLSH`` insert
and query, in pure Python on one core; ours uses both cores unless ``num_threads=1``.

``extra_info["quality"]`` holds, per entry, the signature estimate's error against exact Jaccard (Python
sets of shingles) on the 400 planted pairs, and the candidate recall over planted pairs with J >= 0.8.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from unlearn_fast.similarity.minhash import (FN_WEIGHT, FP_WEIGHT, candidate_pairs, jaccard_estimate, lsh_params,
                                             minhash_signatures, near_duplicate_groups)

GROUP = "MinHash-LSH 2000 docs x 1.5k chars"
N_RANDOM, N_COPIES, WORDS = 1600, 400, 230
NUM_PERM, NGRAM, THRESHOLD = 128, 5, 0.8


def make_corpus(seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    docs = [[rng.choice(vocab) for _ in range(WORDS)] for _ in range(N_RANDOM)]
    texts, planted = [" ".join(d) for d in docs], []
    for i in range(N_COPIES):
        copy = list(docs[i])
        for pos in rng.sample(range(WORDS), 1 + i % 40):
            copy[pos] = rng.choice(vocab)
        planted.append((i, len(texts)))
        texts.append(" ".join(copy))
    return texts, np.array(planted, dtype=np.int64)


def char_shingles(text: str) -> set[str]:
    return {text[i:i + NGRAM] for i in range(len(text) - NGRAM + 1)}


@pytest.fixture(scope="module")
def corpus():
    texts, planted = make_corpus()
    exact = np.array([len(a & b) / len(a | b) for a, b in ((char_shingles(texts[i]), char_shingles(texts[j])) for i, j in planted)])
    return texts, planted, exact


def quality(estimates: np.ndarray, candidates: set[tuple[int, int]], planted: np.ndarray, exact: np.ndarray) -> dict:
    err = np.abs(estimates - exact)
    near = [tuple(p) for p in planted[exact >= THRESHOLD].tolist()]
    return {"mean |est-J|": float(err.mean()), "max |est-J|": float(err.max()),
            "recall@J>=0.8": float(np.mean([p in candidates for p in near])), "candidates": len(candidates)}


def ours(texts: list[str], num_threads: int | None) -> tuple[np.ndarray, np.ndarray]:
    sig = minhash_signatures(texts, NUM_PERM, NGRAM, seed=1, num_threads=num_threads)
    bands, rows = lsh_params(THRESHOLD, NUM_PERM)
    return sig, candidate_pairs(sig, bands, rows, num_threads)


def datasketch_pipeline(texts: list[str]):
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=(FP_WEIGHT, FN_WEIGHT))
    hashes = []
    for i, text in enumerate(texts):
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([s.encode("utf-8") for s in char_shingles(text)])
        lsh.insert(i, m)
        hashes.append(m)
    pairs = {(min(i, j), max(i, j)) for i, m in enumerate(hashes) for j in lsh.query(m) if j != i}
    return hashes, pairs, (lsh.b, lsh.r)


def _throughput(benchmark, n: int) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["docs_per_s"] = n / benchmark.stats.stats.median


@pytest.mark.parametrize("num_threads", [None, 1], ids=["all-cores", "1-thread"])
def test_ours_signatures_and_candidates(benchmark, corpus, num_threads):
    texts, planted, exact = corpus
    benchmark.group = GROUP
    sig, pairs = benchmark.pedantic(ours, args=(texts, num_threads), rounds=7, iterations=1, warmup_rounds=1)
    estimates = jaccard_estimate(sig[planted[:, 0]], sig[planted[:, 1]])
    benchmark.extra_info["quality"] = {"ours": quality(estimates, {tuple(p) for p in pairs.tolist()}, planted, exact)}
    benchmark.extra_info["bands_rows"] = lsh_params(THRESHOLD, NUM_PERM)
    _throughput(benchmark, len(texts))


def test_ours_verified_groups(benchmark, corpus):
    """The whole pipeline: signatures, candidates, exact-Jaccard verification, union-find groups."""
    texts, planted, exact = corpus
    benchmark.group = GROUP
    groups = benchmark.pedantic(near_duplicate_groups, args=(texts, THRESHOLD, NUM_PERM, NGRAM, 1),
                                rounds=7, iterations=1, warmup_rounds=1)
    together = {(g[0], d) for g in groups for d in g[1:]}  # planted groups are pairs (i, copy of i)
    near = [tuple(p) for p in planted[exact >= THRESHOLD].tolist()]
    benchmark.extra_info["quality"] = {"groups": {"recall@J>=0.8": float(np.mean([p in together for p in near])),
                                                  "groups": len(groups)}}
    _throughput(benchmark, len(texts))


def test_datasketch_peer(benchmark, corpus):
    pytest.importorskip("datasketch")
    texts, planted, exact = corpus
    benchmark.group = GROUP
    benchmark.extra_info["peer"] = True
    hashes, pairs, bands_rows = benchmark.pedantic(datasketch_pipeline, args=(texts,), rounds=3, iterations=1)
    estimates = np.array([hashes[i].jaccard(hashes[j]) for i, j in planted])
    benchmark.extra_info["quality"] = {"datasketch": quality(estimates, pairs, planted, exact)}
    benchmark.extra_info["bands_rows"] = bands_rows
    _throughput(benchmark, len(texts))
