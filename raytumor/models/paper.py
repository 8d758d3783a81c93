"""The paper's common 3-D CNN encoder (Liu & Feng, "Triplet Contrastive Learning for Brain Tumor
Classification", section 4.2: ~6.9M trainable parameters, then dense 128, then dense L).

The paper gives only the parameter count; this is a VGG-style stack chosen to match it:

    stage  convs  channels (width=1)  then
    1      2      32                  max-pool (2, 2, 1)   # keep the 12 thick slices at first
    2      2      64                  max-pool (2, 2, 2)
    3      2      128                 max-pool (2, 2, 2)
    4      2      256                 max-pool (2, 2, 2)
    5      1      480                 global average pool -> (B, 480)

Each conv is Conv3d(3x3x3, padding 1, no bias) -> norm -> ReLU. Pools use ``ceil_mode`` so an
axis of size 1 stays 1: the same network runs on ``2 x 128 x 128 x 12`` volumes, small test
volumes and depth-1 slices from 2-D datasets. The global pool makes the parameter count
independent of the input shape: 6,833,664 in the backbone, 6,896,006 with the paper's
128 -> 6 embedding head.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from raytumor.models.model import EmbeddingModel, build_model
from raytumor.models.registry import register_encoder

# The last stage has 480 (not 512) channels: that lands the model at the paper's ~6.9M parameters.
PAPER_CHANNELS = (32, 64, 128, 256, 480)
PAPER_CONVS_PER_STAGE = (2, 2, 2, 2, 1)
# Whether the pool after each stage (all but the last) halves Z; X and Y are always halved.
PAPER_POOL_Z = (False, True, True, True)
NORMS = ("batch", "group", "instance")


def scaled_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (tensor-core friendly), at least ``divisor``."""
    return max(divisor, int(round(channels * width / divisor)) * divisor)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """``batch`` (default; fine at batch 15-30), ``group`` (8 groups; batch-size independent) or ``instance``."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


class PaperCNN(nn.Module):
    """VGG-style 3-D CNN backbone: ``(B, C, X, Y, Z) -> (B, feature_dim)``.

    Args:
        in_channels: input channels (2 = image + tumour mask).
        width: channel multiplier; 1.0 is the paper-sized network (6.83M parameters),
            0.25 a fast one for tests and demos (0.43M).
        channels, convs_per_stage, pool_z: the stage layout (see module docstring).
        norm: ``batch``, ``group`` or ``instance``.
    """

    def __init__(
        self,
        in_channels: int = 2,
        width: float = 1.0,
        *,
        channels: Sequence[int] = PAPER_CHANNELS,
        convs_per_stage: Sequence[int] = PAPER_CONVS_PER_STAGE,
        pool_z: Sequence[bool] = PAPER_POOL_Z,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if not (len(channels) == len(convs_per_stage) == len(pool_z) + 1):
            raise ValueError("channels and convs_per_stage need one entry per stage, pool_z one fewer")
        layers: list[nn.Module] = []
        previous = in_channels
        for stage, (base, convs) in enumerate(zip(channels, convs_per_stage)):
            out = scaled_channels(base, width)
            for _ in range(convs):
                layers += [nn.Conv3d(previous, out, 3, padding=1, bias=False), norm_layer(norm, out), nn.ReLU(inplace=True)]
                previous = out
            if stage < len(pool_z):
                kernel = (2, 2, 2 if pool_z[stage] else 1)
                layers.append(nn.MaxPool3d(kernel, stride=kernel, ceil_mode=True))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.feature_dim: int = previous
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, X, Y, Z)`` (any X, Y, Z >= 1) -> features ``(B, feature_dim)``."""
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) volume batch, got shape {tuple(x.shape)}")
        return self.pool(self.features(x)).flatten(1)


@register_encoder("paper_cnn")
def paper_cnn(*, in_channels: int = 2, width: float = 1.0, **kwargs) -> PaperCNN:
    """The paper's encoder backbone; ``kwargs`` go to :class:`PaperCNN` (``norm``, stage layout)."""
    return PaperCNN(in_channels, width, **kwargs)


def paper_encoder(
    in_channels: int = 2,
    embedding_dim: int = 6,
    *,
    normalize: bool = True,
    width: float = 1.0,
    **kwargs,
) -> EmbeddingModel:
    """The paper's full model: backbone -> dense 128 -> ReLU -> dense ``embedding_dim``.

    ``(B, in_channels, X, Y, Z) -> (B, embedding_dim)``; unit-norm rows when ``normalize`` (triplet
    models, L = 6), logits when not (cross-entropy models, L = number of classes; see
    :meth:`EmbeddingModel.predict_proba`).
    """
    return build_model(
        "paper_cnn", in_channels=in_channels, embedding_dim=embedding_dim, normalize=normalize, width=width, **kwargs
    )
