"""Evaluation of learnt embeddings: K-nearest-neighbour metrics (Recall_mu, Recall_M, Recall_M*, Rank-5)."""

from raytumor.evaluate.metrics import (
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

__all__ = [
    "knn_scores",
    "knn_predict",
    "knn_vote",
    "nearest_neighbors",
    "cmc_curve",
    "per_class_recall",
    "recall_micro",
    "recall_macro",
    "recall_macro_rare",
]
