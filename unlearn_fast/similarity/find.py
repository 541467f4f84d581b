"""``find_similar``: which training samples are near-duplicates of some query samples (the forget targets)?

Three ways to compare, one answer format ``{query id: [(train id, score), ...]}``, best first:

- ``"embedding"``: cosine similarity of embeddings, found by a :class:`SimilarityIndex` range
  search. Images/tensors are embedded by ``model``'s features at ``layer`` (default: what its last
  ``nn.Linear`` sees) or, without a model, by the raw inputs flattened; texts by MiniLM
  (:func:`.text.text_features`).
- ``"minhash"``: exact Jaccard similarity, on the MinHash-LSH candidate pairs that involve a query
  (:mod:`.minhash`), of the texts' character 5-gram sets, or, for tensors, of each sample's set of
  non-zero (position, value) entries with values quantised to VALUE_LEVELS steps of the data's
  largest magnitude: copies that keep part of a sample exactly (masked, cropped-and-padded,
  partly overwritten) share those entries. It does not see resampled or re-encoded copies, whose
  values all change: use an embedding of a model trained for copy detection there.
- ``"gradient"``: cosine similarity of per-sample loss gradients, ⟨g_q, g_j⟩ / (‖g_q‖‖g_j‖), from the
  factored Gram of :mod:`unlearn_fast.influence.per_sample` (no [B, P] is built). It answers "which
  retained samples still carry this target's influence?" rather than "which look alike?".

Default thresholds: :data:`DEFAULT_THRESHOLDS`; the calibration that chose them: :mod:`.calibration`.
On digits-blockmask none of the cosines tells block-masked copies from ordinary look-alike digits
well (F1-best precision ≈ 0.1), while MinHash over the exact entries does (precision and recall ≈ 1):
see the figures beside the table. The default method, ``"auto"``, is :func:`default_method`:
"minhash" for images, "embedding" for texts (MiniLM) and for vectors.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..context import resolve_context, split_data
from ..data.similar_dataset import as_tensors
from ..influence.per_sample import capture_factors, factors_gram, factors_sq_norms
from ..influence.vectors import trainable
from ..validation import check_bool, check_choice, check_ids, check_number, check_positive_int, resolve_device
from .embeddings import _resolve_layer, input_features, model_features, on_device
from .index import SimilarityIndex
from .index_results import CappedResults, select
from .minhash import candidate_pairs, exact_jaccard, lsh_params, minhash_signatures
from .text import text_features

METHODS = ("embedding", "minhash", "gradient")
# method="auto" (find_similar's default, and similar_method's in methods/expansion.py): default_method's pick.
AUTO = "auto"
Found = dict[int, list[tuple[int, float]]]
Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # (query rows [M], train ids [M], scores [M])

# MinHash settings, those of near_duplicate_pairs: 128 permutations, character 5-grams.
MINHASH_PERM, MINHASH_NGRAM = 128, 5
# Tensor entries are compared after rounding to this many steps of the largest |value| in the data:
# fine enough that 8-bit images keep every level, coarse enough that float noise below 1e-3 does not
# split equal values.
VALUE_LEVELS = 1024

# (method, data kind) → default threshold. Data kinds: "inputs" (raw inputs flattened, no model),
# "model" (a torch model's features, or its gradients) and "text".
#
# Image entries: calibrated by `python -m unlearn_fast.similarity.calibration` on digits-blockmask
# (K=50 targets × C=10 copies with 25% of the 2×2 blocks zeroed, N=1847): every (target, train id)
# pair scored, threshold = midpoint of the score gap at the F1-best cut on seeds 0–2 pooled (and,
# for "model", pooled over two trainings of the digits MLP 128-64, SGD lr 0.1, batch 64, wd 5e-4:
# 3 epochs "brief" and 30 epochs "recipe"), then scored on held-out seeds 3 and 4. Pair-level
# precision / recall against SimilarDataset.similar (2 CPU cores, torch 2.13):
#
#   method/kind (training)   threshold  seeds 0-2      seed 3         seed 4
#   embedding/inputs          0.9142   0.105 / 0.255  0.102 / 0.234  0.106 / 0.280
#   minhash/inputs            0.4236   1.000 / 1.000  1.000 / 1.000  1.000 / 0.996
#   embedding/model (brief)   0.9822   0.096 / 0.253  0.087 / 0.236  0.115 / 0.266
#   embedding/model (recipe)  0.9822   0.163 / 0.181  0.148 / 0.198  0.222 / 0.224
#   gradient/model (brief)    0.8088   0.088 / 0.557  0.093 / 0.594  0.091 / 0.528
#   gradient/model (recipe)   0.8088   0.142 / 0.253  0.148 / 0.266  0.139 / 0.314
#
# Neither cosine of raw pixels, of the MLP's features nor of its gradients reaches precision and
# recall 0.95: a copy with a quarter of its blocks zeroed has cosine 0.74-0.96 with its target,
# while ordinary digits of the same class reach 0.93-0.95, so the best cut keeps few copies and
# many look-alikes. Other layers do no better (features or gradients of either hidden Linear: F1-best
# precision ≤ 0.14 on seeds 0-2). MinHash over the exact non-zero (position, value) entries separates
# them (precision 1.000 and recall ≥ 0.996 on the held-out seeds), since block masking leaves the kept
# pixels bit-identical; its Jaccard threshold was calibrated on seeds 0-2 like the others (MinHash-LSH
# scored the pairs with Jaccard ≥ 0.05; those below count as missed).
#
# Text entries: calibrated by the same run on unlearn_fast.data.text_near_duplicates (defaults: 240
# QA facts over 5 relations × 4 templates, 20 targets each with 3 edited copies of 1-3 word edits
# and 3 paraphrases by the relation's other templates, N=360), threshold
# at the F1-best cut on seeds 0-2 (MinHash-LSH scored the pairs with Jaccard ≥ 0.05), measured on
# seeds 3 and 4. MinHash is judged on the edited copies only (paraphrases neither required nor
# counted as false), MiniLM on edited copies and paraphrases (calibration.TEXT_TRUTH):
#
#   method/kind              threshold  seeds 0-2      seed 3         seed 4
#   minhash/text              0.5626   0.973 / 0.994  0.966 / 0.950  0.983 / 0.983
#   embedding/text            0.7733   1.000 / 0.997  1.000 / 0.992  0.992 / 1.000
#
# Both reach precision and recall 0.95 on the held-out seeds. Over seeds 0-4, MinHash scores edited
# copies 0.53-0.97 and other texts ≤ 0.62 (another fact in the same template): its cut is low because
# the texts are short (68-142 characters), so a 1-3-word edit costs much of the character 5-gram
# Jaccard; on longer texts an edit costs less and near_duplicate_pairs' 0.8 may suit better. MiniLM
# scores edited copies ≥ 0.81, paraphrases 0.76-0.98 (they share all entities) and other texts ≤ 0.81;
# hand-written paraphrase pairs without shared names can score lower (0.64-0.95,
# tests/test_find_similar.py): pass threshold= for such data.
DEFAULT_THRESHOLDS: dict[tuple[str, str], float] = {
    ("embedding", "inputs"): 0.9142,
    ("embedding", "model"): 0.9822,
    ("embedding", "text"): 0.7733,
    ("minhash", "text"): 0.5626,
    ("minhash", "inputs"): 0.4236,
    ("gradient", "model"): 0.8088,
}


def default_threshold(method: str, data_kind: str) -> float:
    """The default threshold of ``method`` on data of ``data_kind`` ("inputs", "model" or "text")."""
    try:
        return DEFAULT_THRESHOLDS[(method, data_kind)]
    except KeyError:
        valid = ", ".join(f"{m}/{d}" for m, d in DEFAULT_THRESHOLDS)
        raise ValueError(f"no default threshold for method={method!r} on {data_kind} data; valid pairs: {valid}") from None


def _load(data: Any, model: Any) -> tuple[str, Any, torch.Tensor | None]:
    """(kind, items, labels): kind "text" with a list of N str, or "tensor" with inputs [N, ...]
    and labels [N] (None for bare tensors)."""
    if data is None:
        if not isinstance(model, nn.Module):
            raise ValueError("data_or_vectors is None; give the data, or a model trained with unlearn_fast.train "
                             "(its recorded training data is then used)")
        data = resolve_context(model).data
    if isinstance(data, (list, tuple)):
        if data and all(isinstance(t, str) for t in data):
            return "text", list(data), None
        kinds = sorted({type(t).__name__ for t in data}) or ["nothing"]
        raise ValueError(f"a list given as data must hold texts (str) only; it holds {', '.join(kinds)}. "
                         "Give images/features as a tensor [N, ...] or a Dataset")
    if isinstance(data, (torch.Tensor, np.ndarray)):
        x = torch.from_numpy(data) if isinstance(data, np.ndarray) else data
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"data_or_vectors must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
        return "tensor", x, None
    if isinstance(data, (str, bytes)):
        raise ValueError("data_or_vectors is a single str; give a list of texts")
    dataset, _ = split_data(data)  # a Dataset, or a SimilarDataset's train split; raises otherwise
    inputs, labels = as_tensors(dataset)
    return "tensor", inputs, labels


def _auto_method(kind: str, items: Any) -> str:
    """default_method's rule on data already loaded by _load (see default_method for the figures)."""
    return "minhash" if kind == "tensor" and items.dim() >= 3 else "embedding"


