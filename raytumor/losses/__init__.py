"""Losses as pure torch functions, and a registry to pick one by name.

``LOSSES`` maps a config name to its function. Supervised losses take
``(embeddings_or_logits, labels, ...)``; ``ntxent`` takes two views ``(z1, z2, ...)``.
For pre-training, ``get_contrastive_loss`` returns a ``(z1, z2) -> scalar`` callable for
``ntxent``, ``batch_hard`` or ``batch_all`` (the triplet ones with each volume as its class).
"""

from __future__ import annotations

import functools
from typing import Callable

from torch import Tensor

from raytumor.losses.classification import cross_entropy_loss, interval_loss
from raytumor.losses.contrastive import contrastive_triplet_loss, nt_xent_loss
from raytumor.losses.triplet import batch_all_triplet_loss, batch_hard_triplet_loss, pairwise_distances

__all__ = [
    "LOSSES",
    "CONTRASTIVE_LOSSES",
    "get_loss",
    "get_contrastive_loss",
    "pairwise_distances",
    "batch_hard_triplet_loss",
    "batch_all_triplet_loss",
    "nt_xent_loss",
    "contrastive_triplet_loss",
    "cross_entropy_loss",
    "interval_loss",
]

LOSSES: dict[str, Callable[..., Tensor]] = {
    "batch_hard": batch_hard_triplet_loss,
    "batch_all": batch_all_triplet_loss,
    "ntxent": nt_xent_loss,
    "cross_entropy": cross_entropy_loss,
    "interval": interval_loss,
}

CONTRASTIVE_LOSSES: dict[str, Callable[..., Tensor]] = {
    "ntxent": nt_xent_loss,
    "batch_hard": functools.partial(contrastive_triplet_loss, variant="batch_hard"),
    "batch_all": functools.partial(contrastive_triplet_loss, variant="batch_all"),
}


def _lookup(table: dict[str, Callable[..., Tensor]], name: str, kind: str, kwargs: dict) -> Callable[..., Tensor]:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(sorted(table))}")
    fn = table[name]
    return functools.partial(fn, **kwargs) if kwargs else fn


def get_loss(name: str, **kwargs) -> Callable[..., Tensor]:
    """The loss registered as ``name``, with ``kwargs`` (e.g. ``margin=1.0``) bound if given."""
    return _lookup(LOSSES, name, "loss", kwargs)


def get_contrastive_loss(name: str, **kwargs) -> Callable[..., Tensor]:
    """A ``(z1, z2) -> scalar`` pre-training loss by name, with ``kwargs`` bound if given."""
    return _lookup(CONTRASTIVE_LOSSES, name, "contrastive loss", kwargs)
