"""Encoders by name (timm-style): ``@register_encoder("name")`` on a factory, ``create_encoder(name)``.

An encoder (a *backbone*) maps a volume ``(B, C, X, Y, Z)`` to a feature vector ``(B, feature_dim)``
and exposes ``feature_dim`` as an int attribute. Factories take keyword arguments
``in_channels`` and ``width`` (a channel multiplier, 1.0 = the published width) plus their own
extras, and must not do heavy work at import: a factory that needs MONAI imports it when called.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

EncoderFactory = Callable[..., nn.Module]

_ENCODERS: dict[str, EncoderFactory] = {}


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator: register ``factory(*, in_channels, width, **kwargs) -> backbone`` under ``name``."""

    def decorator(factory: EncoderFactory) -> EncoderFactory:
        if name in _ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered")
        _ENCODERS[name] = factory
        return factory

    return decorator


def list_encoders() -> list[str]:
    """Registered encoder names, sorted."""
    return sorted(_ENCODERS)


def create_encoder(name: str, *, in_channels: int = 2, width: float = 1.0, **kwargs) -> nn.Module:
    """Build the backbone registered as ``name``: ``(B, in_channels, X, Y, Z) -> (B, feature_dim)``.

    Raises ``ValueError`` naming the registered encoders when ``name`` is unknown.
    """
    if name not in _ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; registered encoders: {', '.join(list_encoders())}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    backbone = _ENCODERS[name](in_channels=in_channels, width=width, **kwargs)
    if not isinstance(getattr(backbone, "feature_dim", None), int):
        raise TypeError(f"encoder {name!r} returned a module without an int feature_dim attribute")
    return backbone
