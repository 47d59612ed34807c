"""Feature extractors, chosen from a registry by model family.

Each extractor is a Ray Data actor class: built once from an EmbedSpec, then called on batches
of uint8 `pixels` (or of encoded `data` it decodes itself); it drops them and adds the columns it
declares in OUTPUT_COLUMNS.
Temporal heads (temporal.py, registry HEADS) then map per-frame features to `clip_<name>` columns.
"""
from .cnn import CnnEmbedder, EmbedSpec, ModelError, build_backbone, check_arch, feature_dim, feature_module, pool
from .temporal import (
    HEADS,
    HeadInfo,
    TemporalEmbedder,
    TemporalError,
    build_head,
    resolve_head,
    resolve_heads,
    save_head,
)

EXTRACTORS = {"torchvision": CnnEmbedder}

__all__ = ["EXTRACTORS", "CnnEmbedder", "EmbedSpec", "ModelError", "build_backbone", "check_arch", "feature_dim",
           "feature_module", "pool", "HEADS", "HeadInfo", "TemporalEmbedder", "TemporalError", "build_head",
           "resolve_head", "resolve_heads", "save_head"]
