"""K-NN metrics against scikit-learn and per-query Python loops."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.metrics import recall_score
from sklearn.neighbors import KNeighborsClassifier

from raytumor.evaluate import (
    cmc_curve,
    knn_predict,
    knn_scores,
    knn_vote,
    nearest_neighbors,
    per_class_recall,
    recall_macro,
    recall_macro_rare,
    recall_micro,
)
from raytumor.evaluate import metrics


def manual_neighbors(ref, query_point, n):
    dist = np.sqrt(((ref - query_point) ** 2).sum(axis=1))
    return np.argsort(dist, kind="stable")[:n]  # ties by reference index


def manual_predict(ref, ref_labels, query, k):
    """Per-query vote; returns predictions and how many queries had a tied vote."""
    predictions, n_ties = [], 0
    for point in query:
        order = manual_neighbors(ref, point, k)
        counts = Counter(ref_labels[order].tolist())
        best = max(counts.values())
        tied = {c for c, v in counts.items() if v == best}
        n_ties += len(tied) > 1
        predictions.append(next(ref_labels[j] for j in order if ref_labels[j] in tied))
    return np.array(predictions), n_ties


def manual_rank(ref, ref_labels, query, query_labels, rank):
    hits = [y in ref_labels[manual_neighbors(ref, point, rank)] for point, y in zip(query, query_labels)]
    return float(np.mean(hits))


def random_split(seed, n_ref=40, n_query=60, dim=3, n_classes=3, grid=False):
    rng = np.random.default_rng(seed)
    if grid:  # integer coordinates: many exact distance ties, also at the k-th place
        ref = rng.integers(0, 4, (n_ref, 2)).astype(np.float64)
        query = rng.integers(0, 4, (n_query, 2)).astype(np.float64)
    else:
        ref, query = rng.normal(size=(n_ref, dim)), rng.normal(size=(n_query, dim))
    return ref, rng.integers(0, n_classes, n_ref), query, rng.integers(0, n_classes, n_query)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 4, 7, 10])
@pytest.mark.parametrize("grid", [False, True], ids=["continuous", "grid_ties"])
def test_predictions_match_manual_vote(seed, k, grid):
    ref, ref_labels, query, query_labels = random_split(seed, grid=grid)
    expected, n_ties = manual_predict(ref, ref_labels, query, k)
    if k % 2 == 0:
        assert n_ties > 0  # the data really exercises the tie rule
    np.testing.assert_array_equal(knn_predict(ref, ref_labels, query, k=k), expected)
    scores = knn_scores(ref, ref_labels, query, query_labels, k=k)
    np.testing.assert_array_equal(scores["predictions"], expected)
    assert scores["recall_micro"] == pytest.approx(recall_score(query_labels, expected, average="micro"))
    classes = np.unique(query_labels)
    assert scores["recall_macro"] == pytest.approx(recall_score(query_labels, expected, labels=classes, average="macro"))
    assert scores["rank5"] == pytest.approx(manual_rank(ref, ref_labels, query, query_labels, 5))
    assert scores["cmc"] == pytest.approx([manual_rank(ref, ref_labels, query, query_labels, r) for r in range(1, 11)])


def test_vote_tie_goes_to_class_with_nearest_member():
    query = np.zeros((1, 2))
    ref = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [-4.0, 0.0]])
    # 2 votes each; label 5 has the nearest member (distance 1).
    assert knn_predict(ref, np.array([5, 7, 7, 5]), query, k=4).tolist() == [5]
    # Swap which class owns the nearest point: now 7 wins (a "smallest label" rule would say 5).
    assert knn_predict(ref, np.array([7, 5, 5, 7]), query, k=4).tolist() == [7]
    # Three-way tie, one vote each: the nearest neighbour decides.
    assert knn_predict(ref[:3], np.array([9, 2, 4]), query, k=3).tolist() == [9]
    # A clear majority beats a nearer singleton.
    assert knn_predict(ref, np.array([1, 2, 2, 2]), query, k=4).tolist() == [2]


def test_equidistant_tie_goes_to_lower_reference_index():
    query = np.zeros((1, 2))
    ref = np.array([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0], [5.0, 5.0]])
    assert knn_predict(ref, np.array([3, 1, 1, 0]), query, k=2).tolist() == [3]
    assert knn_predict(ref, np.array([1, 3, 3, 0]), query, k=2).tolist() == [1]
    # Reference 2 ties with 0 and 1 at the k-th place: the lower indices are the neighbours.
    dist, idx = nearest_neighbors(ref, query, 2)
    assert idx.tolist() == [[0, 1]] and dist.tolist() == [[1.0, 1.0]]


def test_knn_vote_on_labels_directly():
    neighbor_labels = np.array([[4, 2, 2, 4], [1, 1, 3, 3], [3, 3, 1, 1], [0, 6, 6, 6]])
    assert knn_vote(neighbor_labels).tolist() == [4, 1, 3, 6]
    assert knn_vote(torch.as_tensor(neighbor_labels)).tolist() == [4, 1, 3, 6]


def test_matches_sklearn_when_votes_cannot_tie():
    ref, ref_labels, query, query_labels = random_split(5, n_classes=2, dim=6)
    for k in (1, 3, 7):
        sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute").fit(ref, ref_labels).predict(query)
        np.testing.assert_array_equal(knn_predict(ref, ref_labels, query, k=k), sk)


def test_k_larger_than_reference_set_uses_all():
    ref, ref_labels, query, query_labels = random_split(1, n_ref=5, n_query=20)
    scores = knn_scores(ref, ref_labels, query, query_labels, k=7)
    assert scores["k"] == 5
    np.testing.assert_array_equal(scores["predictions"], manual_predict(ref, ref_labels, query, 5)[0])
    # Every reference is within rank 5, so rank 5..10 is whether the label exists at all.
    present = float(np.mean(np.isin(query_labels, ref_labels)))
    assert scores["cmc"][4:] == pytest.approx([present] * 6)
    assert len(scores["cmc"]) == 10


def test_classes_absent_from_queries_do_not_count():
    ref, ref_labels, query, _ = random_split(2, n_classes=5)
    query_labels = np.where(np.arange(len(query)) % 2 == 0, 0, 1)
    scores = knn_scores(ref, ref_labels, query, query_labels, k=7)
    predictions = scores["predictions"]
    assert set(np.unique(predictions)) - {0, 1}  # some predictions fall on absent classes
    assert set(scores["per_class_recall"]) == {0, 1}
    expected = recall_score(query_labels, predictions, labels=[0, 1], average="macro")
    assert scores["recall_macro"] == pytest.approx(expected)
    assert scores["recall_micro"] == pytest.approx(np.mean(predictions == query_labels))


def test_rare_class_recall():
    y_true = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    y_pred = np.array([0, 1, 1, 1, 0, 2, 0, 0])
    assert per_class_recall(y_true, y_pred) == pytest.approx({0: 0.5, 1: 2 / 3, 2: 1.0, 3: 0.0})
    assert recall_micro(y_true, y_pred) == pytest.approx(4 / 8)
    assert recall_macro(y_true, y_pred) == pytest.approx((0.5 + 2 / 3 + 1.0 + 0.0) / 4)
    # Rare 2 and 3 present, 9 absent and ignored.
    assert recall_macro_rare(y_true, y_pred, [2, 3, 9]) == pytest.approx(0.5)
    assert recall_macro_rare(y_true, y_pred, np.array([3])) == 0.0
    assert math.isnan(recall_macro_rare(y_true, y_pred, [7, 9]))
    assert math.isnan(recall_macro_rare(y_true, y_pred, ()))


def test_knn_scores_rare_and_clf_accuracy():
    ref, ref_labels, query, query_labels = random_split(3, n_classes=4)
    scores = knn_scores(ref, ref_labels, query, query_labels, k=7, rare_classes=[2, 3])
    recalls = scores["per_class_recall"]
    assert scores["recall_macro_rare"] == pytest.approx((recalls[2] + recalls[3]) / 2)
    assert math.isnan(knn_scores(ref, ref_labels, query, query_labels, rare_classes=[8])["recall_macro_rare"])
    assert "acc_clf" not in scores

    logits = np.random.default_rng(0).normal(size=(len(query), 4))
    with_logits = knn_scores(ref, ref_labels, query, query_labels, query_logits=logits)
    assert with_logits["acc_clf"] == pytest.approx(np.mean(logits.argmax(1) == query_labels))


def test_torch_and_numpy_inputs_agree():
    ref, ref_labels, query, query_labels = random_split(4, dim=8, n_classes=4)
    logits = np.random.default_rng(1).normal(size=(len(query), 4))
    from_numpy = knn_scores(ref, ref_labels, query, query_labels, rare_classes=[1], query_logits=logits)
    from_torch = knn_scores(
        torch.from_numpy(ref),
        torch.from_numpy(ref_labels),
        torch.from_numpy(query).requires_grad_(),
        torch.from_numpy(query_labels),
        rare_classes=torch.tensor([1]).tolist(),
        query_logits=torch.from_numpy(logits),
    )
    np.testing.assert_array_equal(from_numpy.pop("predictions"), from_torch.pop("predictions"))
    assert from_numpy == from_torch
    # float32 gives the same neighbours on well-separated random data.
    from_f32 = knn_scores(ref.astype(np.float32), ref_labels, query.astype(np.float32), query_labels)
    np.testing.assert_array_equal(from_f32["predictions"], knn_predict(ref, ref_labels, query))


def test_blocked_queries_give_same_result(monkeypatch):
    ref, ref_labels, query, query_labels = random_split(6)
    expected = knn_scores(ref, ref_labels, query, query_labels, rare_classes=[2])
    monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", 3 * len(ref))  # 3 queries per block
    got = knn_scores(ref, ref_labels, query, query_labels, rare_classes=[2])
    np.testing.assert_array_equal(got.pop("predictions"), expected.pop("predictions"))
    assert got == expected


def test_cmc_curve_pads_short_neighbour_lists():
    neighbor_labels = np.array([[1, 0], [2, 2], [0, 1]])
    assert cmc_curve(neighbor_labels, np.array([0, 1, 0]), max_rank=4) == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3])


def test_string_labels():
    ref = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels = np.array(["glioma", "glioma", "meningioma", "meningioma"])
    scores = knn_scores(ref, labels, np.array([[0.5], [10.5]]), np.array(["glioma", "glioma"]), k=2)
    assert scores["predictions"].tolist() == ["glioma", "meningioma"]
    assert scores["per_class_recall"] == {"glioma": 0.5}


def test_invalid_inputs():
    with pytest.raises(ValueError, match="reference"):
        knn_scores(np.zeros((0, 3)), np.zeros(0, dtype=int), np.zeros((2, 3)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="dimensions differ"):
        knn_scores(np.zeros((4, 3)), np.zeros(4, dtype=int), np.zeros((2, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="one label per row"):
        knn_scores(np.zeros((4, 3)), np.zeros(3, dtype=int), np.zeros((2, 3)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="query"):
        knn_scores(np.zeros((4, 3)), np.zeros(4, dtype=int), np.zeros((0, 3)), np.zeros(0, dtype=int))


@pytest.mark.parametrize("n_ref", [129, 640, 2003])
@pytest.mark.parametrize("grid", [False, True], ids=["continuous", "grid_ties"])
def test_wide_reference_sets_match_a_stable_sort(n_ref, grid):
    # Past _DIRECT_TOPK_WIDTH references the top-k searches strided groups (with padding
    # when n_ref is not a multiple of the group, and recursing at 2003); the result must be
    # exactly a stable sort of the distances, ties included.
    rng = np.random.default_rng(n_ref)
    if grid:
        ref, query = rng.integers(0, 5, (n_ref, 2)).astype(np.float64), rng.integers(0, 5, (50, 2)).astype(np.float64)
    else:
        ref, query = rng.normal(size=(n_ref, 4)), rng.normal(size=(50, 4))
    dist, idx = nearest_neighbors(ref, query, 10)
    expected = np.stack([manual_neighbors(ref, point, 10) for point in query])
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(dist, np.sqrt(((ref[expected] - query[:, None]) ** 2).sum(-1)), atol=1e-6)


@pytest.mark.parametrize("width", [129, 1000, 4999])
@pytest.mark.parametrize("m", [1, 8, 11])
def test_grouped_topk_equals_topk(width, m):
    rows = torch.from_numpy(np.random.default_rng(width + m).normal(size=(40, width)).astype(np.float32))
    values, columns = metrics._smallest(rows, m)
    expected_values, expected_columns = rows.topk(m, dim=1, largest=False, sorted=True)
    torch.testing.assert_close(values, expected_values, rtol=0, atol=0)
    np.testing.assert_array_equal(columns.numpy(), expected_columns.numpy())


def test_non_finite_embeddings_are_rejected():
    ref, ref_labels, query, query_labels = random_split(2)
    ref[3, 1] = np.nan
    with pytest.raises(ValueError, match="reference embeddings contain NaN"):
        knn_scores(ref, ref_labels, query, query_labels)
    query[0, 0] = np.inf
    with pytest.raises(ValueError, match="query embeddings contain NaN"):
        nearest_neighbors(ref[:3], query, 2)
