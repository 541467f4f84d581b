"""Near-duplicate grouping: the C++ union-find against scipy's connected components (peer)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from unlearn_fast import _C

N_NODES, N_EDGES = 200_000, 300_000


@pytest.fixture(scope="module")
def edges() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, N_NODES, size=(N_EDGES, 2), dtype=np.int64)


def _scipy_labels(edges: np.ndarray) -> np.ndarray:
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(N_NODES, N_NODES))
    return connected_components(graph, directed=False)[1]


def test_union_find_cpp(benchmark, edges):
    benchmark.group = "connected components 200k/300k"
    labels = benchmark(_C.connected_components, N_NODES, edges)
    # Same partition as the peer (label values differ: ours are the smallest member).
    peer = _scipy_labels(edges)
    _, ours_inverse = np.unique(labels, return_inverse=True)
    _, peer_inverse = np.unique(peer, return_inverse=True)
    pairs = set(zip(ours_inverse.tolist(), peer_inverse.tolist()))
    assert len(pairs) == len(np.unique(labels)) == len(np.unique(peer))


def test_union_find_scipy_peer(benchmark, edges):
    benchmark.group = "connected components 200k/300k"
    benchmark.extra_info["peer"] = True
    benchmark(_scipy_labels, edges)
