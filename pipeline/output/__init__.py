"""The output root and what reads it: the sink stages files, the ledger and the committer actor
publish each sample exactly once, the lease keeps one run per root, root.py opens a root (resume,
incremental, retry, overwrite), status.py and record.py read and record it, and table.py/tensors.py
are the table reader every later stage (train, index, pages, the API) shares."""
