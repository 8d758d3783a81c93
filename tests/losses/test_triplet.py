"""Batch-Hard / Batch-All triplet losses against naive per-anchor / per-triplet loops."""

from __future__ import annotations

import math

import pytest
import torch

from raytumor.losses import batch_all_triplet_loss, batch_hard_triplet_loss, pairwise_distances


def naive_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(((a - b) ** 2).sum()) if not torch.equal(a, b) else (a - b).sum() * 0.0


def naive_batch_hard(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    losses = []
    n = len(labels)
    for a in range(n):
        pos = [naive_distance(emb[a], emb[p]) for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [naive_distance(emb[a], emb[k]) for k in range(n) if labels[k] != labels[a]]
        if pos and neg:
            losses.append(torch.clamp(max(pos) - min(neg) + margin, min=0.0))
    return torch.stack(losses).mean() if losses else torch.tensor(0.0, dtype=emb.dtype)


def naive_batch_all(emb: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    active = []
    n = len(labels)
    for a in range(n):
        for p in range(n):
            if p == a or labels[p] != labels[a]:
                continue
            for k in range(n):
                if labels[k] == labels[a]:
                    continue
                loss = naive_distance(emb[a], emb[p]) - naive_distance(emb[a], emb[k]) + margin
                if loss > 0:
                    active.append(loss)
    return torch.stack(active).mean() if active else torch.tensor(0.0, dtype=emb.dtype)


def random_batch(seed: int, ties: bool, n: int = 12, dim: int = 4):
    gen = torch.Generator().manual_seed(seed)
    if ties:
        # Integer grid in 2-D: coincident points and equal distances are common.
        emb = torch.randint(0, 3, (n, 2), generator=gen).double()
    else:
        emb = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return emb, labels


LOSSES = [(batch_hard_triplet_loss, naive_batch_hard), (batch_all_triplet_loss, naive_batch_all)]


def test_pairwise_distances_match_naive():
    emb, _ = random_batch(0, ties=False)
    expected = torch.stack([torch.stack([naive_distance(a, b) for b in emb]) for a in emb])
    torch.testing.assert_close(pairwise_distances(emb), expected)
    emb, _ = random_batch(1, ties=True)
    dist = pairwise_distances(emb)
    expected = torch.stack([torch.stack([naive_distance(a, b) for b in emb]) for a in emb])
    torch.testing.assert_close(dist, expected)
    assert torch.all(dist.diagonal() == 0)


@pytest.mark.parametrize("loss_fn, naive_fn", LOSSES)
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_matches_naive_loop(loss_fn, naive_fn, seed, ties, margin):
    emb, labels = random_batch(seed, ties)
    torch.testing.assert_close(loss_fn(emb, labels, margin), naive_fn(emb, labels, margin))


@pytest.mark.parametrize("loss_fn, naive_fn", LOSSES)
@pytest.mark.parametrize("seed", range(3))
def test_gradient_matches_naive_loop(loss_fn, naive_fn, seed):
    # Continuous data has no ties in max/min, so both pick the same triplets.
    emb, labels = random_batch(seed, ties=False)
    a = emb.clone().requires_grad_()
    b = emb.clone().requires_grad_()
    loss_fn(a, labels, 1.0).backward()
    naive_fn(b, labels, 1.0).backward()
    torch.testing.assert_close(a.grad, b.grad)


# Rectangle A=(0,0) B=(3,0) | C=(0,4) D=(3,4): each anchor has its positive at 3 and
# negatives at 4 and 5.
SQUARE = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]])
SQUARE_LABELS = torch.tensor([0, 0, 1, 1])


def test_batch_hard_by_hand():
    assert batch_hard_triplet_loss(SQUARE, SQUARE_LABELS, 1.0).item() == pytest.approx(0.0)
    # 3 - 4 + 2 = 1 for every anchor.
    assert batch_hard_triplet_loss(SQUARE, SQUARE_LABELS, 2.0).item() == pytest.approx(1.0)
    assert batch_hard_triplet_loss(SQUARE, SQUARE_LABELS, 2.5).item() == pytest.approx(1.5)


def test_batch_all_by_hand_averages_only_active_triplets():
    # margin 2: per anchor 3-4+2 = 1 and 3-5+2 = 0 -> mean over the 4 positive ones is 1
    # (the mean over all 8 valid triplets would be 0.5).
    assert batch_all_triplet_loss(SQUARE, SQUARE_LABELS, 2.0).item() == pytest.approx(1.0)
    # margin 3: per anchor 2 and 1 -> 12 / 8.
    assert batch_all_triplet_loss(SQUARE, SQUARE_LABELS, 3.0).item() == pytest.approx(1.5)
    assert batch_all_triplet_loss(SQUARE, SQUARE_LABELS, 1.0).item() == pytest.approx(0.0)


def test_batch_hard_skips_anchors_without_positive():
    # Only A and B have a positive; C=(0,4) and X=(10,0) are singletons. A: pos 3, nearest neg C at 4.
    emb = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 2])
    # A: 3 - 4 + 2 = 1; B: 3 - min(5, 7) + 2 = 0 -> mean over 2 anchors = 0.5.
    assert batch_hard_triplet_loss(emb, labels, 2.0).item() == pytest.approx(0.5)


@pytest.mark.parametrize("loss_fn", [batch_hard_triplet_loss, batch_all_triplet_loss])
@pytest.mark.parametrize("labels", [torch.arange(6), torch.zeros(6, dtype=torch.long)], ids=["distinct", "one_class"])
def test_no_triplets_gives_connected_zero(loss_fn, labels):
    emb = torch.randn(6, 3, requires_grad=True)
    loss = loss_fn(emb, labels, 1.0)
    assert loss.shape == () and loss.item() == 0.0
    assert loss.grad_fn is not None
    loss.backward()
    assert torch.all(emb.grad == 0)


@pytest.mark.parametrize("loss_fn", [batch_hard_triplet_loss, batch_all_triplet_loss])
def test_coincident_embeddings_give_finite_gradients(loss_fn):
    emb = torch.randn(8, 5)
    emb[1] = emb[0]  # same class
    emb[4] = emb[0]  # other class
    emb = emb.requires_grad_()
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    loss = loss_fn(emb, labels, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()

    collapsed = torch.zeros(6, 4, requires_grad=True)  # every distance is 0
    loss = loss_fn(collapsed, torch.tensor([0, 0, 0, 1, 1, 1]), 0.5)
    loss.backward()
    assert loss.item() == pytest.approx(0.5)
    assert torch.isfinite(collapsed.grad).all()


def test_float32_close_to_float64():
    emb, labels = random_batch(3, ties=False)
    for loss_fn in (batch_hard_triplet_loss, batch_all_triplet_loss):
        got = loss_fn(emb.float(), labels, 1.0)
        assert got.dtype == torch.float32
        assert math.isclose(got.item(), loss_fn(emb, labels, 1.0).item(), rel_tol=1e-5)