def default_method(data_or_vectors: Any, model: Any = None) -> str:
    """The method whose defaults reach the best measured precision/recall on this kind of data, which
    ``method="auto"`` (find_similar's default) resolves to. Measured on held-out seeds 3 and 4
    (the tables beside DEFAULT_THRESHOLDS, from ``python -m unlearn_fast.similarity.calibration``):

    - images (a tensor/dataset of inputs with ≥ 2 dims per sample, such as [N, C, H, W]): "minhash",
      precision/recall 1.000/1.000 and 1.000/0.996 on digits-blockmask, where the cosine of raw
      pixels reaches 0.10/0.23-0.28, of a trained MLP's features 0.09-0.22/0.20-0.27 and of its
      gradients ≤ 0.15 precision. It scores the data alone, with no model: given a model trained by
      :func:`unlearn_fast.train` and ``data_or_vectors=None``, it still picks "minhash" and the
      model only supplies its recorded training data.
    - texts: "embedding" (MiniLM), 1.000/0.992 and 0.992/1.000 on text_near_duplicates' edited copies
      and paraphrases together. "minhash" reaches 0.966/0.950 and 0.983/0.983 on the edited copies
      alone and misses the paraphrases (recall 0.48 on both kinds together), while MiniLM keeps
      ≥ 0.98/1.000 on the edited copies alone. MiniLM needs the ``text`` extra (ImportError with the
      install command without it); pass method="minhash" to do without.
    - vectors [N, d] (already embedded, cosine is their measure): "embedding".

    ``model`` is used only to find the data when ``data_or_vectors`` is None.
    """
    kind, items, _ = _load(data_or_vectors, model)
    return _auto_method(kind, items)


