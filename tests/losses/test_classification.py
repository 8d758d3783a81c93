"""Cross-entropy, interval loss and the loss registry."""

from __future__ import annotations

import math

import pytest
import torch

from raytumor.losses import (
    CONTRASTIVE_LOSSES,
    LOSSES,
    batch_hard_triplet_loss,
    cross_entropy_loss,
    get_contrastive_loss,
    get_loss,
    interval_loss,
    nt_xent_loss,
)


def naive_interval(logits: torch.Tensor, labels: torch.Tensor, margin: float, weight: float) -> float:
    total = 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        exps = [math.exp(v) for v in row]
        probs = [e / sum(exps) for e in exps]
        ce = -math.log(probs[y])
        hinge = sum(max(0.0, probs[j] - probs[y] + margin) for j in range(len(row)) if j != y)
        total += ce + weight * hinge
    return total / len(labels)


def random_logits(seed: int, n: int = 8, classes: int = 5):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, classes, generator=gen, dtype=torch.float64) * 3, torch.randint(0, classes, (n,), generator=gen)


@pytest.mark.parametrize("seed", range(4))
def test_cross_entropy_matches_log_softmax(seed):
    logits, labels = random_logits(seed)
    expected = -logits.log_softmax(1)[torch.arange(len(labels)), labels].mean()
    torch.testing.assert_close(cross_entropy_loss(logits, labels), expected)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("margin, weight", [(0.2, 1.0), (0.5, 0.3), (0.0, 2.0)])
def test_interval_matches_naive_and_bounds_cross_entropy(seed, margin, weight):
    logits, labels = random_logits(seed)
    got = interval_loss(logits, labels, margin=margin, weight=weight)
    assert got.item() == pytest.approx(naive_interval(logits, labels, margin, weight), rel=1e-10)
    assert got.item() >= cross_entropy_loss(logits, labels).item()


def test_interval_by_hand():
    # Uniform probabilities: every wrong class violates by exactly the margin.
    logits, labels = torch.zeros(1, 3), torch.tensor([0])
    assert interval_loss(logits, labels, margin=0.2).item() == pytest.approx(math.log(3) + 0.4)
    assert interval_loss(logits, labels, margin=0.2, weight=0.5).item() == pytest.approx(math.log(3) + 0.2)


def test_interval_equals_cross_entropy_when_margins_hold():
    logits = torch.tensor([[6.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    labels = torch.tensor([0, 2])
    assert interval_loss(logits, labels, margin=0.5) == cross_entropy_loss(logits, labels)
    logits, labels = random_logits(0)
    torch.testing.assert_close(interval_loss(logits, labels, weight=0.0), cross_entropy_loss(logits, labels))


def test_interval_gradient_finite():
    logits, labels = random_logits(1)
    logits.requires_grad_()
    interval_loss(logits, labels).backward()
    assert torch.isfinite(logits.grad).all()


def test_registry_names_and_binding():
    assert set(LOSSES) == {"batch_hard", "batch_all", "ntxent", "cross_entropy", "interval"}
    assert set(CONTRASTIVE_LOSSES) == {"ntxent", "batch_hard", "batch_all"}
    assert get_loss("batch_hard") is batch_hard_triplet_loss
    emb, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
    assert get_loss("batch_hard", margin=0.3)(emb, labels) == batch_hard_triplet_loss(emb, labels, 0.3)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    assert get_contrastive_loss("ntxent", temperature=0.1)(z1, z2) == nt_xent_loss(z1, z2, 0.1)
    two_views = get_contrastive_loss("batch_all", margin=1.0)(z1, z2)
    assert two_views == get_loss("batch_all")(torch.cat([z1, z2]), torch.arange(4).repeat(2), 1.0)


@pytest.mark.parametrize("getter", [get_loss, get_contrastive_loss])
def test_unknown_name_lists_allowed(getter):
    with pytest.raises(ValueError, match=r"unknown .*'triplet'.*allowed: .*batch_all, batch_hard"):
        getter("triplet")
