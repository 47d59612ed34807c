"""Training from the feature tables: heads trained on Ray Train, applied to tables, and loaders.

Depends only on the output contract (features tables, `_job.json`, Parquet provenance), never on
the extraction runner.
"""
