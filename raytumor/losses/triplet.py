"""Batch-Hard and Batch-All triplet losses (Hermans, Beyer & Leibe 2017, paper eqs. 1-2).

The paper prints eqs. 1-2 as plain sums without the hinge ``max(0, .)`` or an average; it
says it uses the losses "as implemented by [12]", so we follow Hermans et al.: hinged,
Batch-Hard averaged over anchors, Batch-All averaged over the triplets that are still active.
Pure torch over a full pairwise Euclidean distance matrix. Shapes: ``embeddings`` is
``(N, D)``, ``labels`` is ``(N,)`` integer; every loss returns a scalar tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["pairwise_distances", "batch_hard_triplet_loss", "batch_all_triplet_loss"]

# Squared distances at or below this are treated as exactly 0. The Gram-matrix form
# |a|^2 + |b|^2 - 2 a.b leaves rounding noise where a == b, and d/dx sqrt(x) is infinite at 0.
_SQ_EPS = 1e-12


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """Euclidean (not squared) distance matrix with finite gradients everywhere.

    ``d[i, j] = ||e_i - e_j||_2``; ``(N, D) -> (N, N)``. Where ``||e_i - e_j||^2 <= 1e-12``
    (coincident embeddings, the diagonal) the distance is exactly 0 and its gradient is 0,
    instead of the NaN that ``sqrt`` gives at 0.
    """
    sq_norms = embeddings.pow(2).sum(dim=1)
    sq = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * embeddings @ embeddings.T).clamp_min(0.0)
    is_zero = sq <= _SQ_EPS
    # sqrt only sees values > eps, so its backward never divides by 0.
    return torch.where(is_zero, torch.zeros_like(sq), sq.clamp_min(_SQ_EPS).sqrt())


def _masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """``(N,) -> (N, N), (N, N)``: positives (same label, other index) and negatives."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Batch-Hard triplet loss, averaged over the anchors that form a triplet.

    ``L = mean_a max(0, max_p d(a, p) - min_n d(a, n) + margin)`` over anchors ``a`` with at
    least one positive (``y_p == y_a``, ``p != a``) and one negative (``y_n != y_a``).
    Returns a zero that is still connected to ``embeddings`` when there is no such anchor.

    embeddings: ``(N, D)``; labels: ``(N,)`` int; returns a scalar.
    """
    dist = pairwise_distances(embeddings)
    pos, neg = _masks(labels)
    valid = pos.any(dim=1) & neg.any(dim=1)
    # Anchors without a positive or a negative get -inf here and are zeroed by the where.
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(dim=1)
    per_anchor = torch.where(valid, torch.relu(hardest_pos - hardest_neg + margin), 0.0)
    return per_anchor.sum() / valid.sum().clamp_min(1)


def batch_all_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Batch-All triplet loss averaged over the triplets with a positive loss ("BA != 0").

    ``l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)`` for every triplet with ``a != p``,
    ``y_p == y_a``, ``y_n != y_a``; ``L = sum l / #{l > 0}``, and 0 (connected to
    ``embeddings``) when no triplet has a positive loss. Memory is ``O(N^3)``, fine for the
    paper's batches of 30.

    embeddings: ``(N, D)``; labels: ``(N,)`` int; returns a scalar.
    """
    dist = pairwise_distances(embeddings)
    pos, neg = _masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]  # (a, p, n)
    losses = torch.relu(dist[:, :, None] - dist[:, None, :] + margin) * valid
    # No branch on the count, so no host sync; the sum is 0 when nothing is active.
    return losses.sum() / (losses > 0).sum().clamp_min(1)
