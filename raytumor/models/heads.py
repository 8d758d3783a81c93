"""Heads on top of a backbone's feature vector: the paper's embedding head and a SimCLR projection head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Paper section 4.2: ``Linear(in_features, 128) -> ReLU -> Linear(128, embedding_dim)``.

    ``(B, in_features) -> (B, embedding_dim)``. With ``normalize=True`` (triplet models, L = 6) the
    rows are L2-normalised, computed in float32 so they stay unit-norm under bf16 autocast. With
    ``normalize=False`` (cross-entropy models, L = number of classes) the output is *logits*:
    softmax belongs to the loss and to evaluation, not to ``forward``.
    """

    def __init__(
        self, in_features: int, embedding_dim: int, *, hidden_dim: int = 128, normalize: bool = True, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, embedding_dim)
        self.normalize = normalize
        self.embedding_dim = embedding_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: ``(B, in_features)`` -> ``(B, embedding_dim)`` unit rows or logits."""
        out = self.fc2(self.dropout(self.act(self.fc1(features))))
        return F.normalize(out.float(), dim=1) if self.normalize else out


class ProjectionHead(nn.Module):
    """SimCLR projection MLP for contrastive pre-training, dropped afterwards.

    ``Linear(in_features, hidden_dim) -> ReLU -> Linear(hidden_dim, out_dim)``:
    ``(B, in_features) -> (B, out_dim)``. ``hidden_dim`` defaults to ``in_features`` (SimCLR).
    ``normalize=True`` returns unit rows (float32), so triplet pre-training sees the same geometry
    as triplet training; NT-Xent is unaffected, as it uses cosine similarity.
    """

    def __init__(
        self, in_features: int, out_dim: int = 128, *, hidden_dim: int | None = None, normalize: bool = True
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or in_features
        self.fc1 = nn.Linear(in_features, hidden_dim)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.normalize = normalize
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``features``: ``(B, in_features)`` -> projections ``(B, out_dim)``."""
        out = self.fc2(self.act(self.fc1(features)))
        return F.normalize(out.float(), dim=1) if self.normalize else out
