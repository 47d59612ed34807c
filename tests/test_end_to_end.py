"""End-to-end: real sources -> real local Ray -> committed Parquet, read back by pyarrow and DuckDB.

Each test runs one small job (random-init ResNet-18 on 56x56 crops) on the session's Ray and
checks the design's invariants on what lands in OUT: every planned sample exactly once across
`features` and `errors` (I1), only whole committed files visible (I2), provenance in the files.
A manifest's run (relative uris, a row listed but not there, splits as folders) is test_partitions'.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from pipeline.errors import OutputExists
from pipeline.samples import CLASSES, encode, image_cases, make_image_folder, photo

from conftest import S3_BUCKET, S3_SECRET, assert_exactly_once, job_dict, read_errors, read_features, run, tree

pytestmark = pytest.mark.usefixtures("ray_session")

FEATURE_TYPE = pa.list_(pa.float16(), 512)


def _files_under(root: str):
    return sorted(
        os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
        for folder, _, names in os.walk(root)
        for name in names
    )


def _feature_matrix(table: pa.Table) -> np.ndarray:
    column = table["feature"].combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)


@pytest.fixture(scope="module")
def image_folder_run(tmp_path_factory, ray_session):
    """One run over a class-per-folder tree holding every awkward case; shared by the checks."""
    base = tmp_path_factory.mktemp("image_folder")
    src, out = base / "images", base / "out"
    make_image_folder(str(src), n=40)
    (src / "cases").mkdir()
    cases = image_cases()
    for name, (data, _) in cases.items():
        (src / "cases" / name).write_bytes(data)
    data = job_dict(str(src), str(out), name="e2e-images", source={"split": "train"})
    summary = run(data)
    return {"src": str(src), "out": str(out), "cases": cases, "summary": summary, "job": data}


@pytest.mark.timeout(240)
def test_image_folder_every_sample_exactly_once(image_folder_run):
    r = image_folder_run
    on_disk = _files_under(r["src"])
    assert len(on_disk) == 40 + 4 + len(r["cases"])  # make_image_folder adds 4 broken files
    features, errors = assert_exactly_once(r["out"], on_disk)

    # each awkward case lands where samples.image_cases() says it should
    for name, (_, ok) in r["cases"].items():
        sample_id = f"cases/{name}"
        assert (sample_id in features) is ok, f"{sample_id}: expected {'a feature' if ok else 'an error'} row"

    err = read_errors(r["out"])
    bad_ids = {f"cases/{n}" for n, (_, ok) in r["cases"].items() if not ok}
    bad_ids |= {p for p in on_disk if os.path.basename(p).startswith("bad_")}  # make_image_folder's
    assert set(err["sample_id"].to_pylist()) == bad_ids
    for row in err.to_pylist():
        assert row["stage"] == "decode", row
        assert row["message"].strip(), row
        assert row["error_type"], row
        assert row["attempts"] == 1
        assert row["uri"].endswith(row["sample_id"])
    by_id = {row["sample_id"]: row for row in err.to_pylist()}
    assert by_id["cases/bad_zero_bytes.jpg"]["message"] == "empty file (0 bytes)"
    assert by_id["cases/bad_bomb.png"]["error_type"] == "DecompressionBombError"

    summary = r["summary"]
    assert summary.planned == len(on_disk)
    assert summary.features == len(features) and sum(summary.errors.values()) == len(errors)
    assert all(kind.startswith("decode/") for kind in summary.errors)


@pytest.mark.timeout(120)
def test_image_folder_features_table(image_folder_run):
    r = image_folder_run
    table = read_features(r["out"])
    assert table.schema.field("feature").type == FEATURE_TYPE
    assert set(table["split"].to_pylist()) == {"train"}  # the exact value, in every file
    assert sorted(os.listdir(os.path.join(r["out"], "features"))) == ["split_dir=train"]

    matrix = _feature_matrix(table)
    assert matrix.dtype == np.float16
    assert not np.isnan(matrix).any() and np.isfinite(matrix).all()
    assert np.abs(matrix).sum(axis=1).min() > 0  # no sample kept the placeholder zeros
    rows = {sid: i for i, sid in enumerate(table["sample_id"].to_pylist())}
    # byte-identical files get the same features; different images do not
    same = matrix[rows["cases/ok_rgb.jpg"]].astype(np.float32), matrix[rows["cases/ok_upper.JPEG"]].astype(np.float32)
    np.testing.assert_allclose(*same, rtol=1e-2, atol=1e-2)
    assert not np.allclose(matrix[rows["cases/ok_rgb.jpg"]], matrix[rows["cases/ok_1x1.png"]], atol=1e-2)

    for row in table.select(["sample_id", "label", "uri", "width", "height"]).to_pylist():
        path = os.path.join(r["src"], row["sample_id"])
        assert row["label"] == os.path.basename(os.path.dirname(path))
        assert row["uri"].endswith(row["sample_id"])
        with Image.open(path) as img:
            assert (row["width"], row["height"]) == ImageOps.exif_transpose(img).size, row["sample_id"]
    assert set(table["label"].to_pylist()) == {*CLASSES, "cases"}
    sizes = {sid: (w, h) for sid, w, h in zip(*(table[c].to_pylist() for c in ("sample_id", "width", "height")))}
    assert sizes["cases/ok_8000x8.png"] == (8000, 8)
    assert sizes["cases/ok_1x1.png"] == (1, 1)
    assert sizes["cases/ok_rgb.jpg"] == (96, 64)
    assert sizes["cases/ok_exif_rotated.jpg"] == (64, 96)  # displayed size: turned by EXIF


@pytest.mark.timeout(120)
def test_image_folder_readable_by_duckdb(image_folder_run):
    duckdb = pytest.importorskip("duckdb")
    r = image_folder_run
    table = read_features(r["out"])
    glob = os.path.join(r["out"], "features", "**", "*.parquet")
    con = duckdb.connect()
    rows = con.execute(
        "select sample_id, split, len(feature) from read_parquet(?, hive_partitioning=true) order by sample_id",
        [glob],
    ).fetchall()
    assert len(rows) == table.num_rows
    assert [r[0] for r in rows] == sorted(table["sample_id"].to_pylist())
    assert {r[1] for r in rows} == {"train"}
    assert {r[2] for r in rows} == {512}
    (nan_rows,) = con.execute(
        "select count(*) from read_parquet(?, hive_partitioning=true) "
        "where len(list_filter(feature, lambda x: isnan(x))) > 0",
        [glob],
    ).fetchone()
    assert nan_rows == 0


@pytest.mark.timeout(120)
def test_image_folder_files_metadata_and_job_record(image_folder_run):
    r = image_folder_run
    out = r["out"]
    files = _files_under(os.path.join(out, "features")) + _files_under(os.path.join(out, "errors"))
    assert files, "no files committed"
    assert not [f for f in files if os.path.basename(f).startswith(".")], "uncommitted temp files visible"
    assert all(f.endswith(".parquet") and os.path.basename(f).startswith("part-") for f in files)

    feature_files = [os.path.join(out, "features", f) for f in _files_under(os.path.join(out, "features"))]
    total = 0
    for path in feature_files:
        pf = pq.ParquetFile(path)  # a whole, readable file
        total += pf.metadata.num_rows
        meta = {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}
        assert meta["featurize.model"] == "resnet18"
        assert meta["featurize.dim"] == "512"
        assert meta["featurize.dtype"] == "float16"
        assert meta["featurize.job"] == "e2e-images"
        assert json.loads(meta["featurize.preprocess"])["crop"] == 56
        assert pf.read(columns=["split"])["split"].to_pylist() == ["train"] * pf.metadata.num_rows  # exact, in the file
    assert total == r["summary"].features

    record = json.loads(open(os.path.join(out, "_job.json")).read())
    assert record["status"] == "complete"
    counts = record["counts"]
    planned = len(_files_under(r["src"]))
    assert counts["planned"] == planned == counts["samples"]
    assert counts["features"] == total
    assert counts["errors"] == len(read_errors(out)) == planned - total
    assert sum(counts["errors_by_kind"].values()) == counts["errors"]
    assert record["config"]["model"]["arch"] == "resnet18"
    assert record["resolved"]["dim"] == 512
    # where the time went: every image stage was timed, and one of them bounds the run
    stages = record["stages"]
    assert set(stages["stages"]) == {"read", "decode", "model", "write"}
    assert all(s["busy_s"] > 0 and s["samples_per_s"] > 0 for s in stages["stages"].values())
    assert stages["bound"] in stages["stages"] and stages["suggestion"]
    assert stages == r["summary"].stages
    assert record["layout"]["decode_in_actor"]  # a CPU model: its actor decodes, errors and all

    plan = pq.read_table(os.path.join(out, "_plan.parquet"))
    assert sorted(plan["sample_id"].to_pylist()) == _files_under(r["src"])
    # rows committed over time, for the report's throughput chart (pipeline/pages)
    series = record["runs"][-1]["progress"]
    assert series[0] == [0.0, 0] and series[-1][1] == counts["samples"] and len(series) <= 300
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(series, series[1:]))
    from pipeline.pages import build_report

    html = build_report(out)  # a real output's report: every chart drawn, the series among them
    assert html.count('src="data:image/png;base64,') == 4 and "not recorded" not in html


@pytest.mark.timeout(120)
def test_rerun_finds_everything_done_and_another_job_is_refused(image_folder_run):
    r = image_folder_run
    before = tree(os.path.join(r["out"], "features"))
    summary = run(r["job"])
    assert summary.samples == 0 and summary.skipped == len(_files_under(r["src"]))
    assert tree(os.path.join(r["out"], "features")) == before
    before = tree(r["out"])
    other = json.loads(json.dumps(r["job"]))
    other["model"]["pool"] = "max"
    with pytest.raises(OutputExists, match=r'different settings: model.pool \("avg" -> "max"\)'):
        run(other)
    assert tree(r["out"]) == before


# ---------------------------------------------------------------- webdataset


def _add(tar: tarfile.TarFile, name: str, data) -> None:
    info = tarfile.TarInfo(name)  # names are written as given: '../' and absolute paths included
    if isinstance(data, str):  # a symbolic link to that name, not a regular file
        info.type, info.linkname = tarfile.SYMTYPE, data
        tar.addfile(info)
        return
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.timeout(180)
def test_webdataset_shards(tmp_path):
    """Labels from .cls/.txt/.json members, hostile member names, and the odd shards of issue 12
    (tests/extract/test_read_edges.py reads them stage by stage): a key seen again, a name that is
    not UTF-8, a link, a shard cut inside a header; every member group lands exactly once."""
    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    jpg = [encode(photo(80 + 8 * i, 60, seed=10 + i)) for i in range(8)]
    escaped_abs = str(tmp_path / "escaped" / "abs")  # where an extracting reader would write
    members = {
        "shard-000.tar": [("a.jpg", jpg[0]), ("a.cls", b"0\n"), ("b.jpg", jpg[1]), ("b.cls", b"1"),
                          ("c.jpg", jpg[2]), ("c.json", json.dumps({"label": "x"}).encode())],
        "shard-001.tar": [("d.jpg", jpg[3]), ("d.txt", b"a dog\n"), ("broken.jpg", jpg[4][:200]),
                          ("broken.cls", b"2"), ("onlycls.cls", b"3"), ("sub/e.jpg", jpg[5]), ("sub/e.cls", b"5")],
        "shard-002.tar": [("../evil.jpg", jpg[6]), ("../evil.cls", b"6"),
                          (escaped_abs + ".jpg", jpg[7]), (escaped_abs + ".cls", b"7")],
    }
    odd = {"shard-003.tar": [("a.jpg", jpg[0]), ("b.jpg", jpg[1]), ("a.png", jpg[2]), ("b.jpg", jpg[3]),
                             (os.fsdecode(b"n\xe9.jpg"), jpg[4]), ("l.jpg", "a.jpg")],
           "shard-004.tar": [("c.jpg", jpg[0]), ("d.jpg", jpg[1]), ("e.jpg", jpg[2])]}
    for shard, items in {**members, **odd}.items():
        # the odd ones in GNU format: a name that is not UTF-8 is written as its bytes
        kind = {"format": tarfile.GNU_FORMAT, "encoding": "utf-8"} if shard in odd else {}
        with tarfile.open(shards / shard, "w", **kind) as tar:
            for name, data in items:
                _add(tar, name, data)
    with tarfile.open(shards / "shard-004.tar") as tar:
        cut = tar.getmembers()[2].offset + 100  # inside e.jpg's header
    (shards / "shard-004.tar").write_bytes((shards / "shard-004.tar").read_bytes()[:cut])
    with tarfile.open(shards / "shard-002.tar") as tar:  # the hostile names really are in the shard
        assert tar.getnames()[0] == "../evil.jpg" and tar.getnames()[2].startswith("/")
    outside_before = tree(tmp_path)

    run(job_dict(str(shards / "shard-{000..004}.tar"), str(out), name="e2e-wds",
                 source={"format": "webdataset", "split": "train"}))

    expected_labels = {
        "shard-000.tar/a": "0", "shard-000.tar/b": "1", "shard-000.tar/c": "x",
        "shard-001.tar/d": "a dog", "shard-001.tar/sub/e": "5",
        "shard-002.tar/../evil": "6", f"shard-002.tar/{escaped_abs}": "7",
        "shard-003.tar/a": "", "shard-003.tar/b": "", "shard-003.tar/n\\xe9": "",
        "shard-004.tar/c": "", "shard-004.tar/d": "",
    }
    expected_errors = {"shard-001.tar/broken": "decode", "shard-001.tar/onlycls": "read",
                       "shard-003.tar/a.dup2": "read", "shard-003.tar/b.dup2": "read", "shard-003.tar/l": "read",
                       "shard-004.tar": "read"}
    features, errors = assert_exactly_once(str(out), {*expected_labels, *expected_errors})
    assert sorted(features) == sorted(expected_labels)

    table = read_features(str(out))
    assert dict(zip(table["sample_id"].to_pylist(), table["label"].to_pylist())) == expected_labels
    assert set(table["split"].to_pylist()) == {"train"}
    for row in table.select(["sample_id", "uri"]).to_pylist():
        shard, _, key = row["sample_id"].partition("/")
        assert row["uri"] == f"file://{shards / shard}#{key}"

    err = {row["sample_id"]: row for row in read_errors(str(out)).to_pylist()}
    assert {sid: row["stage"] for sid, row in err.items()} == expected_errors
    assert err["shard-001.tar/onlycls"]["error_type"] == "LookupError"
    assert "no image member" in err["shard-001.tar/onlycls"]["message"]
    assert err["shard-001.tar/broken"]["message"]
    assert {sid: err[sid]["error_type"] for sid in expected_errors if sid.startswith(("shard-003", "shard-004"))} == {
        "shard-003.tar/a.dup2": "duplicate_key", "shard-003.tar/b.dup2": "duplicate_key",
        "shard-003.tar/l": "not_a_file", "shard-004.tar": "truncated"}

    # member names are data only: nothing appeared outside OUT, and OUT holds only its own layout
    assert not os.path.exists(escaped_abs + ".jpg") and not (tmp_path / "evil.jpg").exists()
    after = tree(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("out" + os.sep)} == outside_before
    for rel in _files_under(str(out)):
        assert rel in ("_job.json", "_plan.parquet") or (
            rel.startswith(("features/split_dir=train/part-", "errors/part-", "_units/part-")) and rel.count("/") <= 2
        ), rel


# ---------------------------------------------------------------- S3 (moto)


@pytest.mark.timeout(180)
def test_s3_source_and_output(s3):
    import pyarrow.dataset as pads

    fs, options = s3
    good = {f"images/{cls}/img_{i}.jpg": encode(photo(70 + i, 50 + i, seed=i)) for i, cls in enumerate(["cat", "dog"] * 3)}
    bad = {"images/cat/bad_html.jpg": b"<html>nope</html>", "images/dog/bad_truncated.jpg": good["images/cat/img_0.jpg"][:100]}
    for key, data in {**good, **bad}.items():
        fs.pipe_file(f"{S3_BUCKET}/{key}", data)
    fs.invalidate_cache()
    out_uri = f"s3://{S3_BUCKET}/out/job1"

    # decode_on: any: here decode runs in its own tasks (the cluster layout), elsewhere in the actor
    summary = run(job_dict(f"s3://{S3_BUCKET}/images/", out_uri, name="e2e-s3",
                           source={"storage_options": options}, resources={"decode_on": "any"}))

    fs.invalidate_cache()
    expected = {k[len("images/"):] for k in (*good, *bad)}
    features, errors = assert_exactly_once(out_uri, expected, fs)
    assert set(features) == {k[len("images/"):] for k in good}
    assert summary.features == len(good) and sum(summary.errors.values()) == len(bad)
    assert not summary.layout["decode_in_actor"]

    root = f"{S3_BUCKET}/out/job1"
    dataset = pads.dataset(f"{root}/features", filesystem=fs, format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.schema.field("feature").type == FEATURE_TYPE
    assert set(table["split"].to_pylist()) == {"all"}
    assert all(uri.startswith(f"s3://{S3_BUCKET}/images/") for uri in table["uri"].to_pylist())
    assert {r["sample_id"]: r["label"] for r in table.select(["sample_id", "label"]).to_pylist()} == {
        k: k.split("/")[0] for k in features
    }
    assert not np.isnan(_feature_matrix(table)).any()
    assert set(read_errors(out_uri, fs)["stage"].to_pylist()) == {"decode"}

    record = json.loads(fs.cat_file(f"{root}/_job.json"))
    assert record["status"] == "complete" and record["counts"]["samples"] == len(expected)
    assert record["config"]["source"]["storage_options"]["secret"] == "***"
    assert record["config"]["source"]["storage_options"]["client_kwargs"]["endpoint_url"].startswith("http://127.0.0.1")
    written = fs.find(root)
    assert f"{root}/_plan.parquet" in written
    secret = S3_SECRET.encode()
    for path in written:  # not in _job.json, not in any Parquet file (metadata or data)
        assert secret not in fs.cat_file(path), path
        if path.endswith(".parquet"):
            meta = pq.read_schema(io.BytesIO(fs.cat_file(path))).metadata or {}
            assert not any(secret in k or secret in v for k, v in meta.items()), path
    assert not [p for p in written if os.path.basename(p).startswith(".")]

    from pipeline.output.record import inspect_output

    text = inspect_output(out_uri, options)
    assert "dim 512, halffloat" in text and f"rows       {len(good)}" in text and "errors     2" in text
    assert S3_SECRET not in text
