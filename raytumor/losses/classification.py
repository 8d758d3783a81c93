"""Classification-layer baselines: cross-entropy and the G-ResNet interval loss.

Shapes: ``logits`` is ``(N, C)`` raw class scores (before softmax), ``labels`` is ``(N,)``
integer in ``[0, C)``; every loss returns a scalar tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy_loss", "interval_loss"]


def cross_entropy_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy ``-log softmax(logits)[i, y_i]`` over the batch.

    logits: ``(N, C)``; labels: ``(N,)`` int; returns a scalar.
    """
    return F.cross_entropy(logits, labels)


def interval_loss(logits: Tensor, labels: Tensor, margin: float = 0.2, weight: float = 1.0) -> Tensor:
    """Cross-entropy plus a hinge on the softmax probabilities (G-ResNet baseline, paper ref. 15).

    G-ResNet (Liu, Liu & Dong 2019) trains with "the sum of the interval loss and the
    cross-entropy loss", which "increases the penalty for misclassification"; its exact
    formula is not in our text, so we use, with ``p = softmax(logits)``::

        L = CE(logits, y) + weight * mean_i sum_{j != y_i} max(0, p_ij - p_iy_i + margin)

    A sample pays the extra term whenever a wrong class comes within ``margin`` of the true
    class's probability, and ``L == CE`` once ``p_iy >= p_ij + margin`` for every wrong ``j``.
    The hinge is on probabilities, not logits, because the paper's cross-entropy model
    applies softmax to its output layer (so probabilities are its class scores) and because a
    probability margin has a fixed scale: a logit margin is met for free by scaling the
    logits up, which cross-entropy already rewards. ``weight=1`` is G-ResNet's plain sum.

    logits: ``(N, C)``; labels: ``(N,)`` int; returns a scalar.
    """
    probs = logits.softmax(dim=1)
    true_prob = probs.gather(1, labels[:, None])
    hinge = torch.relu(probs - true_prob + margin)
    wrong = torch.ones_like(hinge, dtype=torch.bool).scatter_(1, labels[:, None], False)
    penalty = (hinge * wrong).sum(dim=1).mean()
    return F.cross_entropy(logits, labels) + weight * penalty
