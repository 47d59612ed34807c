"""Feature extractors: one actor (actor.py) for every model family (families/, chosen by model.family).

base.py holds the family contract; a new family is one file in families/ plus its tests.
Temporal heads (temporal.py, registry HEADS) then map per-frame features to `clip_<name>` columns.

Nothing is imported here: a training's worker needs temporal.py and normalize.py only, and the
actor's imports (torchvision and, through it, torch._dynamo: ~1.7 s) were paid by every process
that touched this package (Ray Train's workers, apply's actors).
"""
