"""Encoders (the paper's 3-D CNN, MONAI networks) behind one registry, and the heads on top.

Importing registers the encoders by name; MONAI itself is imported only when one of its
encoders is built.
"""

from raytumor.models.registry import create_encoder, list_encoders, register_encoder
from raytumor.models.heads import EmbeddingHead, ProjectionHead
from raytumor.models.model import (
    ContrastiveModel,
    EmbeddingModel,
    build_contrastive_model,
    build_model,
    count_parameters,
    flops_per_sample,
    load_backbone_weights,
)
from raytumor.models.paper import PaperCNN, paper_encoder
from raytumor.models.monai_nets import MonaiBackbone

__all__ = [
    "ContrastiveModel",
    "EmbeddingHead",
    "EmbeddingModel",
    "MonaiBackbone",
    "PaperCNN",
    "ProjectionHead",
    "build_contrastive_model",
    "build_model",
    "count_parameters",
    "create_encoder",
    "flops_per_sample",
    "list_encoders",
    "load_backbone_weights",
    "paper_encoder",
    "register_encoder",
]
