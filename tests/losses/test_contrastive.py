"""NT-Xent and the two-view triplet losses against direct loop computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raytumor.losses import (
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    contrastive_triplet_loss,
    nt_xent_loss,
)
from tests.losses.test_triplet import naive_batch_all, naive_batch_hard


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    z = torch.cat([z1, z2])
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        numerator = math.exp(cosine(z[i], z[partner]) / temperature)
        denominator = sum(math.exp(cosine(z[i], z[k]) / temperature) for k in range(n2) if k != i)
        total += -math.log(numerator / denominator)
    return total / n2


def cross_entropy_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per view: logits [positive, negatives...], target 0 (the lightly / SimCLR code layout)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    rows = []
    for i in range(n2):
        partner = (i + n2 // 2) % n2
        negatives = [k for k in range(n2) if k not in (i, partner)]
        rows.append(torch.cat([z[i] @ z[[partner]].T, z[i] @ z[negatives].T]) / temperature)
    return F.cross_entropy(torch.stack(rows), torch.zeros(n2, dtype=torch.long))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_and_cross_entropy(seed, temperature):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    z2 = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    got = nt_xent_loss(z1, z2, temperature)
    assert got.item() == pytest.approx(naive_nt_xent(z1, z2, temperature), rel=1e-10)
    torch.testing.assert_close(got, cross_entropy_nt_xent(z1, z2, temperature))


def test_nt_xent_by_hand():
    # One volume: its only other view is the positive, so the loss is -log(1) = 0.
    assert nt_xent_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.0)
    # Two orthogonal volumes, identical views: each view sees its positive at cos 1 and two
    # negatives at cos 0 -> -2 + log(e^2 + 2) at temperature 0.5.
    z = torch.eye(2)
    assert nt_xent_loss(z, z.clone(), 0.5).item() == pytest.approx(-2 + math.log(math.exp(2) + 2), rel=1e-6)


def test_nt_xent_is_scale_invariant_and_default_temperature():
    z1, z2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(nt_xent_loss(3.0 * z1, z2), nt_xent_loss(z1, z2, 0.5))


def test_nt_xent_finite_gradients_when_views_coincide():
    z1 = torch.randn(4, 3)
    z1[1] = z1[0]
    z1 = z1.requires_grad_()
    z2 = z1.detach().clone().requires_grad_()
    loss = nt_xent_loss(z1, z2)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()


def test_nt_xent_rejects_mismatched_views():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.randn(3, 2), torch.randn(4, 2))


@pytest.mark.parametrize(
    "variant, supervised, naive",
    [("batch_hard", batch_hard_triplet_loss, naive_batch_hard), ("batch_all", batch_all_triplet_loss, naive_batch_all)],
)
@pytest.mark.parametrize("seed", range(3))
def test_contrastive_triplet_is_supervised_loss_with_volume_labels(variant, supervised, naive, seed):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn(5, 4, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    got = contrastive_triplet_loss(z1, z2, 1.0, variant=variant)
    torch.testing.assert_close(got, supervised(torch.cat([z1, z2]), labels, 1.0))
    torch.testing.assert_close(got, naive(torch.cat([z1, z2]), labels, 1.0))


def test_contrastive_batch_hard_by_hand():
    # Views: v0=(0,0) v2=(1,0) of volume 0; v1=(10,0) v3=(10,2) of volume 1.
    # Hardest positive / nearest negative: v0 1/10, v1 2/9, v2 1/9, v3 2/sqrt(85).
    z1 = torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    z2 = torch.tensor([[1.0, 0.0], [10.0, 2.0]], dtype=torch.float64)
    expected = (0.5 + 2.5 + 1.5 + (2 - math.sqrt(85) + 9.5)) / 4
    assert contrastive_triplet_loss(z1, z2, 9.5).item() == pytest.approx(expected)
    assert contrastive_triplet_loss(z1, z2, 1.0).item() == 0.0


def test_contrastive_triplet_unknown_variant():
    with pytest.raises(ValueError, match="batch_all"):
        contrastive_triplet_loss(torch.randn(2, 2), torch.randn(2, 2), 1.0, variant="hardest")
