"""After extraction, without Ray: a similarity index over a features table, search, dedup and query embedding."""
