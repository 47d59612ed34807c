"""Partition folders fit a file name, and every reader the README shows gets the exact label back.

Labels that hive readers would type (`007` -> 7, `true`, `2024-01-01`), null (`""`,
`__HIVE_DEFAULT_PARTITION__`), split (`a/b`, `a=b`) or that are too long for a folder name (80 CJK
characters) are written through the sink's own code, then read back with pyarrow, pandas, Polars,
DuckDB and Ray as the README's recipes read them.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pyarrow as pa
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.output.ledger import parquet_bytes, write_atomic
from pipeline.output.partitions import folder_value, partition_folder
from pipeline.output.record import inspect_output
from pipeline.output.sink import ParquetCommitSink, SinkSpec, features_schema, image_columns
from pipeline.samples import encode, photo

from conftest import assert_exactly_once, job_dict, read_errors, read_features, run

HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
CJK = "特征提取" * 20  # 80 characters: 240 UTF-8 bytes, 720 percent-encoded
ODD = ["007", "010", "", HIVE_NULL, "null", "a/b", "a=b", "%2F", "x y", "two\nlines", "1e5", "true", "2024-01-01"]
LABELS = ODD + [CJK, CJK[:-1] + "征"]  # the last shares the CJK label's readable prefix
SPLITS = ["010", "train", "true"]  # split values a reader could type as well


def _readers(features: str):
    """sample_id -> (label, split), as each README recipe reads OUT/features."""
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    glob = f"{features}/**/*.parquet"
    yield "pyarrow", ds.dataset(features, partitioning="hive").to_table().to_pylist()
    yield "pandas", pd.read_parquet(features).to_dict("records")
    yield "polars", pl.read_parquet(glob, hive_partitioning=True).to_dicts()
    yield "polars scan", pl.scan_parquet(glob, hive_partitioning=True).collect().to_dicts()
    yield "duckdb", duckdb.sql(f"select * from read_parquet('{glob}', hive_partitioning=true)").df().to_dict("records")


def _assert_read_back(name: str, rows, expected) -> None:
    got = {r["sample_id"]: (r["label"], r["split"]) for r in rows}
    assert len(rows) == len(expected), name
    wrong = {k: (v, got.get(k)) for k, v in expected.items() if got.get(k) != v}
    assert not wrong, f"{name}: (written, read) {wrong}"


def _batch(labels, splits):
    n = len(labels)
    return {
        "sample_id": np.array([f"s{i:02d}" for i in range(n)], dtype=object),
        "uri": np.array([f"file:///data/s{i:02d}.jpg" for i in range(n)], dtype=object),
        "label": np.array(labels, dtype=object),
        "split": np.array([splits[i % len(splits)] for i in range(n)], dtype=object),
        "feature": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
        "width": np.full(n, 8), "height": np.full(n, 6),
        "error_stage": np.array([""] * n, dtype=object),
    }


def _write_through_sink(root, labels):
    """Each partition table the sink makes, written where the sink would publish it; returns
    sample_id -> (label, split) as written."""
    spec = SinkSpec(str(root), {}, ["split", "label"], image_columns("float16", 4))
    batch = _batch(labels, SPLITS)
    ok = batch["error_stage"] == ""
    tables = list(ParquetCommitSink(spec, None)._feature_tables(batch, ok, features_schema(spec)))
    assert len(tables) == len(set(zip(batch["label"], batch["split"])))  # distinct values never share a folder
    for i, (folder, table, _) in enumerate(tables):
        rel = f"{folder}/part-{i}.parquet"
        assert all(len(name.encode()) <= 255 for name in rel.split("/")) and len(rel.encode()) <= 1024, rel
        write_atomic(LocalFileSystem(), f"{root}/{rel}", parquet_bytes(table))  # as the sink stages a file
    return {s: (lab, sp) for s, lab, sp in zip(batch["sample_id"], batch["label"], batch["split"])}


def test_long_labels_get_folder_names_that_fit(tmp_path):
    """Case 6: 80 CJK characters percent-encode to 720 bytes, over the 255-byte name limit."""
    expected = _write_through_sink(tmp_path, [CJK, CJK[:-1] + "征", "x" * 300, "x" * 299 + "y", "short"])
    for name, rows in _readers(f"{tmp_path}/features"):
        _assert_read_back(name, rows, expected)


@pytest.mark.parametrize("labels", [ODD, ["007", "010"], ["1e5", "2.50"], ["true", "false"], ["2024-01-01"], [""]])
def test_every_reader_gets_the_exact_label(tmp_path, labels):
    """Case 16: no reader types, nulls or splits a label or a split, whatever it looks like (a
    reader infers a type from all of a key's folder values: hence the sets of one kind)."""
    expected = _write_through_sink(tmp_path, labels)
    for name, rows in _readers(f"{tmp_path}/features"):
        _assert_read_back(name, rows, expected)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=2, max_size=2, unique=True))
