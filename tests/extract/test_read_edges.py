"""The read stage at the edges (issue 12): repeated keys, cut shards, odd members, huge members,
reads that hang. Unit tests call read_batch on hand-built plans; a small end-to-end run checks that
the rows an odd folder gives land exactly once (the odd shards' run is test_end_to_end's webdataset one)."""
from __future__ import annotations

import io
import os
import tarfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import SourceConfig
from pipeline.extract.plan import PLAN_SCHEMA, plan_source
from pipeline.extract.read import read_batch
from pipeline.samples import encode, photo

from conftest import assert_exactly_once, job_dict, read_errors, run

JPEG = [encode(photo(40 + 8 * i, 32, seed=i)) for i in range(6)]


class Special:
    """A tar member that is no regular file: its tarfile type and link target."""

    def __init__(self, kind: bytes, link: str = ""):
        self.kind, self.link = kind, link


def make_tar(path, members, mode="w"):
    """members: (name, data or Special); names may hold surrogate escapes (non-UTF-8 bytes)."""
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT, encoding="utf-8") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, Special):
                info.type, info.linkname = data.kind, data.link
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def as_batch(plan: pa.Table, **extra):
    batch = {k: np.array(v, dtype=object) for k, v in plan.to_pydict().items()}
    for k, v in extra.items():
        batch[k] = np.empty(len(plan), dtype=object)
        batch[k][:] = v
    return batch


def read_all(batch, **kw):
    rows = []
    for out in read_batch(batch, {}, rows_per_batch=3, **kw):
        rows += [{k: out[k][i] for k in out} for i in range(len(out["sample_id"]))]
    return rows


def shard_rows(path, **kw):
    plan = plan_source(SourceConfig(uri=str(path), format="webdataset"))
    return read_all(as_batch(plan, **kw.pop("extra", {})), **kw)


# ------------------------------------------------------------------ 1: repeated keys


def test_a_key_seen_again_in_a_shard_is_one_error_row_under_an_id_no_key_can_have(tmp_path):
    make_tar(tmp_path / "s.tar", [("a.jpg", JPEG[0]), ("b.jpg", JPEG[1]), ("a.png", JPEG[2]), ("b.jpg", JPEG[3]),
                                  ("c.jpg", JPEG[4]), ("c.jpg", JPEG[5]), ("c.cls", b"7")])
    rows = shard_rows(tmp_path / "s.tar")
    by_id = {r["sample_id"]: r for r in rows}
    assert len(by_id) == len(rows)  # unique
    assert sorted(by_id) == ["s.tar/a", "s.tar/a.dup2", "s.tar/b", "s.tar/b.dup2", "s.tar/c", "s.tar/c.dup2"]
    assert [by_id[f"s.tar/{k}"]["data"] for k in "abc"] == [JPEG[0], JPEG[1], JPEG[4]]
    for k, member in (("a", 3), ("b", 4), ("c", 6)):
        dup = by_id[f"s.tar/{k}.dup2"]
        assert (dup["error_stage"], dup["error_type"]) == ("read", "duplicate_key")
        assert f"key {k} appears again at member {member}" in dup["error_message"]
    # c.cls joins the second c group (no c.dup3); a duplicate's members are never read
    assert by_id["s.tar/c.dup2"]["data"] == b""
    assert rows[-1]["unit_rows"] == len(rows) and all(r["unit_rows"] == 0 for r in rows[:-1])

    # a resumed shard passes over what was committed, duplicates included, and counts the rest
    rows = shard_rows(tmp_path / "s.tar", extra={"skip": [["s.tar/a", "s.tar/a.dup2", "s.tar/c"]]})
    assert [r["sample_id"] for r in rows] == ["s.tar/b", "s.tar/b.dup2", "s.tar/c.dup2"]
    assert rows[-1]["unit_rows"] == 3


# ------------------------------------------------------------------ 5: names that are not UTF-8


def test_a_tar_member_name_that_is_not_utf8_gets_an_escaped_id(tmp_path):
    make_tar(tmp_path / "s.tar", [(os.fsdecode(b"bad\xff.jpg"), JPEG[0]), ("ok.jpg", JPEG[1])])
    rows = shard_rows(tmp_path / "s.tar")
    assert [r["sample_id"] for r in rows] == ["s.tar/bad\\xff", "s.tar/ok"]
    assert rows[0]["data"] == JPEG[0] and rows[0]["uri"].endswith("s.tar#bad\\xff")
    pa.table({k: [r[k] for r in rows] for k in ("sample_id", "uri")})  # valid UTF-8: Arrow takes it