def resolve_method(method: str, data_or_vectors: Any, model: Any = None) -> str:
    """``method`` checked against "auto" and METHODS, with "auto" replaced by :func:`default_method`."""
    method = check_choice(method, (AUTO, *METHODS), "method")
    return default_method(data_or_vectors, model) if method == AUTO else method


def _entry_tokens(inputs: torch.Tensor) -> list[str]:
    """Each sample's non-zero entries as words "position:level" (levels of VALUE_LEVELS), for MinHash
    over word 1-grams; a sample with none is the single word "empty" (all-zero samples are alike)."""
    flat = inputs.reshape(inputs.shape[0], -1).float()
    scale = float(flat.abs().max())
    if scale == 0 or not np.isfinite(scale):
        raise ValueError(f"method='minhash' on tensors needs finite data with a non-zero entry (largest |value|: {scale})")
    levels = torch.round(flat / scale * VALUE_LEVELS).to(torch.int64)
    rows, cols = torch.nonzero(levels, as_tuple=True)
    words = [f"{c}:{v}" for c, v in zip(cols.tolist(), levels[rows, cols].tolist())]
    counts = torch.bincount(rows, minlength=flat.shape[0]).tolist()
    out, start = [], 0
    for count in counts:
        out.append(" ".join(words[start:start + count]) if count else "empty")
        start += count
    return out


