"""One module per model family, named as `model.family` names it; each defines FAMILY (base.Family)."""