# ------------------------------------------------------------------ 9: cut shards, odd members


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def test_a_cut_shard_accounts_for_every_member_it_had(tmp_path):
    full = tmp_path / "full.tar"
    jpgs = {"a": JPEG[0], "b": JPEG[1] * 3, "c": JPEG[2], "d": JPEG[3]}
    make_tar(full, [("a.jpg", jpgs["a"]), ("a.cls", b"1"), ("b.jpg", jpgs["b"]), ("c.jpg", jpgs["c"]),
                    ("d.jpg", jpgs["d"]), ("d.cls", b"4")])
    groups = {"a": ["a.jpg", "a.cls"], "b": ["b.jpg"], "c": ["c.jpg"], "d": ["d.jpg", "d.cls"]}
    members = {m[0]: m for m in _members(full)}  # name -> (name, header offset, data offset, size)
    end = members["d.cls"][2] + 512  # the last member's data, padded to a block; the end blocks follow
    cuts = {"inside c's header": members["c.jpg"][1] + 100, "at c's header": members["c.jpg"][1],
            "inside b's data": members["b.jpg"][2] + 1000, "inside d.cls's header": members["d.cls"][1] + 3,
            "without the end blocks": end, "inside the first end block": end + 100,
            "inside the second end block": end + 612}
    assert [r["sample_id"] for r in shard_rows(full)] == ["full.tar/a", "full.tar/b", "full.tar/c", "full.tar/d"]
    data = full.read_bytes()
    (tmp_path / "cut").mkdir()
    for what, cut in cuts.items():
        (tmp_path / "cut" / "s.tar").write_bytes(data[:cut])
        rows = shard_rows(tmp_path / "cut" / "s.tar")
        by_id = {r["sample_id"]: r for r in rows}
        assert len(by_id) == len(rows) and set(by_id) <= {"s.tar", *(f"s.tar/{k}" for k in groups)}, what
        clean = cut >= end + 512  # one whole zero block: tar's end
        assert ("s.tar" in by_id) != clean, what
        if not clean:  # the shard's own row says where the stream stopped
            assert by_id["s.tar"]["error_type"] == "truncated", what
            assert "stops at byte" in by_id["s.tar"]["error_message"] or "inside member" in by_id["s.tar"]["error_message"]
        for key, names in groups.items():
            row = by_id.get(f"s.tar/{key}")
            if all(members[n][2] + members[n][3] <= cut for n in names):  # wholly there: read
                assert row is not None and row["data"] == jpgs[key], (what, key)
            elif members[names[0]][1] + 512 > cut:  # its first header is cut: the shard's row stands for it
                assert row is None, (what, key)
            else:  # cut short: a row of its own, read or not
                assert row is not None, (what, key)
    assert by_id["s.tar/d"]["data"] == jpgs["d"]


def test_links_devices_and_fifos_in_a_shard_are_error_rows_and_folders_are_passed_over(tmp_path):
    make_tar(tmp_path / "s.tar", [("dir", Special(tarfile.DIRTYPE)), ("a.jpg", JPEG[0]), ("l.jpg", Special(tarfile.SYMTYPE, "a.jpg")),
                                  ("h.jpg", Special(tarfile.LNKTYPE, "a.jpg")), ("f.jpg", Special(tarfile.FIFOTYPE)),
                                  ("c.jpg", Special(tarfile.CHRTYPE)), ("z.jpg", JPEG[1])])
    rows = {r["sample_id"]: r for r in shard_rows(tmp_path / "s.tar")}
    assert sorted(rows) == ["s.tar/a", "s.tar/c", "s.tar/f", "s.tar/h", "s.tar/l", "s.tar/z"]
    assert rows["s.tar/a"]["data"] == JPEG[0] and rows["s.tar/z"]["data"] == JPEG[1]
    for key, kind in (("l", "symlink"), ("h", "hardlink"), ("f", "device or FIFO"), ("c", "device or FIFO")):
        assert (rows[f"s.tar/{key}"]["error_type"], rows[f"s.tar/{key}"]["data"]) == ("not_a_file", b"")
        assert kind in rows[f"s.tar/{key}"]["error_message"]