def _check_options(method: str, kind: str, model: Any, loss: Any, layer: Any, labels: torch.Tensor | None,
                   model_is_data: bool, auto: bool) -> None:
    """Rejects combinations that the method cannot use, rather than silently ignoring an argument.
    ``model_is_data``: the model only supplies its recorded training data (data_or_vectors=None);
    ``auto``: ``method`` is what "auto" picked."""
    if method == "minhash":
        if (model is not None and not model_is_data) or layer is not None:
            picked = "method='auto' picked 'minhash' for these images, which" if auto else "method='minhash'"
            raise ValueError(f"{picked} takes no model or layer (it compares the data alone); drop "
                             "model=/layer=, or pass method='embedding' or 'gradient' to score with the model")
    if method == "gradient":
        if not isinstance(model, nn.Module):
            raise ValueError(f"method='gradient' needs model= the trained torch.nn.Module, got {type(model).__name__}")
        if kind != "tensor" or labels is None:
            raise ValueError("method='gradient' needs (input, label) pairs: give a Dataset or SimilarDataset "
                             "(or None with a model trained by unlearn_fast.train)")
    if method != "gradient" and loss is not None:
        raise ValueError(f"loss= applies only to method='gradient', not {method!r}")
    if method == "embedding" and kind == "text":
        if model is not None and not isinstance(model, (str, os.PathLike)):
            raise ValueError("for texts, model= is a sentence-transformers folder (default: the bundled MiniLM), "
                             f"got {type(model).__name__}")
        if layer is not None:
            raise ValueError("layer= applies to torch models; texts are embedded by MiniLM's mean-pooled tokens")
    if method == "embedding" and kind == "tensor" and model is not None and not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module (or None for raw inputs), got {type(model).__name__}")


def _range(method: str) -> tuple[float, float, bool]:
    """(low, high, low_open) of the method's score: cosine in [-1, 1], Jaccard in (0, 1]."""
    return (0.0, 1.0, True) if method == "minhash" else (-1.0, 1.0, False)


def _embedding_pairs(kind: str, items: Any, query: list[int], threshold: float, model: Any, layer: Any,
                     batch_size: int, device: torch.device, progress: bool) -> Pairs:
    if kind == "text":
        feats = text_features(items, model_path=model, batch_size=batch_size, device=device, progress=progress)
    elif model is None:
        feats = input_features(items)
    else:
        feats = model_features(model, items, layer, batch_size=batch_size, device=device, progress=progress)
    # Few queries make "auto" pick an exact Flat index: no recall lost to approximation.
    index = SimilarityIndex(feats, "cosine", expected_queries=len(query))
    found = index.range_search(feats[query], threshold, progress=progress)
    rows = np.repeat(np.arange(len(query)), [len(ids) for ids, _ in found])
    return rows, np.concatenate([ids for ids, _ in found]), np.concatenate([s for _, s in found])


def _minhash_pairs(kind: str, items: Any, query: list[int], threshold: float) -> Pairs:
    # texts: character 5-grams; tensors: their entry words, each word one shingle
    texts, ngram, unit = (items, MINHASH_NGRAM, "char") if kind == "text" else (_entry_tokens(items), 1, "word")
    sig = minhash_signatures(texts, MINHASH_PERM, ngram, unit=unit)
    pairs = candidate_pairs(sig, *lsh_params(threshold, MINHASH_PERM))
    # Only the pairs that touch a query are verified: the rest of the corpus is not asked about.
    position = np.full(len(texts), -1, dtype=np.int64)
    position[query] = np.arange(len(query))
    # A pair of two queries answers both of them, so it is kept once per side.
    sides = [(pairs[:, 0], pairs[:, 1]), (pairs[:, 1], pairs[:, 0])]
    rows = np.concatenate([position[a][position[a] >= 0] for a, _ in sides])
    ids = np.concatenate([b[position[a] >= 0] for a, b in sides])
    scores = exact_jaccard(texts, np.stack([np.asarray(query, dtype=np.int64)[rows], ids], axis=1), ngram, unit=unit)
    return rows, ids, scores


