"""How partition folders are named: `features/split_dir=<split>/label_dir=<label>/part-....parquet`.

Why the folders are not named `split=`/`label=`: every hive reader (pyarrow, pandas, Polars, DuckDB,
Ray) takes a column's value from the folder name over the file's own column, and then infers a type
from it: `007` becomes 7, `true` a boolean, `2024-01-01` a date, and both `""` and
`__HIVE_DEFAULT_PARTITION__` become null; pandas even fails when a column is in both. No folder name
can carry `""` exactly, so the exact `split` and `label` strings are stored in every file, and the
folders use other keys (`<column>_dir`), which readers add as extra columns and can prune on.

A folder value is the value percent-encoded (as readers decode it), unless that would be empty, the
hive null marker, or too long for a file name: then a readable prefix plus `~` and a hash of the
whole value, so that distinct values never share a folder (`~` is escaped in readable names).
"""
from __future__ import annotations

import hashlib
from typing import Iterable
from urllib.parse import quote

FOLDER_SUFFIX = "_dir"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
MAX_VALUE_BYTES = 120  # per folder value: `label_dir=` + 120 bytes is well under the usual 255-byte name limit
HASH_CHARS = 16


def folder_key(column: str) -> str:
    return column + FOLDER_SUFFIX


def column_of(key: str) -> str:
    """The column a partition key names: `label_dir` -> `label`; an older output's `label` -> `label`."""
    return key[: -len(FOLDER_SUFFIX)] if key.endswith(FOLDER_SUFFIX) else key


def folder_value(value: str) -> str:
    """The value's name in a folder: ASCII, non-empty, never the null marker, at most MAX_VALUE_BYTES."""
    readable = _escape(value)
    if readable and readable != HIVE_NULL and len(readable) <= MAX_VALUE_BYTES:
        return readable  # "" when the value is not valid UTF-8 (a lone surrogate): hashed below
    prefix = ""
    for ch in value:  # whole characters only: a cut escape would not decode as UTF-8
        escaped = _escape(ch)
        if len(prefix) + len(escaped) > MAX_VALUE_BYTES - HASH_CHARS - 1:
            break
        prefix += escaped
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    return f"{prefix}~{digest}"


def partition_folder(columns: Iterable[str], values: Iterable[str]) -> str:
    """`split_dir=train/label_dir=cat` for the given partition columns and values."""
    return "/".join(f"{folder_key(c)}={folder_value(v)}" for c, v in zip(columns, values))


def _escape(value: str) -> str:
    """Percent-encoded UTF-8 (readers decode it back), or "" for what UTF-8 cannot encode."""
    try:
        return quote(value, safe="").replace("~", "%7E")
    except UnicodeEncodeError:
        return ""