def test_a_compressed_shard_from_a_stream_that_cannot_seek_is_read(tmp_path):
    from pipeline.extract.shards import tar_rows

    make_tar(tmp_path / "s.tar.gz", [("a.jpg", JPEG[0]), ("b.jpg", JPEG[1])], mode="w:gz")

    class Stream(io.RawIOBase):  # HTTP without a length: read only
        def __init__(self, data):
            self.data = io.BytesIO(data)

        def read(self, n=-1):
            return self.data.read(n)

    rows = list(tar_rows({"sample_id": "s"}, Stream((tmp_path / "s.tar.gz").read_bytes()), 1 << 20, frozenset()))
    assert [(r["sample_id"], r["members"], r["error"]) for r in rows] == [("s/a", {"jpg": JPEG[0]}, None),
                                                                          ("s/b", {"jpg": JPEG[1]}, None)]


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_corrupt_compressed_shard_is_a_truncated_row_not_a_failed_task(tmp_path, mode):
    """Bytes flipped inside the compressed stream: the members before the damage are read, the
    shard gets one truncated row; no exception leaves the read stage (bz2 says it with a bare OSError)."""
    make_tar(tmp_path / "full", [(f"k{i}.jpg", encode(photo(300, 200, seed=i))) for i in range(4)], mode=mode)
    data = bytearray((tmp_path / "full").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)
    (tmp_path / "s.tar").write_bytes(bytes(data))
    rows = shard_rows(tmp_path / "s.tar")
    by_id = {r["sample_id"]: r for r in rows}
    assert by_id["s.tar"]["error_type"] == "truncated"
    assert all(r["error_type"] in ("", "truncated") for r in rows)
    assert len(by_id) == len(rows)


# ------------------------------------------------------------------ 10: samples too large to hold


class Zeros(io.RawIOBase):
    def __init__(self, n):
        self.left = n

    def readinto(self, b):
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def test_a_member_over_the_cap_is_an_error_row_and_its_bytes_are_never_held(tmp_path):
    big = 64 * 2**20
    with tarfile.open(tmp_path / "s.tar.gz", "w:gz") as tar:
        for name, size, src in (("a.jpg", len(JPEG[0]), io.BytesIO(JPEG[0])), ("big.jpg", big, Zeros(big)),
                                ("z.jpg", len(JPEG[1]), io.BytesIO(JPEG[1]))):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, src)
    assert (tmp_path / "s.tar.gz").stat().st_size < 1 << 20  # a bomb: ~64 KB holding 64 MiB
    tracemalloc.start()
    try:
        rows = {r["sample_id"]: r for r in shard_rows(tmp_path / "s.tar.gz", max_sample_bytes=4 << 20)}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows["s.tar.gz/a"]["data"] == JPEG[0] and rows["s.tar.gz/z"]["data"] == JPEG[1]
    assert rows["s.tar.gz/big"]["error_type"] == "too_large" and str(big) in rows["s.tar.gz/big"]["error_message"]
    assert peak < 8 << 20, f"peak {peak} bytes: the member was held"


def test_a_file_over_the_cap_is_an_error_row_local_or_remote(tmp_path):
    import fsspec

    write = tmp_path / "big.jpg"
    with open(write, "wb") as f:
        f.truncate(64 * 2**20)  # sparse: nothing to read, 64 MiB by its size
    (tmp_path / "ok.jpg").write_bytes(JPEG[0])
    mem = fsspec.filesystem("memory")
    mem.pipe("/edges/big.jpg", bytes(3 << 20))
    mem.pipe("/edges/ok.jpg", JPEG[1])
    plan = pa.Table.from_pylist(
        [{"sample_id": n, "uri": u, "label": "", "split": "all", "container": ""}
         for n, u in (("big.jpg", str(write)), ("ok.jpg", str(tmp_path / "ok.jpg")),
                      ("m/big.jpg", "memory:///edges/big.jpg"), ("m/ok.jpg", "memory:///edges/ok.jpg"))],
        schema=PLAN_SCHEMA)
    tracemalloc.start()
    try:
        rows = {r["sample_id"]: r for r in read_all(as_batch(plan), max_sample_bytes=1 << 20)}
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows["ok.jpg"]["data"] == JPEG[0] and rows["m/ok.jpg"]["data"] == JPEG[1]
    assert rows["big.jpg"]["error_type"] == rows["m/big.jpg"]["error_type"] == "too_large"
    assert peak < 32 << 20