def _gradient_layers(model: nn.Module, layer: Any) -> list[str] | None:
    """The module names whose parameters the gradients cover; None for all trainable parameters."""
    if layer is None:
        return None
    layers = [layer] if isinstance(layer, (str, nn.Module)) else list(layer)
    return [_resolve_layer(model, item)[0] for item in layers]


def _gradient_pairs(model: nn.Module, loss: Any, inputs: torch.Tensor, labels: torch.Tensor, query: list[int],
                    threshold: float, layer: Any, batch_size: int, device: torch.device, progress: bool) -> Pairs:
    layers = _gradient_layers(model, layer)
    params = trainable(model, layers)
    out: list[Pairs] = []
    # Gradients are needed even when the caller runs under torch.no_grad().
    with on_device(model, device), torch.enable_grad():
        targets = (inputs[query].to(device), labels[query].to(device))
        # The queries' factors are captured once and reused against every chunk of the data (what
        # grad_gram(targets, chunk) would recompute per chunk).
        q_factors = capture_factors(model, loss, targets, params)
        q_norms = factors_sq_norms(q_factors).sqrt()
        for start in tqdm(range(0, len(inputs), batch_size), desc="gradient similarity", disable=not progress, leave=False):
            chunk = (inputs[start:start + batch_size].to(device), labels[start:start + batch_size].to(device))
            c_factors = capture_factors(model, loss, chunk, params)  # one forward/backward per chunk
            gram = factors_gram(q_factors, c_factors)  # [Q, B]
            norms = factors_sq_norms(c_factors).sqrt()
            # A zero gradient (a sample fitted exactly) has no direction: its cosine is taken as 0.
            cosine = gram / (q_norms[:, None] * norms[None, :]).clamp_min(torch.finfo(gram.dtype).tiny)
            rows, cols = torch.nonzero(cosine >= threshold, as_tuple=True)
            out.append((rows.cpu().numpy(), cols.cpu().numpy() + start, cosine[rows, cols].cpu().numpy()))
    return tuple(np.concatenate(parts) for parts in zip(*out))  # type: ignore[return-value]


def _collect(pairs: Pairs, query: list[int], threshold: float, k: int | None, max_results: int | None) -> Found:
    rows, ids, scores = (np.asarray(a) for a in pairs)
    rows, ids = rows.astype(np.int64), ids.astype(np.int64)
    keep = ids != np.asarray(query, dtype=np.int64)[rows]  # a sample is not its own near-duplicate
    per_query = select(rows[keep], ids[keep], scores[keep].astype(np.float32), threshold, "cosine")
    if k is not None:
        per_query = {q: (i[:k], s[:k]) for q, (i, s) in per_query.items()}
    capped = CappedResults(len(query), max_results, "cosine", source="unlearn_fast.find_similar")
    capped.add(per_query)
    return {qid: list(zip(i.tolist(), s.tolist())) for qid, (i, s) in zip(query, capped.results())}


