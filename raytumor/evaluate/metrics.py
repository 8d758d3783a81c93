"""K-nearest-neighbour evaluation of embeddings: the paper's Table 2 metrics.

The paper classifies each test embedding by a K=7 nearest-neighbour vote over the combined
train+validation embeddings and reports Recall_mu (micro), Recall_M (macro), Recall_M* (macro
over rare classes) and Rank-5 accuracy. Everything here is a plain function over arrays:
embeddings ``(N, D)`` and labels ``(N,)`` as numpy arrays or torch tensors; results are numpy
arrays and Python floats.

Neighbours are ranked by Euclidean distance, ties in distance by reference index (also at
the k-th place, so results never depend on the order a top-k happens to return). Distances
come from ``|q|^2 - 2 q.r + |r|^2`` on a matrix multiply, in float64 when the embeddings are
float64 and float32 otherwise, so two references whose distances differ by float rounding
only may be ranked either way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "nearest_neighbors",
    "knn_vote",
    "knn_predict",
    "cmc_curve",
    "per_class_recall",
    "recall_micro",
    "recall_macro",
    "recall_macro_rare",
    "knn_scores",
]

# Bound on the (queries x references) distance block held at once: 2**25 floats = 128 MiB f32.
_BLOCK_ELEMENTS = 2**25
# Exact top-k on wide distance rows: strided groups of this size (see ``_smallest``), down to
# rows this narrow, which go straight to topk.
_GROUP = 5
_DIRECT_TOPK_WIDTH = 128


def _embeddings(x: Any) -> torch.Tensor:
    t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {tuple(t.shape)}")
    return t.to(torch.float64 if t.dtype == torch.float64 else torch.float32).contiguous()


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _labels(x: Any) -> np.ndarray:
    a = _numpy(x)
    if a.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {a.shape}")
    return a


def _key(label: Any) -> Any:
    return label.item() if isinstance(label, np.generic) else label


def _smallest(rows: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and column indices of the ``m`` smallest entries of each row, ascending.

    The same values as ``rows.topk(m, largest=False)`` (equal values in arbitrary order), in
    a fraction of the time on wide rows: CPU topk costs a few ns per element, so the columns
    are first split into strided groups of ``_GROUP`` and only the ``m`` groups with the
    smallest minimum are searched. That is exact: every entry below the m-th smallest value
    v_m lies in a group whose minimum is below v_m, and fewer than m groups have one, so all
    of them are among the m kept; the kept groups' minima fill the rest with values <= v_m.
    """
    n_rows, width = rows.shape
    n_groups = -(-width // _GROUP)
    if width <= _DIRECT_TOPK_WIDTH or n_groups < m:
        return rows.topk(m, dim=1, largest=False, sorted=True)
    if n_groups * _GROUP != width:
        rows = F.pad(rows, (0, n_groups * _GROUP - width), value=float("inf"))
    grouped = rows.view(n_rows, _GROUP, n_groups)  # group g holds columns g, g + G, g + 2G, ...
    _, groups = _smallest(grouped.amin(dim=1), m)
    candidates = grouped.gather(2, groups.unsqueeze(1).expand(-1, _GROUP, -1)).view(n_rows, -1)
    values, position = candidates.topk(m, dim=1, largest=False, sorted=True)
    return values, (position // m) * n_groups + groups.gather(1, position % m)


def nearest_neighbors(ref_embeddings: Any, query_embeddings: Any, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` nearest references of each query, nearest first.

    ref_embeddings ``(R, D)``, query_embeddings ``(Q, D)`` -> distances ``(Q, n)`` (Euclidean)
    and reference indices ``(Q, n)`` int64, with ``n = min(n_neighbors, R)``. Computed in
    blocks of queries so memory stays bounded for any ``Q``.
    """
    ref, query = _embeddings(ref_embeddings), _embeddings(query_embeddings)
    if ref.dtype != query.dtype:
        ref, query = ref.double(), query.double()
    if ref.shape[1] != query.shape[1]:
        raise ValueError(f"reference and query dimensions differ: {ref.shape[1]} vs {query.shape[1]}")
    n = min(n_neighbors, ref.shape[0])
    if n < 1:
        raise ValueError("need at least one reference embedding and n_neighbors >= 1")
    for name, x in (("reference", ref), ("query", query)):
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} embeddings contain NaN or infinite values")
    n_ref = ref.shape[0]
    m = min(n + 1, n_ref)
    ref_sq = ref.pow(2).sum(dim=1)
    ref_t = ref.T.contiguous()  # addmm reads a contiguous (D, R) operand faster
    if n_ref > _DIRECT_TOPK_WIDTH and n_ref % _GROUP:
        # Pad to whole groups here, once, instead of copying every distance block: padded
        # columns get an infinite distance, so they are never among the m <= R nearest.
        pad = _GROUP - n_ref % _GROUP
        ref_t = F.pad(ref_t, (0, pad))
        ref_sq = F.pad(ref_sq, (0, pad), value=float("inf"))
    block = max(1, _BLOCK_ELEMENTS // ref_t.shape[1])
    dists, indices = [], []
    with torch.no_grad():
        for start in range(0, query.shape[0], block):
            q = query[start : start + block]
            # |r|^2 - 2 q.r ranks like the squared distance; |q|^2 is added after the top-k.
            partial = torch.addmm(ref_sq, q, ref_t, beta=1.0, alpha=-2.0)
            # One extra neighbour shows whether references tie at the n-th distance, where
            # the top-k picks arbitrarily; such rows are redone with a stable sort (lowest
            # index wins).
            values, idx = _smallest(partial, m)
            if m > n:
                ambiguous = (values[:, n] == values[:, n - 1]).nonzero().squeeze(1)
                values, idx = values[:, :n], idx[:, :n]
                if len(ambiguous):
                    rows = partial[ambiguous]
                    order = rows.argsort(dim=1, stable=True)[:, :n]
                    values[ambiguous], idx[ambiguous] = rows.gather(1, order), order
            # Equal distances within the n are also in arbitrary order: sort those rows by
            # index, then stably by value.
            tied = (values[:, 1:] == values[:, :-1]).any(dim=1).nonzero().squeeze(1)
            if len(tied):
                v, i = values[tied], idx[tied]
                by_index = i.argsort(dim=1)
                v, i = v.gather(1, by_index), i.gather(1, by_index)
                by_value = v.argsort(dim=1, stable=True)
                values[tied], idx[tied] = v.gather(1, by_value), i.gather(1, by_value)
            dists.append((values + q.pow(2).sum(dim=1, keepdim=True)).clamp_min(0.0).sqrt())
            indices.append(idx)
    if not indices:
        return np.zeros((0, n), dtype=np.float64), np.zeros((0, n), dtype=np.int64)
    return torch.cat(dists).numpy(), torch.cat(indices).numpy()


def knn_vote(neighbor_labels: Any) -> np.ndarray:
    """Majority label of each row of ``neighbor_labels`` ``(Q, k)``, ordered nearest first.

    A tie in the count goes to the tied class whose nearest member comes first in the row,
    i.e. is closest to the query. Returns ``(Q,)`` labels.
    """
    labels = _numpy(neighbor_labels)
    n_queries, k = labels.shape
    if n_queries == 0:
        return labels.reshape(0)
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(n_queries, k)
    n_classes = len(classes)
    flat = (np.arange(n_queries)[:, None] * n_classes + codes).ravel()
    counts = np.bincount(flat, minlength=n_queries * n_classes).reshape(n_queries, n_classes)
    first_rank = np.full(n_queries * n_classes, k, dtype=np.int64)
    np.minimum.at(first_rank, flat, np.tile(np.arange(k), n_queries))
    first_rank = first_rank.reshape(n_queries, n_classes)
    # Count dominates; among equal counts the smaller first rank wins (ranks are < k + 1).
    score = counts * (k + 1) + (k - first_rank)
    return classes[score.argmax(axis=1)]


def knn_predict(ref_embeddings: Any, ref_labels: Any, query_embeddings: Any, k: int = 7) -> np.ndarray:
    """K-NN vote prediction ``(Q,)`` for each query; ``k`` larger than ``R`` uses all references."""
    _, idx = nearest_neighbors(ref_embeddings, query_embeddings, k)
    return knn_vote(_labels(ref_labels)[idx])


def cmc_curve(neighbor_labels: Any, query_labels: Any, max_rank: int = 10) -> list[float]:
    """Cumulative match characteristic: ``cmc[r-1]`` = fraction of queries with their label
    among their ``r`` nearest references, for ``r = 1..max_rank``.

    neighbor_labels ``(Q, n)`` nearest first, query_labels ``(Q,)``. Ranks beyond ``n`` (a
    reference set smaller than ``max_rank``) repeat the value at ``n``.
    """
    neighbor_labels, query_labels = _numpy(neighbor_labels), _labels(query_labels)
    hits = neighbor_labels[:, :max_rank] == query_labels[:, None]
    curve = np.logical_or.accumulate(hits, axis=1).mean(axis=0) if len(query_labels) else np.full(hits.shape[1], np.nan)
    curve = list(map(float, curve))
    return curve + curve[-1:] * (max_rank - len(curve))


def per_class_recall(y_true: Any, y_pred: Any) -> dict[Any, float]:
    """Recall of each class present in ``y_true``: ``{label: #(pred == y == label) / #(y == label)}``."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    classes, class_of = np.unique(y_true, return_inverse=True)
    hits = np.bincount(class_of, weights=y_pred == y_true, minlength=len(classes))
    recalls = hits / np.bincount(class_of, minlength=len(classes))
    return {_key(c): float(r) for c, r in zip(classes, recalls)}


def recall_micro(y_true: Any, y_pred: Any) -> float:
    """Recall_mu: fraction of all queries predicted correctly."""
    y_true, y_pred = _labels(y_true), _labels(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def _mean_recall(recalls: dict[Any, float], classes: Iterable[Any] | None = None) -> float:
    if classes is not None:
        recalls = {c: recalls[c] for c in set(map(_key, classes)) if c in recalls}
    return float(np.mean(list(recalls.values()))) if recalls else float("nan")


def recall_macro(y_true: Any, y_pred: Any) -> float:
    """Recall_M: unweighted mean of the per-class recalls over the classes present in ``y_true``."""
    return _mean_recall(per_class_recall(y_true, y_pred))


def recall_macro_rare(y_true: Any, y_pred: Any, rare_classes: Iterable[Any]) -> float:
    """Recall_M*: Recall_M restricted to the rare classes present in ``y_true``; NaN if none is."""
    return _mean_recall(per_class_recall(y_true, y_pred), rare_classes)


def knn_scores(
    ref_embeddings: Any,
    ref_labels: Any,
    query_embeddings: Any,
    query_labels: Any,
    k: int = 7,
    rare_classes: Iterable[Any] = (),
    *,
    query_logits: Any = None,
) -> dict[str, Any]:
    """All K-NN metrics of ``query_*`` against ``ref_*`` (the paper: test vs train+val, K=7).

    ref_embeddings ``(R, D)``, ref_labels ``(R,)``, query_embeddings ``(Q, D)``, query_labels
    ``(Q,)``; query_logits ``(Q, C)`` whose column ``j`` scores label ``j`` (optional).
    Returns floats ``recall_micro``, ``recall_macro``, ``recall_macro_rare`` (NaN when no rare
    class is among the queries), ``rank5``, ``acc_clf`` (only with ``query_logits``), the
    ``k`` actually used (``min(k, R)``), ``per_class_recall`` ``{label: recall}``,
    ``predictions`` ``(Q,)`` and ``cmc`` (ranks 1..10, a list).
    """
    ref_labels, query_labels = _labels(ref_labels), _labels(query_labels)
    if len(query_labels) == 0:
        raise ValueError("knn_scores needs at least one query embedding")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(ref_labels) != len(ref_embeddings) or len(query_labels) != len(query_embeddings):
        raise ValueError("each embedding array needs exactly one label per row")
    k_used = min(k, len(ref_labels))
    _, idx = nearest_neighbors(ref_embeddings, query_embeddings, max(k, 10))
    neighbor_labels = ref_labels[idx]
    predictions = knn_vote(neighbor_labels[:, :k_used])
    cmc = cmc_curve(neighbor_labels, query_labels, max_rank=10)
    recalls = per_class_recall(query_labels, predictions)
    scores: dict[str, Any] = {
        "recall_micro": recall_micro(query_labels, predictions),
        "recall_macro": _mean_recall(recalls),
        "recall_macro_rare": _mean_recall(recalls, rare_classes),
        "rank5": cmc[4],
        "k": k_used,
        "per_class_recall": recalls,
        "predictions": predictions,
        "cmc": cmc,
    }
    if query_logits is not None:
        logits = _numpy(query_logits)
        if logits.shape[0] != len(query_labels):
            raise ValueError(f"query_logits has {logits.shape[0]} rows for {len(query_labels)} queries")
        scores["acc_clf"] = float(np.mean(logits.argmax(axis=1) == query_labels))
    return scores
