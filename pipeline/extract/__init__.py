"""Extraction: from a source to rows of features. plan.py lists the source once into a plan;
fetch, read and shards read the bytes (tar shards streamed); decode, device_decode and video
turn them into tensors (isolate.py runs risky decoders in a child process); layout.py places the
stages on the cluster's nodes and runner.py wires them into one Ray Data pipeline, whose rows go
to output/ (the sink and the committer)."""