def find_similar(data_or_vectors: Any, ids: Sequence[int] | np.ndarray | torch.Tensor, *, threshold: float | None = None, method: str = AUTO,
                 model: nn.Module | str | os.PathLike[str] | None = None, loss: Any = None, layer: Any = None,
                 k: int | None = None, max_results: int | None = None, batch_size: int = 256,
                 device: str | torch.device = "auto", progress: bool = True) -> Found:
    """The training samples similar to each query sample, best first.

    Args:
        data_or_vectors: what to search, N samples: a torch Dataset of (input, label), a
            SimilarDataset (its train split), a tensor / numpy array [N, ...] (images, or vectors
            already embedded), or a list of N texts (str). None: the training data recorded on
            ``model`` by :func:`unlearn_fast.train`.
        ids: the query sample ids (e.g. the forget targets), distinct, in [0, N): a sequence, numpy
            array or 1-D integer tensor.
        threshold: keep scores ≥ threshold. Cosine ("embedding", "gradient") in [-1, 1]; Jaccard
            ("minhash") in (0, 1]. Default: :data:`DEFAULT_THRESHOLDS` for the method and kind of data.
        method: "auto" (default), "embedding", "minhash" (texts, or tensors by their exact non-zero
            entries) or "gradient" (needs ``model`` and labels). "auto" is :func:`default_method`, the
            calibrated best (:mod:`.calibration`, the tables beside DEFAULT_THRESHOLDS): "minhash" for
            images (digits-blockmask held out: precision/recall 1.000/≥ 0.996, against ≤ 0.22/≤ 0.28 for
            the cosines of pixels or of a trained MLP's features), "embedding" for texts (MiniLM:
            ≥ 0.99/≥ 0.99 on edited copies and paraphrases) and for vectors [N, d].
        model: "embedding": the torch model whose features embed tensors (None: raw inputs), or for
            texts a sentence-transformers folder (None: the bundled MiniLM). "gradient": the trained model.
            With ``data_or_vectors=None``, a model trained by :func:`unlearn_fast.train` supplies its
            recorded training data, for every method ("minhash" included, which then ignores it).
        loss: "gradient" only; default the loss recorded on the model, else "cross_entropy".
        layer: "embedding": the module whose input is the feature (name or module; default the last
            nn.Linear). "gradient": module name(s) whose parameters the gradients cover (default all).
        k: keep at most the k best per query. With ``threshold=-1`` this is a plain k-NN.
        max_results: cap on the results over all queries, kept rank by rank (every query's best,
            then every second best, ...), with a warning when it binds.
        batch_size: samples per forward (features, gradients).
        device: "auto" runs on CUDA when present.

    Returns:
        ``{query id: [(train id, score), ...]}`` in the order of ``ids``, each list best first (ties:
        lower id). A query never lists itself; it does list other query ids that are similar to it
        (two targets may be near-duplicates of each other), so callers forgetting all the queries
        can drop them, while callers asking about each target alone keep the whole picture.
    """
    auto = check_choice(method, (AUTO, *METHODS), "method") == AUTO
    kind, items, labels = _load(data_or_vectors, model)  # once: "auto" resolves on the loaded data
    method = _auto_method(kind, items) if auto else method
    n = len(items)
    query = check_ids(ids, n, "ids")
    _check_options(method, kind, model, loss, layer, labels, model_is_data=data_or_vectors is None, auto=auto)
    # MinHash scores the data alone: a model that only supplied the data does not make it "model" data.
    data_kind = kind if kind == "text" else ("model" if model is not None and method != "minhash" else "inputs")
    if threshold is None:
        threshold = default_threshold(method, data_kind)
    low, high, low_open = _range(method)
    threshold = check_number(threshold, "threshold", low=low, high=high, low_open=low_open)
    k = None if k is None else check_positive_int(k, "k", hint="or None for every match above the threshold")
    max_results = None if max_results is None else check_positive_int(max_results, "max_results", hint="or None for no cap")
    batch_size = check_positive_int(batch_size, "batch_size")
    progress = check_bool(progress, "progress")
    dev = resolve_device(device)
    if method == "embedding":
        pairs = _embedding_pairs(kind, items, query, threshold, model, layer, batch_size, dev, progress)
    elif method == "minhash":
        pairs = _minhash_pairs(kind, items, query, threshold)
    else:
        assert isinstance(model, nn.Module) and labels is not None
        loss = resolve_context(model, data=data_or_vectors, loss=loss).loss
        pairs = _gradient_pairs(model, loss, items, labels, query, threshold, layer, batch_size, dev, progress)
    return _collect(pairs, query, threshold, k, max_results)


__all__ = ["AUTO", "DEFAULT_THRESHOLDS", "METHODS", "default_method", "find_similar", "resolve_method"]
