"""Backbone + head models, their builders, backbone weight transfer and size/cost estimates.

``ContrastiveModel`` (backbone + projection head) is pre-trained, then its backbone weights go into
an ``EmbeddingModel`` (backbone + embedding head) with :func:`load_backbone_weights`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from raytumor.models.heads import EmbeddingHead, ProjectionHead
from raytumor.models.registry import create_encoder

# Prefixes that wrappers put in front of a state_dict's keys (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_BACKBONE_PREFIX = "backbone."


class EmbeddingModel(nn.Module):
    """``backbone`` then ``head``: ``(B, C, X, Y, Z) -> (B, embedding_dim)``.

    ``forward`` returns unit-norm embeddings (triplet models, ``head.normalize``) or logits
    (cross-entropy models). :attr:`outputs_logits` tells which; :meth:`predict_proba` gives class
    probabilities of a logits model and :meth:`embed` the vectors the paper feeds to KNN.
    """

    def __init__(self, backbone: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def outputs_logits(self) -> bool:
        """True for cross-entropy models: ``forward`` returns unnormalised logits."""
        return not self.head.normalize

    @property
    def embedding_dim(self) -> int:
        return self.head.embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, X, Y, Z)`` -> ``(B, embedding_dim)`` unit-norm embeddings or logits."""
        return self.head(self.backbone(x))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``(B, num_classes)`` (float32) of a cross-entropy model."""
        if not self.outputs_logits:
            raise ValueError("predict_proba needs a cross-entropy model (normalize=False); this one outputs embeddings")
        return F.softmax(self(x).float(), dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors for KNN evaluation ``(B, embedding_dim)`` (float32): the unit embedding of a triplet
        model, the softmax output of a cross-entropy model (paper section 4.2)."""
        out = self(x).float()
        return F.softmax(out, dim=1) if self.outputs_logits else out


class ContrastiveModel(nn.Module):
    """Pre-training model: ``backbone`` then ``projection_head``: ``(B, C, X, Y, Z) -> (B, out_dim)``.

    Its ``backbone.state_dict()`` loads into an :class:`EmbeddingModel` built with the same
    encoder name, ``in_channels`` and ``width`` (see :func:`load_backbone_weights`).
    """

    def __init__(self, backbone: nn.Module, projection_head: ProjectionHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = projection_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, X, Y, Z)`` -> projections ``(B, out_dim)``."""
        return self.projection_head(self.backbone(x))


def build_model(
    encoder_name: str,
    *,
    in_channels: int = 2,
    embedding_dim: int = 6,
    normalize: bool = True,
    width: float = 1.0,
    hidden_dim: int = 128,
    dropout: float = 0.0,
    **kwargs,
) -> EmbeddingModel:
    """Encoder ``encoder_name`` + :class:`EmbeddingHead` (``feature_dim -> hidden_dim -> embedding_dim``).

    ``normalize=True``: triplet model with unit-norm output; ``False``: cross-entropy model whose
    output is logits (``embedding_dim`` = number of classes). ``kwargs`` go to the encoder factory.
    """
    backbone = create_encoder(encoder_name, in_channels=in_channels, width=width, **kwargs)
    head = EmbeddingHead(
        backbone.feature_dim, embedding_dim, hidden_dim=hidden_dim, normalize=normalize, dropout=dropout
    )
    return EmbeddingModel(backbone, head)


def build_contrastive_model(
    encoder_name: str,
    *,
    in_channels: int = 2,
    width: float = 1.0,
    projection_dim: int = 128,
    projection_hidden_dim: int | None = None,
    normalize: bool = True,
    **kwargs,
) -> ContrastiveModel:
    """Encoder ``encoder_name`` + SimCLR :class:`ProjectionHead`, for contrastive pre-training."""
    backbone = create_encoder(encoder_name, in_channels=in_channels, width=width, **kwargs)
    head = ProjectionHead(
        backbone.feature_dim, projection_dim, hidden_dim=projection_hidden_dim, normalize=normalize
    )
    return ContrastiveModel(backbone, head)


def _strip_prefix(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _listing(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_backbone_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load backbone weights into ``model.backbone`` and leave its head untouched; returns ``model``.

    ``state_dict`` is a whole model's (keys ``backbone.*``; other keys such as
    ``projection_head.*`` are ignored) or a backbone's own; ``module.``/``_orig_mod.`` prefixes from
    DDP or ``torch.compile`` are stripped. Raises ``ValueError`` naming missing and unexpected keys
    and shape mismatches (e.g. a different encoder, ``width`` or ``in_channels``).
    """
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise TypeError(f"{type(model).__name__} has no backbone module")
    state = {_strip_prefix(key): value for key, value in state_dict.items()}
    if any(key.startswith(_BACKBONE_PREFIX) for key in state):
        state = {key[len(_BACKBONE_PREFIX):]: value for key, value in state.items() if key.startswith(_BACKBONE_PREFIX)}
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{key} {tuple(state[key].shape)} vs {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches (checkpoint vs model): {_listing(mismatched)}")
        raise ValueError(
            "backbone weights do not fit this model (same encoder, width and in_channels?): " + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=True)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def flops_per_sample(model: nn.Module, input_shape: Sequence[int], *, include_backward: bool = False) -> int:
    """FLOPs (2 per multiply-add, as counted by ``torch.utils.flop_counter``) for one sample.

    ``input_shape`` is one sample's ``(C, X, Y, Z)``. Counts a forward pass (in eval mode), plus the
    backward pass to the parameters when ``include_backward``; the model's mode is restored and
    no ``.grad`` is written. Runs on the model's device.
    """
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.zeros((1, *input_shape), device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            if include_backward:
                params = [p for p in model.parameters() if p.requires_grad]
                torch.autograd.grad(model(x).float().sum(), params, allow_unused=True)
            else:
                with torch.no_grad():
                    model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
