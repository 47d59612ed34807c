"""Feature extractors: one actor (actor.py) for every model family (families/, chosen by model.family).

base.py holds the family contract; a new family is one file in families/ plus its tests.
Temporal heads (temporal.py, registry HEADS) then map per-frame features to `clip_<name>` columns.
"""
from .actor import Embedder, EmbedSpec
from .base import (
           Family,
           build_module,
           check_arch,
           family,
           family_names,
           feature_dim,
           pool,
           preprocess_defaults,
)
from .temporal import (
    HEADS,
    HeadInfo,
    TemporalEmbedder,
    build_head,
    resolve_head,
    resolve_heads,
    save_head,
)

__all__ = ["Embedder", "EmbedSpec", "Family", "build_module", "check_arch", "family",
           "family_names", "feature_dim", "pool", "preprocess_defaults", "HEADS", "HeadInfo", "TemporalEmbedder",
           "build_head", "resolve_head", "resolve_heads", "save_head"]
