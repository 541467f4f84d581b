"""MinHash-LSH near-duplicate discovery over texts; the hot loops are C++ (``unlearn_fast._C``).

Pipeline: texts → shingles → MinHash signatures → LSH banding (candidate pairs) → verification
against the threshold → union-find groups. The C++ kernels release the GIL and spread the work over
``num_threads`` std::threads (``None``: all hardware threads); the thread count never changes a result.

Shingles
    Texts are str, read as Unicode code points and hashed through their UTF-8 bytes (a text holding a
    lone surrogate cannot be encoded and is rejected). ``unit="char"``: a shingle is ``ngram``
    consecutive code points. ``unit="word"``: words are ``text.split()`` (Python's whitespace, i.e.
    ``str.isspace``), and a shingle is ``ngram`` consecutive words joined by one ASCII space. A text
    with fewer than ``ngram`` units gives one shingle: the whole text (for words: all its words joined
    by one space). Empty texts, and for words whitespace-only texts, are rejected with a ValueError
    naming their index. A signature is over the shingle *set*: repeated shingles change nothing.

Hashing (every operation on unsigned 64-bit integers, modulo 2^64)::

    G = 0x9E3779B97F4A7C15
    mix(z):  z ^= z >> 30;  z *= 0xBF58476D1CE4E5B9;  z ^= z >> 27;  z *= 0x94D049BB133111EB;  z ^= z >> 31
    key(j) = mix(seed + (j + 1) * G)                      # the splitmix64 stream started at `seed`
    shingle_hash(b: bytes):  h = key(0) ^ (len(b) * G)
                             for each 8-byte chunk c of b, the last one zero-padded on the right:
                                 h = mix(h ^ int.from_bytes(c, "little"))
                             return h
    permutation k (0 <= k < num_perm):  h_k(x) = mix(x ^ key(k + 1))
    signature[k] = min over the shingles s of h_k(shingle_hash(utf8(s)))

``mix`` is the splitmix64 finaliser, a bijection with full avalanche: xor-ing a distinct key in
before it gives each permutation an independent-looking order of the (already random) shingle hashes,
and its two multiplies vectorise (AVX-512 where present, chosen at run time), unlike a
``(a·x + b) mod (2^61 − 1)`` family that needs 128-bit products. Keys are a stream, so the signature
for ``num_perm=64`` is the first 64 columns of the one for ``num_perm=128`` with the same seed.

Verification
    LSH candidates are kept when their similarity is ``>= threshold``. ``verify="exact"`` (default)
    uses the exact Jaccard similarity of the two shingle-hash sets, computed in C++ (64-bit shingle
    hashes stand for the shingles; a collision needs ~2^32 shingles). ``verify="estimate"`` uses the
    signature estimate (fraction of equal signature entries, standard error sqrt(J(1−J)/num_perm)):
    cheaper, no second pass over the texts, but pairs near the threshold fall either way.

Groups are the connected components of the verified pairs (single linkage): when A~B and B~C, the
group is {A, B, C} even if J(A, C) < threshold.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from .._C import candidate_pairs as _c_candidate_pairs
from .._C import connected_components as _c_connected_components
from .._C import exact_jaccard as _c_exact_jaccard
from .._C import minhash_signatures as _c_minhash_signatures
from unlearn_fast.validation import check_choice, check_int_in, check_number, check_positive_int

UNITS = ("char", "word")
VERIFY = ("exact", "estimate")
# Missing a near-duplicate leaves its influence in the model, while a false candidate only costs one
# verification, so the default band choice weighs false negatives 19 times more (recall ≈ 0.95 at
# J = 0.8 itself with 128 permutations, rising fast above it).
FP_WEIGHT = 0.05
FN_WEIGHT = 0.95
_VERIFY_CHUNK = 8192  # pairs per block of signature comparisons: bounds the [chunk, num_perm] temporaries
# The most permutations per signature. Signatures are uint64 [N, num_perm]: 8·num_perm bytes per
# text, 32 KiB at this maximum (3.2 GiB for 100 000 texts), and the estimate's standard error
# sqrt(J(1 − J)/num_perm) is then at most 0.008, far below any useful threshold's width. The band
# search of lsh_params grows as num_perm² log num_perm: 4 s at 4096 on one core, 23 s at 8192.
MAX_NUM_PERM = 4096
SIGNATURE_BYTES = np.dtype(np.uint64).itemsize


def _texts(texts: Any) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of str, got a single str/bytes; wrap it in a list")
    try:
        texts = list(texts)
    except TypeError:
        raise ValueError(f"texts must be a sequence of str, got {type(texts).__name__}") from None
    if not texts:
        raise ValueError("texts is empty; give at least one text")
    return texts  # the C++ side checks every item (str, non-empty, UTF-8) and names the bad index


def _threads(num_threads: int | None) -> int:
    return 0 if num_threads is None else check_positive_int(num_threads, "num_threads", hint="or None for all cores")


def _shingle_args(ngram: int, seed: int, unit: str) -> tuple[int, int, bool]:
    ngram = check_positive_int(ngram, "ngram", hint="it counts characters or words per shingle")
    seed = check_int_in(seed, "seed", 0, 2**64 - 1)
    return ngram, seed, check_choice(unit, UNITS, "unit") == "word"


def _num_perm(num_perm: Any, texts: int | None = None) -> int:
    """``num_perm`` checked to be an int in [1, MAX_NUM_PERM]; the error says what memory it would take."""
    num_perm = check_positive_int(num_perm, "num_perm", hint="the number of hash permutations per signature")
    if num_perm > MAX_NUM_PERM:
        per_text = num_perm * SIGNATURE_BYTES
        need = (f"{texts} text{'s' if texts != 1 else ''} × {num_perm} × {SIGNATURE_BYTES} bytes = {texts * per_text / 1e9:.1f} GB"
                if texts is not None else f"{per_text / 1e9:.1f} GB per text")
        raise ValueError(f"num_perm={num_perm} exceeds the maximum {MAX_NUM_PERM}: the signatures are uint64 "
                         f"[N, num_perm], here {need} (at most {MAX_NUM_PERM * SIGNATURE_BYTES // 1024} KiB per text), "
                         f"and the LSH band search grows as num_perm²; 128 to 512 is usual")
    return num_perm


def _pairs(pairs: Any) -> np.ndarray:
    pairs = np.asarray(pairs)
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
        raise ValueError(f"pairs must be an integer array of shape [M, 2], got {pairs.dtype} {pairs.shape}")
    return pairs.astype(np.int64, copy=False)


def minhash_signatures(texts: Sequence[str], num_perm: int = 128, ngram: int = 5, seed: int = 0,
                       unit: str = "char", num_threads: int | None = None) -> np.ndarray:
    """MinHash signatures of ``texts`` as a uint64 array [N, num_perm] (hashing: see the module docstring).

    Raises ValueError for an empty corpus, an empty (or, for ``unit="word"``, whitespace-only) text,
    naming its index, for ``num_perm`` outside [1, MAX_NUM_PERM] (the signatures take 8·num_perm bytes
    per text), ``ngram`` < 1, ``seed`` outside [0, 2^64 − 1] or another unit.
    """
    texts = _texts(texts)
    num_perm = _num_perm(num_perm, len(texts))
    ngram, seed, word = _shingle_args(ngram, seed, unit)
    return _c_minhash_signatures(texts, num_perm, ngram, seed, word, _threads(num_threads))


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> float | np.ndarray:
    """The MinHash estimate of Jaccard similarity: the fraction of equal entries along the last axis.

    Two signatures [num_perm] give a float; stacks [..., num_perm] give an array [...]. Unbiased, with
    standard error sqrt(J(1 − J)/num_perm) (each entry agrees with probability J).
    """
    a, b = np.asarray(sig_a), np.asarray(sig_b)
    if a.shape != b.shape or a.ndim == 0 or a.shape[-1] == 0:
        raise ValueError(f"signatures must share a shape [..., num_perm] with num_perm >= 1, got {a.shape} and {b.shape}")
    est = np.mean(a == b, axis=-1)
    return float(est) if a.ndim == 1 else est


def exact_jaccard(texts: Sequence[str], pairs: Any, ngram: int = 5, seed: int = 0, unit: str = "char",
                  num_threads: int | None = None) -> np.ndarray:
    """Exact Jaccard similarity [M] of the shingle-hash sets of each pair (i, j) of ``pairs`` [M, 2]."""
    ngram, seed, word = _shingle_args(ngram, seed, unit)
    return _c_exact_jaccard(_texts(texts), _pairs(pairs), ngram, seed, word, _threads(num_threads))


@lru_cache(maxsize=256)
def _best_bands_rows(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    # P(s) = 1 − (1 − s^r)^b is a polynomial of degree b·r <= num_perm, so Gauss–Legendre with
    # num_perm/2 + 1 nodes integrates it exactly on each side of the threshold.
    nodes, weights = np.polynomial.legendre.leggauss(num_perm // 2 + 1)
    s_fp, w_fp = threshold * (nodes + 1) / 2, weights * threshold / 2
    s_fn, w_fn = threshold + (1 - threshold) * (nodes + 1) / 2, weights * (1 - threshold) / 2
    best, best_cost = (1, 1), np.inf
    for bands in range(1, num_perm + 1):
        rows = np.arange(1, num_perm // bands + 1)[:, None]
        false_pos = (1 - (1 - s_fp**rows) ** bands) @ w_fp
        false_neg = ((1 - s_fn**rows) ** bands) @ w_fn
        cost = fp_weight * false_pos + fn_weight * false_neg
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best, best_cost = (bands, k + 1), cost[k]
    return best


def lsh_params(threshold: float, num_perm: int, fp_weight: float = FP_WEIGHT, fn_weight: float = FN_WEIGHT) -> tuple[int, int]:
    """LSH (bands, rows), bands·rows <= num_perm, for a Jaccard ``threshold`` t.

    A pair of similarity s becomes a candidate with probability P(s) = 1 − (1 − s^rows)^bands (the
    S-curve of Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3.4). The choice
    minimises ``fp_weight · ∫_0^t P(s) ds + fn_weight · ∫_t^1 (1 − P(s)) ds``: the false-positive and
    false-negative probabilities for a similarity drawn uniformly on [0, 1].
    """
    threshold = check_number(threshold, "threshold", low=0.0, high=1.0, low_open=True)
    num_perm = _num_perm(num_perm)
    fp_weight = check_number(fp_weight, "fp_weight")
    fn_weight = check_number(fn_weight, "fn_weight")
    if fp_weight + fn_weight == 0:
        raise ValueError("fp_weight and fn_weight are both 0; give at least one a positive weight")
    return _best_bands_rows(threshold, num_perm, fp_weight, fn_weight)


def candidate_pairs(signatures: np.ndarray, bands: int, rows: int, num_threads: int | None = None) -> np.ndarray:
    """LSH candidates: pairs (i < j) [M, 2] int64, sorted and unique, whose signatures agree on every
    row of at least one band (band b covers columns [b·rows, (b + 1)·rows); columns past bands·rows
    are unused).

    Work is linear in N per band, plus quadratic in the size of each bucket: a corpus with thousands of
    copies of one text yields all their pairs.
    """
    sig = np.asarray(signatures)
    if sig.ndim != 2 or sig.dtype != np.uint64:
        raise ValueError(f"signatures must be a uint64 array [N, num_perm], got {sig.dtype} {sig.shape}")
    bands = check_positive_int(bands, "bands")
    rows = check_positive_int(rows, "rows")
    if bands * rows > sig.shape[1]:
        raise ValueError(f"bands={bands} × rows={rows} = {bands * rows} exceeds num_perm={sig.shape[1]}")
    return _c_candidate_pairs(np.ascontiguousarray(sig), bands, rows, _threads(num_threads))


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                         seed: int = 0, unit: str = "char", verify: str = "exact", bands: int | None = None,
                         rows: int | None = None, fp_weight: float = FP_WEIGHT, fn_weight: float = FN_WEIGHT,
                         num_threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Verified near-duplicate pairs: (pairs [M, 2] int64 with i < j, similarity [M] float64 >= threshold).

    Candidates come from LSH banding (``bands``/``rows`` given together, or chosen by :func:`lsh_params`)
    and are verified as the module docstring's *Verification* says.
    """
    threshold = check_number(threshold, "threshold", low=0.0, high=1.0, low_open=True)
    texts = _texts(texts)
    num_perm = _num_perm(num_perm, len(texts))
    verify = check_choice(verify, VERIFY, "verify")
    if (bands is None) != (rows is None):
        raise ValueError(f"give bands and rows together or neither, got bands={bands!r}, rows={rows!r}")
    if bands is None:
        bands, rows = lsh_params(threshold, num_perm, fp_weight, fn_weight)
    sig = minhash_signatures(texts, num_perm, ngram, seed, unit, num_threads)
    pairs = candidate_pairs(sig, bands, rows, num_threads)
    if verify == "exact":
        similarity = exact_jaccard(texts, pairs, ngram, seed, unit, num_threads)
    else:
        similarity = np.concatenate([np.zeros(0)] + [
            jaccard_estimate(sig[chunk[:, 0]], sig[chunk[:, 1]])
            for chunk in np.array_split(pairs, range(_VERIFY_CHUNK, len(pairs), _VERIFY_CHUNK))
        ])
    keep = similarity >= threshold
    return pairs[keep], similarity[keep]


def near_duplicate_groups(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128, ngram: int = 5,
                          seed: int = 0, unit: str = "char", verify: str = "exact", bands: int | None = None,
                          rows: int | None = None, fp_weight: float = FP_WEIGHT, fn_weight: float = FN_WEIGHT,
                          num_threads: int | None = None) -> list[list[int]]:
    """Groups of near-duplicate texts: the connected components (union-find, C++) of the verified
    pairs of :func:`near_duplicate_pairs`, same arguments.

    Returns only groups of two or more texts, each sorted, the groups ordered by their first index.
    Texts without a near-duplicate appear in no group.
    """
    texts = _texts(texts)
    pairs, _ = near_duplicate_pairs(texts, threshold, num_perm, ngram, seed, unit, verify, bands, rows,
                                    fp_weight, fn_weight, num_threads)
    labels = _c_connected_components(len(texts), pairs)
    groups: dict[int, list[int]] = {}
    for doc in np.unique(pairs).tolist():  # ascending, so each group comes out sorted
        groups.setdefault(int(labels[doc]), []).append(doc)
    return [groups[label] for label in sorted(groups)]