def test_folder_values_fit_and_distinct_values_never_share_one(values):
    a, b = (folder_value(v) for v in values)
    assert a != b
    for name in (a, b):
        assert name and name != HIVE_NULL and name.isascii() and len(name) <= 120
        assert len(partition_folder(["label"], [name]).encode()) <= 255


def test_an_older_output_still_reads_and_inspects(tmp_path):
    """Outputs written before: `split=<v>` folders, the split column only in the folder name."""
    for split, ids in (("train", ["a", "b"]), ("val", ["c"])):
        table = pa.table({"sample_id": ids, "uri": ids, "label": ["x"] * len(ids)})
        write_atomic(LocalFileSystem(), f"{tmp_path}/features/split={split}/part-0.parquet", parquet_bytes(table))
    table = read_features(str(tmp_path))
    assert sorted(zip(table["sample_id"].to_pylist(), table["split"].to_pylist())) == [
        ("a", "train"), ("b", "train"), ("c", "val")]
    lines = [line.split() for line in inspect_output(str(tmp_path)).splitlines()]
    assert ["split=train", "2"] in lines and ["split=val", "1"] in lines and ["rows", "3"] in lines


@pytest.mark.parametrize("nesting", [("split", "label"), ("label", "split")])
def test_inspect_shows_partitions_in_the_order_their_folders_nest(tmp_path, nesting):
    values = {"split": ["train", "val"], "label": ["cat", "dog"]}
    for i, (first, second) in enumerate((a, b) for a in values[nesting[0]] for b in values[nesting[1]]):
        row = dict(zip(nesting, (first, second)))
        table = pa.table({"sample_id": [str(i)], "split": [row["split"]], "label": [row["label"]]})
        folder = partition_folder(nesting, (first, second))
        write_atomic(LocalFileSystem(), f"{tmp_path}/features/{folder}/part-{i}.parquet", parquet_bytes(table))
    shown = [line.split()[0] for line in inspect_output(str(tmp_path)).splitlines() if line.startswith("  ") and "=" in line]
    assert shown == [f"{nesting[0]}={a}/{nesting[1]}={b}" for a in values[nesting[0]] for b in values[nesting[1]]]


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.usefixtures("ray_session")
def test_labels_read_back_exactly_end_to_end(tmp_path):
    """A CSV manifest (no type inference: `007` stays a string; uris relative to its folder, one listed
    but not there) through a real run with partition_by [split, label]; Ray is the fifth reader;
    `featurize inspect` shows exact values."""
    import pyarrow.parquet as pq
    import ray

    data, out = tmp_path / "data", tmp_path / "out"
    (data / "imgs").mkdir(parents=True)
    rows = []
    for i, label in enumerate(LABELS):
        (data / "imgs" / f"{i:03d}.jpg").write_bytes(encode(photo(40 + i, 32, seed=i)))
        rows.append({"uri": f"imgs/{i:03d}.jpg", "label": label, "split": SPLITS[i % len(SPLITS)]})
    missing = {"uri": "imgs/missing.jpg", "label": "007", "split": "train"}  # listed, not there
    with open(data / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["uri", "label", "split"])
        writer.writeheader()
        writer.writerows(rows + [missing])

    run(job_dict(str(data / "manifest.csv"), str(out), name="labels", source={"format": "manifest"},
                 output={"partition_by": ["split", "label"]}))

    _, errors = assert_exactly_once(str(out), [r["uri"] for r in rows + [missing]])
    assert errors == [missing["uri"]]
    (err,) = read_errors(str(out)).to_pylist()
    assert err["stage"] == "read" and err["error_type"] == "FileNotFoundError"
    splits = sorted(set(SPLITS))  # a folder per split, each holding its split's rows
    assert sorted(os.listdir(out / "features")) == [f"split_dir={folder_value(s)}" for s in splits]
    for split in splits:
        files = (out / "features" / f"split_dir={folder_value(split)}").rglob("*.parquet")
        assert sum(pq.read_metadata(f).num_rows for f in files) == sum(r["split"] == split for r in rows)
    expected = {r["uri"]: (r["label"], r["split"]) for r in rows}
    features = str(out / "features")
    for name, got in _readers(features):
        _assert_read_back(name, got, expected)
    _assert_read_back("ray", ray.data.read_parquet(features).to_pandas().to_dict("records"), expected)
    for folder, _, _ in os.walk(features):
        assert all(len(n.encode()) <= 255 for n in folder.split(os.sep)), folder

    text = inspect_output(str(out)).splitlines()  # rows per partition, by the exact values
    split_of = {r["label"]: r["split"] for r in rows}
    for shown, label in (("007", "007"), ('""', ""), (CJK, CJK), ('"two\\nlines"', "two\nlines")):
        assert f"  split={split_of[label]}/label={shown}" in {line.rsplit(" ", 1)[0].rstrip() for line in text}, text
    assert f"rows       {len(rows)}" in text and not any("_dir" in line for line in text)
