"""raytumor: triplet contrastive learning for brain-tumour MRI embeddings on Ray."""

__version__ = "0.1.0"
