"""The compiled extension unlearn_fast._C and the kernel backend dispatch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unlearn_fast import _C
from unlearn_fast.kernels import BACKEND_ENV, select_backend


def _components_reference(n, pairs):
    label = list(range(n))
    changed = True
    while changed:  # propagate the minimum label along edges until stable
        changed = False
        for a, b in pairs:
            low = min(label[a], label[b])
            if label[a] != low or label[b] != low:
                label[a] = label[b] = low
                changed = True
    return label


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=40))))
def test_connected_components_matches_reference(case):
    n, pairs = case
    got = _C.connected_components(n, np.array(pairs, dtype=np.int64).reshape(-1, 2))
    assert got.tolist() == _components_reference(n, pairs)


def test_connected_components_bad_input():
    with pytest.raises(ValueError, match="outside"):
        _C.connected_components(3, np.array([[0, 3]]))
    with pytest.raises(ValueError, match=r"shape \[M, 2\]"):
        _C.connected_components(3, np.array([[0, 1, 2]]))
    assert _C.connected_components(0, np.zeros((0, 2), dtype=np.int64)).tolist() == []


def test_select_backend(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert select_backend("cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert select_backend("cpu") == "triton"
    monkeypatch.setenv(BACKEND_ENV, "cuda-magic")
    with pytest.raises(ValueError, match="valid choices: triton, torch"):
        select_backend("cpu")
