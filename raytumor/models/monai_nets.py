"""MONAI 3-D classification networks as backbones, with their classifier removed.

MONAI is imported when a factory is called, not when this module is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raytumor.models.paper import scaled_channels
from raytumor.models.registry import register_encoder


class MonaiBackbone(nn.Module):
    """A MONAI network whose final ``Linear`` is gone: ``(B, C, X, Y, Z) -> (B, feature_dim)``."""

    def __init__(self, net: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.net = net
        self.feature_dim = int(feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, C, X, Y, Z)`` -> features ``(B, feature_dim)``."""
        if x.ndim != 5:
            raise ValueError(f"expected a (B, C, X, Y, Z) volume batch, got shape {tuple(x.shape)}")
        return self.net(x)


class ClampedAvgPool3d(nn.Module):
    """``AvgPool3d(kernel_size)`` whose kernel shrinks to the input on short axes: ``(B, C, X, Y, Z)``
    -> ``(B, C, X', Y', Z')`` with ``X' = max(1, X // kx)`` etc., where ``nn.AvgPool3d`` would fail."""

    def __init__(self, kernel_size: int | tuple[int, int, int] = 2) -> None:
        super().__init__()
        self.kernel_size = (kernel_size,) * 3 if isinstance(kernel_size, int) else tuple(kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = tuple(min(k, size) for k, size in zip(self.kernel_size, x.shape[2:]))
        return F.avg_pool3d(x, kernel, kernel)


def _monai_resnet(depth: int, *, in_channels: int, width: float, **kwargs) -> MonaiBackbone:
    """MONAI's 3-D ResNet (Med3D layout, basic blocks 64-128-256-512 x ``width``), no ``fc``.

    Its strided 3x3x3 convs and padded max pool keep a size-1 axis at 1, so it runs on small and
    depth-1 volumes. ``kwargs`` go to ``monai.networks.nets.ResNet`` (e.g. ``conv1_t_stride``).
    """
    from monai.networks.nets import resnet

    net = getattr(resnet, f"resnet{depth}")(
        spatial_dims=3, n_input_channels=in_channels, widen_factor=width, feed_forward=False, **kwargs
    )
    return MonaiBackbone(net, net.in_planes)  # in_planes ends as layer4's output channels


@register_encoder("monai_resnet10")
def monai_resnet10(*, in_channels: int = 2, width: float = 1.0, **kwargs) -> MonaiBackbone:
    """MONAI ResNet-10 3-D (14.4M parameters at width 1, feature_dim 512 x width)."""
    return _monai_resnet(10, in_channels=in_channels, width=width, **kwargs)


@register_encoder("monai_resnet18")
def monai_resnet18(*, in_channels: int = 2, width: float = 1.0, **kwargs) -> MonaiBackbone:
    """MONAI ResNet-18 3-D (33.2M parameters at width 1, feature_dim 512 x width)."""
    return _monai_resnet(18, in_channels=in_channels, width=width, **kwargs)


@register_encoder("monai_densenet121")
def monai_densenet121(*, in_channels: int = 2, width: float = 1.0, **kwargs) -> MonaiBackbone:
    """MONAI DenseNet-121 3-D (11.2M parameters at width 1, feature_dim 1024), no output ``Linear``.

    ``width`` scales ``init_features`` (64) and ``growth_rate`` (32). The transition average pools
    become :class:`ClampedAvgPool3d`, so a size-1 axis (a thin Z, a 2-D slice) stays 1 where
    ``AvgPool3d(2)`` would fail. ``kwargs`` go to ``monai.networks.nets.DenseNet121``.
    """
    from monai.networks.nets import DenseNet121

    net = DenseNet121(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=1,
        init_features=scaled_channels(64, width),
        growth_rate=scaled_channels(32, width),
        **kwargs,
    )
    feature_dim = net.class_layers.out.in_features
    net.class_layers.out = nn.Identity()
    for module in list(net.features.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.AvgPool3d):
                setattr(module, name, ClampedAvgPool3d(child.kernel_size))
    return MonaiBackbone(net, feature_dim)
