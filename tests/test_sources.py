import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.read import read_batch
from pipeline.samples import encode, photo
from pipeline.sources import SourceError, expand_braces, plan_source

JPEG = encode(photo(32, 24, seed=0))


def write(path, data=JPEG):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_image_folder_lists_images_of_every_extension_with_folder_labels(tmp_path):
    for rel in ["n01/a.jpg", "n01/b.JPEG", "n02/c.png", "n02/d.webp", "n02/e.BMP", "n03/sub/f.gif",
                "n03/g.tif", "n03/h.TIFF", "n03/notes.txt", "n03/noext", "top.jpg"]:
        write(tmp_path / rel)
    plan = plan_source(SourceConfig(uri=str(tmp_path), split="val")).to_pylist()
    ids = [r["sample_id"] for r in plan]
    assert ids == sorted(["n01/a.jpg", "n01/b.JPEG", "n02/c.png", "n02/d.webp", "n02/e.BMP",
                          "n03/sub/f.gif", "n03/g.tif", "n03/h.TIFF", "top.jpg"])
    by_id = {r["sample_id"]: r for r in plan}
    assert by_id["n01/a.jpg"]["label"] == "n01"
    assert by_id["n03/sub/f.gif"]["label"] == "sub"
    assert by_id["top.jpg"]["label"] == ""
    assert {r["split"] for r in plan} == {"val"}
    assert by_id["n02/c.png"]["uri"].endswith("n02/c.png")


def test_plan_is_stable_between_listings(tmp_path):
    for i in range(20):
        write(tmp_path / f"c{i % 3}" / f"{i}.jpg")
    a = plan_source(SourceConfig(uri=str(tmp_path)))
    b = plan_source(SourceConfig(uri=f"file://{tmp_path}/"))
    assert a.column("sample_id").to_pylist() == b.column("sample_id").to_pylist()
    assert set(a.column("split").to_pylist()) == {"all"}


def test_missing_and_empty_sources_are_refused(tmp_path):
    with pytest.raises(SourceError, match="not"):
        plan_source(SourceConfig(uri=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image_folder samples"):
        plan_source(SourceConfig(uri=str(tmp_path / "empty")))


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def make_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_plans_shards_and_streams_samples_with_labels(tmp_path):
    make_tar(tmp_path / "shard-000.tar", [("a.jpg", JPEG), ("a.cls", b"3"), ("b.jpg", JPEG), ("b.txt", b"dog\n")])
    make_tar(tmp_path / "shard-001.tar", [("d/c.png", encode(photo(8, 8, 1), "PNG")),
                                          ("d/c.json", json.dumps({"label": "cat"}).encode()),
                                          ("../../evil.jpg", JPEG), ("only.cls", b"1")])
    plan = plan_source(SourceConfig(uri=str(tmp_path / "shard-{000..001}.tar"), format="webdataset"))
    assert plan.column("sample_id").to_pylist() == ["shard-000.tar", "shard-001.tar"]
    assert set(plan.column("container").to_pylist()) == {"tar"}
    batch = {k: np.array(v, dtype=object) for k, v in plan.to_pydict().items()}
    rows = {}
    for out in read_batch(batch, {}, rows_per_batch=2):
        for i, sid in enumerate(out["sample_id"]):
            rows[sid] = {k: out[k][i] for k in out}
    assert sorted(rows) == ["shard-000.tar/a", "shard-000.tar/b", "shard-001.tar/../../evil",
                            "shard-001.tar/d/c", "shard-001.tar/only"]
    assert rows["shard-000.tar/a"]["label"] == "3"
    assert rows["shard-000.tar/b"]["label"] == "dog"
    assert rows["shard-001.tar/d/c"]["label"] == "cat"
    assert rows["shard-001.tar/../../evil"]["data"] == JPEG  # read as data, never written anywhere
    assert rows["shard-001.tar/only"]["error_stage"] == "read"
    assert "no image member" in rows["shard-001.tar/only"]["error_message"]
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_truncated_shard_keeps_what_was_read_and_reports_the_rest(tmp_path):
    make_tar(tmp_path / "s.tar", [("a.jpg", JPEG), ("b.jpg", JPEG * 20)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: 512 + len(JPEG) + 512 + 300])
    plan = plan_source(SourceConfig(uri=str(tmp_path), format="webdataset"))
    batch = {k: np.array(v, dtype=object) for k, v in plan.to_pydict().items()}
    out = next(read_batch(batch, {}, rows_per_batch=10))
    assert list(out["sample_id"]) == ["s.tar/a", "s.tar"]
    assert list(out["error_stage"]) == ["", "read"]


def test_manifest_csv_and_parquet(tmp_path):
    write(tmp_path / "imgs" / "x.jpg")
    write(tmp_path / "imgs" / "y.jpg")
    (tmp_path / "m.csv").write_text("uri,label,split\nimgs/x.jpg,cat,train\nimgs/y.jpg,dog,test\n")
    plan = plan_source(SourceConfig(uri=str(tmp_path / "m.csv"), format="manifest")).to_pylist()
    assert [(r["sample_id"], r["label"], r["split"]) for r in plan] == [("imgs/x.jpg", "cat", "train"), ("imgs/y.jpg", "dog", "test")]
    assert plan[0]["uri"].endswith(str(tmp_path / "imgs" / "x.jpg"))
    pq.write_table(pa.table({"uri": [str(tmp_path / "imgs" / "x.jpg")]}), tmp_path / "m.parquet")
    plan = plan_source(SourceConfig(uri=str(tmp_path / "m.parquet"), format="manifest", split="val")).to_pylist()
    assert plan[0]["split"] == "val" and plan[0]["label"] == ""


def test_manifest_without_uri_column_or_with_duplicates_is_refused(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(SourceError, match="'uri' column"):
        plan_source(SourceConfig(uri=str(tmp_path / "m.csv"), format="manifest"))
    (tmp_path / "d.csv").write_text("uri\na.jpg\na.jpg\n")
    with pytest.raises(SourceError, match="appears twice"):
        plan_source(SourceConfig(uri=str(tmp_path / "d.csv"), format="manifest"))


def test_read_batch_turns_a_missing_file_into_a_read_error(tmp_path):
    write(tmp_path / "a.jpg")
    plan = plan_source(SourceConfig(uri=str(tmp_path)))
    (tmp_path / "a.jpg").unlink()
    batch = {k: np.array(v, dtype=object) for k, v in plan.to_pydict().items()}
    out = next(read_batch(batch, {}, rows_per_batch=8))
    assert out["error_stage"][0] == "read" and out["error_type"][0] == "FileNotFoundError"
