"""How :data:`~unlearn_fast.similarity.find.DEFAULT_THRESHOLDS` were calibrated, and the tools for it.

``python -m unlearn_fast.similarity.calibration`` reruns the calibration, of the text entries on
:mod:`unlearn_fast.data.text_near_duplicates` (judged as TEXT_TRUTH says) and of the image entries
on digits-blockmask, and prints one line per (method, data kind, training): the threshold chosen on
seeds 0–2 and the precision / recall on those seeds and on the held-out seeds 3 and 4. The figures recorded next to
``DEFAULT_THRESHOLDS`` come from this run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

import numpy as np

if TYPE_CHECKING:
    from ..data.text_near_duplicates import TextNearDuplicates
    from .find import Found


def precision_recall(found: dict[Hashable, Sequence[tuple[Hashable, float]]],
                     similar: dict[Hashable, Sequence[Hashable]]) -> tuple[float, float]:
    """Pair-level (precision, recall) of ``found`` (query → [(id, score), ...]) against ``similar``
    (query → true near-duplicate ids), over the queries of ``found``.

    Precision is 1 when nothing was found, recall 1 when nothing was to be found.
    """
    hits = [(q, j) for q, matches in found.items() for j, _ in matches]
    truth = {(q, j) for q in found for j in similar.get(q, ())}
    tp = sum(pair in truth for pair in hits)
    return (tp / len(hits) if hits else 1.0), (tp / len(truth) if truth else 1.0)


def best_threshold(scores: np.ndarray, is_true: np.ndarray, n_true: int) -> tuple[float, float, float]:
    """(threshold, precision, recall) at the F1-best cut of the scored pairs.

    Args:
        scores: [M] scores of candidate pairs (higher is more similar).
        is_true: [M] bool, whether each pair is a true near-duplicate pair.
        n_true: how many true pairs exist (those not among the candidates count as missed).

    The threshold sits halfway between the last kept score and the next one below, so that small
    shifts of the scores on other data move as few pairs as possible across it.
    """
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], is_true[order]
    tp = np.cumsum(t)
    kept = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (kept + n_true)
    # A cut must fall between distinct scores: only the last of a run of equal scores is a valid cut.
    valid = np.append(s[1:] < s[:-1], True)
    best = int(np.argmax(np.where(valid, f1, -1)))
    below = s[best + 1] if best + 1 < len(s) else s[best] - 1e-3
    return float((s[best] + below) / 2), float(tp[best] / kept[best]), float(tp[best] / max(n_true, 1))


# -- the calibration run --------------------------------------------------------------------------
CAL_SEEDS, TEST_SEEDS = (0, 1, 2), (3, 4)
MINHASH_FLOOR = 0.05
TRAININGS = {"brief": 3, "recipe": 30}  # epochs of the two trainings; the rest is RECIPES["digits-blockmask"]
# (method, data kind, trainings pooled for the threshold); "inputs" uses no model.
VARIANTS = (("embedding", "inputs", (None,)), ("minhash", "inputs", (None,)), ("embedding", "model", tuple(TRAININGS)),
            ("gradient", "model", tuple(TRAININGS)))


def trained_digits_mlp(data: Any, epochs: int, seed: int = 0) -> Any:
    """The digits MLP trained ``epochs`` epochs by the digits-blockmask recipe (seeded), on CPU."""
    import torch

    from ..data import default_recipe
    from ..models import build_model
    from ..train import train

    recipe = default_recipe("digits-blockmask")
    torch.manual_seed(seed)
    model = build_model(recipe["model"], data.input_shape, data.num_classes)
    return train(model, data, epochs=epochs, lr=recipe["lr"], batch_size=recipe["batch_size"],
                 weight_decay=recipe["weight_decay"], seed=seed, device="cpu", progress=False)


def _scored_pairs(method: str, data: Any, model: Any) -> tuple[np.ndarray, np.ndarray, int]:
    """Every (target, train id) pair's score, whether it is planted, and the number planted."""
    from .find import find_similar

    # Cosines score every pair (threshold −1); MinHash-LSH only proposes pairs near its threshold, so it
    # scores those with Jaccard ≥ FLOOR (true pairs below it count as missed through n_true).
    floor = MINHASH_FLOOR if method == "minhash" else -1.0
    found = find_similar(data, data.forget_ids, method=method, model=model, threshold=floor, device="cpu", progress=False)
    return _score_arrays(found, {q: data.similar[q] for q in data.forget_ids})


def _score_arrays(found: Found, truth: dict[int, list[int]]) -> tuple[np.ndarray, np.ndarray, int]:
    """best_threshold's input from found pairs: their scores, whether each is in ``truth``, how many truth holds."""
    pairs = {(q, j) for q in truth for j in truth[q]}
    scores = np.array([s for matches in found.values() for _, s in matches])
    return scores, np.array([(q, j) in pairs for q, matches in found.items() for j, _ in matches]), len(pairs)


def _choose(parts: Sequence[tuple[np.ndarray, np.ndarray, int]]) -> float:
    """The F1-best threshold over ``parts`` (scored pairs of several runs) pooled, rounded to 4 decimals:
    the value written into DEFAULT_THRESHOLDS, so that the recorded figures are its own."""
    threshold, _, _ = best_threshold(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                     sum(p[2] for p in parts))
    return round(threshold, 4)


