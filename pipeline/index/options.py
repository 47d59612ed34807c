"""The index kinds and metrics `featurize index` accepts: in a module of their own, without imports,
so the CLI's parser lists them without loading faiss or Arrow."""

KINDS = ("auto", "flat", "ivf", "hnsw")
METRICS = ("cosine", "l2")
