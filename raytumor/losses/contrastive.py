"""Self-supervised contrastive losses over two augmented views of the same N volumes.

NT-Xent is SimCLR's loss (Chen et al. 2020, paper ref. 7). The triplet variants are the
supervised triplet losses applied with each volume as its own class, as
pytorch-metric-learning's ``SelfSupervisedLoss`` does, so one triplet implementation serves
pre-training and training. Shapes: ``z1``, ``z2`` are ``(N, D)``, row ``i`` of each is a view
of volume ``i``; every loss returns a scalar tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from raytumor.losses.triplet import batch_all_triplet_loss, batch_hard_triplet_loss

__all__ = ["nt_xent_loss", "contrastive_triplet_loss", "TRIPLET_VARIANTS"]

TRIPLET_VARIANTS = {"batch_hard": batch_hard_triplet_loss, "batch_all": batch_all_triplet_loss}


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy), averaged over the 2N views.

    With ``z = cat(z1, z2)`` L2-normalised and ``s_ik = z_i . z_k / temperature``, view ``i``'s
    positive ``p(i)`` is the other view of the same volume and
    ``l_i = -s_ip(i) + log sum_{k != i} exp(s_ik)``; ``L = mean_i l_i`` over ``i < 2N``.

    z1, z2: ``(N, D)``; returns a scalar.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    partner = torch.arange(2 * n, device=z.device).roll(n)  # i <-> i + N
    positives = sim.gather(1, partner[:, None]).squeeze(1)
    return (torch.logsumexp(sim, dim=1) - positives).mean()


def contrastive_triplet_loss(z1: Tensor, z2: Tensor, margin: float, variant: str = "batch_hard") -> Tensor:
    """Triplet loss over two views: ``variant(cat(z1, z2), cat(arange(N), arange(N)), margin)``.

    Each volume is its own class, so its two views are the only positive pair and every
    other view is a negative. ``variant`` is ``"batch_hard"`` or ``"batch_all"``.

    z1, z2: ``(N, D)``; returns a scalar.
    """
    if variant not in TRIPLET_VARIANTS:
        raise ValueError(f"unknown triplet variant {variant!r}; allowed: {', '.join(TRIPLET_VARIANTS)}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    labels = torch.arange(z1.shape[0], device=z1.device).repeat(2)
    return TRIPLET_VARIANTS[variant](torch.cat([z1, z2]), labels, margin)
