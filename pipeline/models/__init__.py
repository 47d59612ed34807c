"""Feature extractors, chosen from a registry by model family.

Each extractor is a Ray Data actor class: built once from an EmbedSpec, then called on batches
of uint8 `pixels`; it drops `pixels` and adds the columns it declares in OUTPUT_COLUMNS.
"""
from .cnn import CnnEmbedder, EmbedSpec, ModelError, build_backbone, check_arch, feature_dim, feature_module, pool

EXTRACTORS = {"torchvision": CnnEmbedder}

__all__ = ["EXTRACTORS", "CnnEmbedder", "EmbedSpec", "ModelError", "build_backbone", "check_arch", "feature_dim", "feature_module", "pool"]