def _per_seed_figures(search: Callable[[int], tuple[Found, dict[int, list[int]]]]) -> dict[str, tuple[float, float]]:
    """(precision, recall) on CAL_SEEDS pooled and on each of TEST_SEEDS; ``search(seed)`` gives
    (found, truth) of one seed's data at the chosen threshold."""
    record = {}
    for name, seeds in (("seeds 0-2", CAL_SEEDS), *((f"seed {s}", (s,)) for s in TEST_SEEDS)):
        found: dict[Hashable, list[tuple[Hashable, float]]] = {}
        truth: dict[Hashable, list[Hashable]] = {}
        for seed in seeds:  # ids of different seeds must not mix: key them by (seed, id)
            hits, similar = search(seed)
            found.update({(seed, q): [((seed, j), x) for j, x in m] for q, m in hits.items()})
            truth.update({(seed, q): [(seed, j) for j in similar[q]] for q in hits})
        record[name] = precision_recall(found, truth)
    return record


def calibrate(targets: int = 50, copies: int = 10) -> list[dict[str, Any]]:
    """Rerun the image calibration: per variant, the threshold chosen on CAL_SEEDS (every training of
    the variant pooled) and one record per training with precision/recall on CAL_SEEDS and TEST_SEEDS."""
    from ..data import load_dataset
    from .find import find_similar

    datasets = {seed: load_dataset("digits-blockmask", targets=targets, copies=copies, seed=seed)
                for seed in CAL_SEEDS + TEST_SEEDS}
    models = {(seed, name): trained_digits_mlp(data, epochs, seed)
              for seed, data in datasets.items() for name, epochs in TRAININGS.items()}
    models.update({(seed, None): None for seed in datasets})
    records = []
    for method, kind, trainings in VARIANTS:
        parts = [_scored_pairs(method, datasets[seed], models[(seed, training)]) for training in trainings for seed in CAL_SEEDS]
        threshold = _choose(parts)
        for training in trainings:
            def search(seed: int, training: Any = training, method: str = method,
                       threshold: float = threshold) -> tuple[Found, dict[int, list[int]]]:
                data = datasets[seed]
                return find_similar(data, data.forget_ids, method=method, model=models[(seed, training)],
                                    threshold=threshold, device="cpu", progress=False), data.similar
            records.append({"method": method, "kind": kind, "training": training, "threshold": threshold,
                            **_per_seed_figures(search)})
    return records


# -- the text calibration -------------------------------------------------------------------------
# Which planted near-duplicates of unlearn_fast.data.text_near_duplicates each text method is judged
# on. MinHash over character 5-grams is for near-copies: it is judged on the edited copies, and the
# target's paraphrases are left out of its figures (neither required nor counted as false: they are
# true near-duplicates, just not the kind it is meant to see; they score Jaccard 0.11-0.42). MiniLM
# is for paraphrases too: it is judged on both kinds.
TEXT_TRUTH = {"minhash": ("edited",), "embedding": ("edited", "paraphrased")}


def judged_text_search(data: TextNearDuplicates, method: str, threshold: float | None = None) -> tuple[Found, dict[int, list[int]]]:
    """(found, truth) of ``find_similar(data.texts, data.targets, method=method)`` (default threshold
    if None) as TEXT_TRUTH judges ``method``: truth holds the kinds it is judged on, and the planted
    near-duplicates of the other kinds are dropped from found."""
    from .find import find_similar

    kinds = {"edited": data.edited, "paraphrased": data.paraphrased}
    truth = {t: [j for kind in TEXT_TRUTH[method] for j in kinds[kind][t]] for t in data.targets}
    found = find_similar(data.texts, data.targets, method=method, threshold=threshold, device="cpu", progress=False)
    ignored = {t: set(data.similar[t]) - set(truth[t]) for t in data.targets}
    return {q: [(j, x) for j, x in m if j not in ignored[q]] for q, m in found.items()}, truth


def calibrate_text() -> list[dict[str, Any]]:
    """Calibrate ("minhash", "text") and ("embedding", "text") on text_near_duplicates' defaults:
    per method, the threshold chosen on CAL_SEEDS and its precision/recall on CAL_SEEDS and TEST_SEEDS."""
    from ..data.text_near_duplicates import build_text_near_duplicates

    datasets = {seed: build_text_near_duplicates(seed=seed) for seed in CAL_SEEDS + TEST_SEEDS}
    records = []
    for method in TEXT_TRUTH:
        # As for images: MiniLM scores every pair (threshold −1), MinHash-LSH those with Jaccard ≥ FLOOR.
        floor = MINHASH_FLOOR if method == "minhash" else -1.0
        threshold = _choose([_score_arrays(*judged_text_search(datasets[seed], method, floor)) for seed in CAL_SEEDS])
        records.append({"method": method, "kind": "text", "training": None, "threshold": threshold,
                        **_per_seed_figures(lambda seed, m=method, x=threshold: judged_text_search(datasets[seed], m, x))})
    return records


def main() -> None:
    for r in calibrate_text() + calibrate():
        label = f"{r['method']}/{r['kind']}" + (f" ({r['training']})" if r["training"] else "")
        cells = [f"{p:.3f} / {q:.3f}" for p, q in (r["seeds 0-2"], *(r[f"seed {s}"] for s in TEST_SEEDS))]
        print(f"#   {label:<24}{r['threshold']:>8.4f}   " + "  ".join(cells))


if __name__ == "__main__":
    main()