def test_on_s3_an_object_over_the_cap_is_an_error_row_and_an_empty_one_is_read(s3):
    from conftest import S3_BUCKET

    fs, options = s3
    for name, data in (("big.jpg", bytes(2 << 20)), ("empty.jpg", b""), ("ok.jpg", JPEG[0])):
        fs.pipe_file(f"{S3_BUCKET}/m/{name}", data)
    plan = pa.Table.from_pylist([{"sample_id": n, "uri": f"s3://{S3_BUCKET}/m/{n}", "label": "", "split": "all",
                                  "container": ""} for n in ("big.jpg", "empty.jpg", "missing.jpg", "ok.jpg")],
                                schema=PLAN_SCHEMA)
    rows = {}
    for out in read_batch(as_batch(plan), options, rows_per_batch=8, max_sample_bytes=1 << 20):
        rows.update({sid: (out["error_type"][i], out["data"][i]) for i, sid in enumerate(out["sample_id"])})
    assert rows == {"big.jpg": ("too_large", b""), "empty.jpg": ("", b""),  # S3 refuses a range on it: 416
                    "missing.jpg": ("FileNotFoundError", b""), "ok.jpg": ("", JPEG[0])}


# ------------------------------------------------------------------ 7: reads that hang


def test_a_fifo_is_not_planned_and_a_read_that_hangs_becomes_a_timeout_row(tmp_path, monkeypatch):
    (tmp_path / "src").mkdir()
    for i in range(3):
        (tmp_path / "src" / f"{i}.jpg").write_bytes(JPEG[i])
    os.mkfifo(tmp_path / "src" / "x.jpg")
    plan = plan_source(SourceConfig(uri=str(tmp_path / "src")))
    assert plan["sample_id"].to_pylist() == ["0.jpg", "1.jpg", "2.jpg"]

    # a FIFO handed to the read stage anyway (an old plan, a race) is refused unopened ...
    fifo = pa.Table.from_pylist([{"sample_id": "x.jpg", "uri": str(tmp_path / "src" / "x.jpg"), "label": "",
                                  "split": "all", "container": c} for c in ("",)], schema=PLAN_SCHEMA)
    (row,) = read_all(as_batch(fifo), read_timeout_s=30)
    assert row["error_type"] == "not_a_file"
    # ... and as a tar shard, whose open blocks, it times out
    shard = fifo.set_column(4, "container", pa.array(["tar"]))
    t0 = time.time()
    (row,) = read_all(as_batch(shard), read_timeout_s=2)
    assert (row["sample_id"], row["error_type"]) == ("x.jpg", "timeout") and time.time() - t0 < 15

    # a read that hangs (a failpoint standing in for a hung mount) costs one row, not the batch
    monkeypatch.setenv("FEATURIZE_FAULTS", str(tmp_path))
    (tmp_path / "read.json").write_text('{"action": "hang", "match": "1.jpg"}')
    t0 = time.time()
    rows = read_all(as_batch(plan), read_timeout_s=3)
    assert time.time() - t0 < 20
    assert [(r["sample_id"], r["error_type"]) for r in rows] == [("0.jpg", ""), ("1.jpg", "timeout"), ("2.jpg", "")]
    assert "source.read_timeout_s" in rows[1]["error_message"]


# ------------------------------------------------------------------ end to end


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(180)
def test_odd_folder_end_to_end_non_utf8_names_fifo_and_links_out(tmp_path):
    src, out, outside = tmp_path / "src", tmp_path / "out", tmp_path / "outside"
    for d in (src / "cat", outside):
        d.mkdir(parents=True)
    for i in range(3):
        (src / "cat" / f"{i}.jpg").write_bytes(JPEG[i])
    with open(os.fsencode(src / "cat") + b"/bad\xff.jpg", "wb") as f:
        f.write(JPEG[3])
    os.mkfifo(src / "cat" / "x.jpg")
    (outside / "s.jpg").write_bytes(JPEG[4])
    (src / "cat" / "out.jpg").symlink_to(outside / "s.jpg")
    run(job_dict(str(src), str(out), name="e2e-odd-folder", source={"read_timeout_s": 20}))
    features, errors = assert_exactly_once(str(out), {"cat/0.jpg", "cat/1.jpg", "cat/2.jpg", "cat/bad\\xff.jpg",
                                                      "cat/out.jpg"})
    assert errors == ["cat/out.jpg"]
    assert read_errors(str(out))["error_type"].to_pylist() == ["refused"]
