"""Similarity index over a features table (faiss): search by vector, id or query (query.py), near-duplicates.

    build_index(OUT, storage_options, column=None, kind="auto", metric="cosine") -> meta
    open_index(OUT, storage_options, column=None) -> Index (.search(vectors, k), .vector(id), .meta)
    find_duplicates(OUT, storage_options, column=None, threshold=0.95) -> groups table

Nothing here imports Ray; everything reads the output contract only (pipeline/output/table.py). faiss
is imported on first use, so the CLI's parser stays quick to build.
"""
from __future__ import annotations

from .options import KINDS, METRICS

__all__ = ["build_index", "open_index", "find_duplicates", "Index", "KINDS", "METRICS"]


def __getattr__(name: str):
    if name == "build_index":
        from .build import build_index
        return build_index
    if name == "find_duplicates":
        from .dedup import find_duplicates
        return find_duplicates
    if name in ("open_index", "Index"):
        from . import search
        return getattr(search, name)
    raise AttributeError(name)
