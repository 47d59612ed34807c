import io
import json
import os
import posixpath
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import SourceConfig
from pipeline.errors import SourceError
from pipeline.extract.listing import walk_store
from pipeline.extract.plan import expand_braces, plan_source
from pipeline.extract.read import read_batch
from pipeline.samples import encode, photo

from conftest import S3_BUCKET

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


def test_an_object_store_folder_plans_as_the_same_local_folder_a_folder_at_a_time(tmp_path, s3, monkeypatch):
    fs, options = s3
    rels = ["n01/a.jpg", "n01/b.JPEG", "n02/c.png", "n02/deep/d.webp", "n03/notes.txt", "top.jpg"]
    for rel in rels:
        write(tmp_path / rel)
        fs.pipe(f"{S3_BUCKET}/imgs/{rel}", JPEG)
    fs.invalidate_cache()
    cached = {}  # each file listed -> the folders whose listings the store's cache held then

    def watched(fs, root):
        for entry in walk_store(fs, root):
            cached[entry.path] = sorted(k for k in fs.dircache if k.startswith(f"{S3_BUCKET}/imgs"))
            yield entry

    monkeypatch.setattr("pipeline.extract.plan.walk_store", watched)
    remote = plan_source(SourceConfig(uri=f"s3://{S3_BUCKET}/imgs", storage_options=options, split="val"))
    local = plan_source(SourceConfig(uri=str(tmp_path), split="val"))
    keep = ["sample_id", "label", "split"]
    assert remote.select(keep).to_pylist() == local.select(keep).to_pylist()
    assert remote["uri"].to_pylist() == [f"s3://{S3_BUCKET}/imgs/{i}" for i in local["sample_id"].to_pylist()]
    # a folder's listing at a time: while a file is planned the cache holds its own folder's only
    assert cached == {f"{S3_BUCKET}/imgs/{r}": [posixpath.dirname(f"{S3_BUCKET}/imgs/{r}")] for r in rels}


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
    # b, cut inside its data, is a row of its own; the shard's row says where the stream stopped
    assert list(out["sample_id"]) == ["s.tar/a", "s.tar/b", "s.tar"]
    assert list(out["error_stage"]) == ["", "read", "read"]
    assert list(out["error_type"]) == ["", "truncated", "truncated"]
    assert "inside member b.jpg" in out["error_message"][2]


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


def test_a_plan_sorted_out_of_core_in_small_batches_equals_the_in_memory_sort(tmp_path, monkeypatch):
    """Listed in batches of 2, spilled and sorted by DuckDB: the same table (values, types, order:
    UTF-8 bytes, as Arrow sorts) as the plan sorted in memory; an id listed twice is refused with
    the same message when its two rows fall in different sorted batches."""
    from pipeline.extract import plan as planning
    from pipeline.extract import planfile

    names = ["b/é.jpg", "a/Z.jpg", "a/a.jpg", "c/\U0001F600.png", "a/a b.jpg", "B/x.jpg", "a/éa.jpg", "a/e.jpg"]
    for name in names:
        write(tmp_path / "src" / name, b"")
    cfg = SourceConfig(uri=str(tmp_path / "src"))
    (tmp_path / "d.csv").write_text("uri,label\nc.jpg,1\nb.jpg,2\na.jpg,3\nb.jpg,4\n")
    dup = SourceConfig(uri=str(tmp_path / "d.csv"), format="manifest")
    in_memory = plan_source(cfg)
    with pytest.raises(SourceError) as refused:
        plan_source(dup)
    monkeypatch.setattr(planfile, "IN_MEMORY_ROWS", 0)
    monkeypatch.setattr(planfile, "BATCH_ROWS", 2)
    monkeypatch.setattr(planning, "BATCH_ROWS", 2)
    spilled = plan_source(cfg)
    assert spilled.equals(in_memory) and spilled.schema == in_memory.schema
    assert spilled["sample_id"].to_pylist() == sorted(names, key=lambda n: n.encode())
    with pytest.raises(SourceError) as refused_spilled:  # sorted a, b | b, c: the pair straddles two batches
        plan_source(dup)
    assert str(refused_spilled.value) == str(refused.value) == "sample_id 'b.jpg' appears twice in the source"


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


# ---------------------------------------------------------------- odd and hostile listings (issue 12)


def batch_of(plan):
    return {k: np.array(v, dtype=object) for k, v in plan.to_pydict().items()}


def read_rows(plan, **kw):
    rows = []
    for out in read_batch(batch_of(plan), {}, rows_per_batch=4, **kw):
        rows += [{k: out[k][i] for k in out} for i in range(len(out["sample_id"]))]
    return {r["sample_id"]: r for r in rows}


def test_names_that_are_not_utf8_are_planned_escaped_and_read_by_their_bytes(tmp_path):
    root = os.fsencode(tmp_path)
    os.makedirs(root + b"/lab\xe9l")
    for name, data in ((b"/lab\xe9l/bad\xff.jpg", JPEG), (b"/ok.jpg", JPEG[:-1] + b"\xd9")):
        with open(root + name, "wb") as f:
            f.write(data)
    plan = plan_source(SourceConfig(uri=str(tmp_path)))
    rows = plan.to_pylist()
    assert [r["sample_id"] for r in rows] == ["lab\\xe9l/bad\\xff.jpg", "ok.jpg"]
    assert rows[0]["label"] == "lab\\xe9l" and rows[0]["uri"].endswith("lab\\xe9l/bad\\xff.jpg")
    assert rows[0]["raw_path"] == root + b"/lab\xe9l/bad\xff.jpg" and rows[1]["raw_path"] is None
    pq.write_table(plan, tmp_path.parent / f"{tmp_path.name}.plan.parquet")  # every string valid UTF-8
    assert read_rows(plan)["lab\\xe9l/bad\\xff.jpg"]["data"] == JPEG

    # an escape that meets a real name spelled the same way: refused, naming both
    with open(root + b"/lab\xe9l/bad\\xff.jpg", "wb") as f:
        f.write(JPEG)
    with pytest.raises(SourceError, match="appears twice") as e:
        plan_source(SourceConfig(uri=str(tmp_path)))
    assert repr(root + b"/lab\xe9l/bad\xff.jpg") in str(e.value)
    assert repr(root + b"/lab\xe9l/bad\\xff.jpg") in str(e.value)


def test_old_plans_without_the_new_columns_still_read(tmp_path):
    write(tmp_path / "a.jpg")
    plan = plan_source(SourceConfig(uri=str(tmp_path))).select(["sample_id", "uri", "label", "split", "container"])
    assert read_rows(plan)["a.jpg"]["data"] == JPEG


def _outside_and_root(tmp_path):
    outside, root = tmp_path / "outside", tmp_path / "root"
    write(outside / "secret.jpg")
    write(outside / "dir" / "s2.jpg")
    write(root / "n01" / "a.jpg")
    (root / "n01" / "out.jpg").symlink_to(outside / "secret.jpg")  # a file link leaving the root
    (root / "n01" / "in.jpg").symlink_to(root / "n01" / "a.jpg")  # a file link inside it
    (root / "linkdir").symlink_to(outside / "dir")  # a folder link leaving the root
    (root / "again").symlink_to(root / "n01")  # a folder link inside it (its files are listed already)
    os.mkfifo(root / "n01" / "fifo.jpg")
    return outside, root


def test_folder_listing_plans_regular_files_and_refuses_links_that_leave_the_root(tmp_path):
    outside, root = _outside_and_root(tmp_path)
    plan = plan_source(SourceConfig(uri=str(root)))
    assert plan["sample_id"].to_pylist() == ["linkdir", "n01/a.jpg", "n01/in.jpg", "n01/out.jpg"]
    rows = read_rows(plan)
    assert rows["n01/a.jpg"]["data"] == rows["n01/in.jpg"]["data"] == JPEG
    for sid in ("linkdir", "n01/out.jpg"):  # error rows that say why, read never
        assert (rows[sid]["error_stage"], rows[sid]["error_type"], rows[sid]["data"]) == ("read", "refused", b"")
        assert "source.follow_symlinks" in rows[sid]["error_message"]

    followed = plan_source(SourceConfig(uri=str(root), follow_symlinks=True))["sample_id"].to_pylist()
    assert followed == ["again/a.jpg", "again/in.jpg", "again/out.jpg", "linkdir/s2.jpg",
                        "n01/a.jpg", "n01/in.jpg", "n01/out.jpg"]


class _Recorder:
    """A real HTTP server on 127.0.0.1 that notes every request it gets."""

    def __enter__(self):
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append(self.path)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(JPEG)

            do_HEAD = do_GET

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_manifest_uris_are_confined_to_the_manifest_folder_unless_allowed(tmp_path):
    outside, root = _outside_and_root(tmp_path)
    (root / "n01" / "fifo.jpg").unlink()
    with _Recorder() as http:
        uris = ["n01/a.jpg", str(root / "n01" / "a.jpg"), "n01/../n01/a.jpg",  # inside: read
                "../outside/secret.jpg", "n01/../../outside/secret.jpg", str(outside / "secret.jpg"),
                "n01/out.jpg", "/etc/shadow", "/proc/self/environ", "/no/such/file.jpg", "../nope.jpg",
                f"file://{outside}/secret.jpg", f"{http.url}/x.jpg", f"http://user:pw@127.0.0.1:{http.url.rsplit(':', 1)[1]}/y.jpg"]
        pq.write_table(pa.table({"uri": uris}), root / "m.parquet")
        plan = plan_source(SourceConfig(uri=str(root / "m.parquet"), format="manifest"))
        rows = read_rows(plan)
        assert http.seen == []  # not one request
    ok = {"n01/a.jpg", str(root / "n01" / "a.jpg"), "n01/../n01/a.jpg"}
    from pipeline.redact import redact_text

    for uri in map(redact_text, uris):  # a sample id has its URI's credentials masked (user:***@)
        if uri in ok:
            assert rows[uri]["data"] == JPEG and rows[uri]["error_type"] == ""
        else:  # one type, one message: the row tells nothing about what exists
            assert (rows[uri]["error_type"], rows[uri]["data"]) == ("refused", b""), uri
            assert rows[uri]["error_message"] == rows["/etc/shadow"]["error_message"]

    widened = SourceConfig(uri=str(root / "m.parquet"), format="manifest", allow_uris=[f"{outside}/"])
    rows = read_rows(plan_source(widened))
    for uri in ("../outside/secret.jpg", str(outside / "secret.jpg"), "n01/out.jpg", f"file://{outside}/secret.jpg"):
        assert rows[uri]["data"] == JPEG, uri
    assert rows["/etc/shadow"]["error_type"] == rows[f"{http.url}/x.jpg"]["error_type"] == "refused"


def test_source_limits_are_validated_naming_the_key():
    from pipeline.config import parse_job
    from pipeline.errors import ConfigError

    def job(**source):
        return parse_job({"name": "j", "source": {"uri": "/d", **source}, "output": {"uri": "/o"}})

    assert job().source.read_timeout_s == 120 and job().source.max_sample_bytes == "256MiB"
    assert job(max_sample_bytes="4MiB", allow_uris=["s3://b/"], follow_symlinks=True).source.follow_symlinks
    for bad, key in ((dict(read_timeout_s=0), "source.read_timeout_s"), (dict(max_sample_bytes="lots"), "source.max_sample_bytes"),
                     (dict(max_sample_bytes=0), "source.max_sample_bytes"), (dict(allow_uris=[""]), r"source.allow_uris\[0\]"),
                     (dict(follow_symlinks="yes"), "source.follow_symlinks")):
        with pytest.raises(ConfigError, match=key):
            job(**bad)


def test_split_lists_gaps_are_counted_and_kept_with_the_plan(tmp_path):
    """UCF101-style lists: a video in no list lands in split=unlisted, an entry with no file is skipped;
    both are counted in the plan's metadata, the summary and _job.json, never silently."""
    import json
    from types import SimpleNamespace

    from fsspec.implementations.local import LocalFileSystem

    from pipeline.config import SourceConfig
    from pipeline.extract.plan import plan_source, split_list_gaps
    from pipeline.output.record import Summary, format_summary, write_record
    from pipeline.output.store import parquet_bytes

    for name in ("Run/v_1.avi", "Run/v_2.avi", "Jump/v_3.avi"):
        (tmp_path / "videos" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "videos" / name).write_bytes(b"not decoded by the listing")
    (tmp_path / "train.txt").write_text("Run/v_1.avi 1\nRun/v_9.avi 1\nJump/v_8.avi 2\n")
    (tmp_path / "test.txt").write_text("Jump/v_3.avi\n")
    cfg = SourceConfig(uri=str(tmp_path / "videos"), format="video_folder",
                       split_files={"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")})
    plan = plan_source(cfg)
    assert dict(zip(plan["sample_id"].to_pylist(), plan["split"].to_pylist())) == {
        "Jump/v_3.avi": "test", "Run/v_1.avi": "train", "Run/v_2.avi": "unlisted"}
    gaps = {"unlisted": 1, "missing": 2, "first_missing": ["Jump/v_8.avi", "Run/v_9.avi"]}
    assert split_list_gaps(plan) == gaps
    assert split_list_gaps(pq.read_table(pa.BufferReader(parquet_bytes(plan)))) == gaps  # as OUT/_plan.parquet

    lines = format_summary(Summary(str(tmp_path / "out"), 3, 3, {}, 1.0, 1.0, split_lists=gaps)).splitlines()
    assert "split lists  1 videos are in no split list: written with split=unlisted" in lines
    assert "split lists  2 list entries have no video in source.uri (first: Jump/v_8.avi, Run/v_9.avi)" in lines
    ws = SimpleNamespace(previous=None, todo=plan, skipped=0, added=0, gone=0, plan=plan, fs=LocalFileSystem(),
                         root=str(tmp_path))
    write_record(ws, {"name": "ucf"}, "running", 0.0)
    assert json.loads((tmp_path / "_job.json").read_text())["counts"]["split_lists"] == gaps
    assert split_list_gaps(plan_source(SourceConfig(uri=str(tmp_path / "videos"), format="video_folder"))) == {}


def test_manifest_confinement_holds_against_encoded_dots_chains_and_backslashes(tmp_path):
    """A web client decodes `%2e%2e` and drops the `..` (GET /admin), fsspec decodes file:// paths, and
    `a::b` chains another filesystem: each would read outside an allowed prefix; none makes a request."""
    from pipeline.extract.listing import confine

    outside, root = _outside_and_root(tmp_path)
    (root / "n01" / "fifo.jpg").unlink()
    with _Recorder() as http:
        allowed = f"{http.url}/src/"
        uris = [f"{http.url}/src/%2e%2e/admin", f"{http.url}/src/%2E%2E/%2e%2e/x.jpg", f"{http.url}/src\\..\\admin",
                f"file://{root}/n01/%2e%2e/%2e%2e/outside/secret.jpg", f"simplecache::{http.url}/src/a.jpg",
                f"{http.url}/src/a\n.jpg"]
        pq.write_table(pa.table({"uri": uris}), root / "m.parquet")
        rows = read_rows(plan_source(SourceConfig(uri=str(root / "m.parquet"), format="manifest",
                                                  allow_uris=[allowed])))
        assert http.seen == []
    from pipeline.redact import redact_text

    assert {rows[redact_text(u)]["error_type"] for u in uris} == {"refused"}
    assert confine(f"{http.url}/src/a%20b.jpg", [allowed])  # an encoded name inside stays readable


def test_a_manifest_resolves_its_roots_once_not_once_a_row(tmp_path, monkeypatch):
    """Planning a manifest resolves each allowed root once (a realpath on the local disk); only the
    rows' own URIs are resolved per row."""
    from pipeline.extract import listing

    (tmp_path / "n01").mkdir()
    rows = 200
    pq.write_table(pa.table({"uri": [f"n01/{i}.jpg" for i in range(rows)]}), tmp_path / "m.parquet")
    calls = []
    realpath = os.path.realpath
    monkeypatch.setattr(listing.os.path, "realpath", lambda p: calls.append(p) or realpath(p))
    cfg = SourceConfig(uri=str(tmp_path / "m.parquet"), format="manifest", allow_uris=[str(tmp_path / "more")])
    plan = plan_source(cfg)
    assert len(plan) == rows and set(plan["refused"].to_pylist()) == {""}
    roots = [p for p in calls if not p.endswith(".jpg")]
    assert len(roots) == 2, roots  # the manifest's folder and the one allowed root, once each
    assert len(calls) == rows + 2


def old_plan(cfg):
    """The plan as planning made it before it streamed into Arrow: every row a dict, masked with
    public_row, sorted in Python, one from_pylist (the reference for the batched plan)."""
    from pipeline.extract.plan import _LISTERS, PLAN_SCHEMA
    from pipeline.redact import public_row

    rows = sorted((public_row(r) for r in _LISTERS[cfg.format](cfg)), key=lambda r: r["sample_id"])
    return pa.Table.from_pylist(rows, schema=PLAN_SCHEMA)


def test_a_large_manifest_is_planned_in_batches_sorted_and_as_the_row_by_row_plan(tmp_path, monkeypatch):
    from pipeline.extract import plan as planning
    from pipeline.extract.listing import REFUSED_URI

    monkeypatch.setattr(planning, "BATCH_ROWS", 4096)  # 50k rows: 13 record batches
    n = 50_000
    rng = np.random.default_rng(0)
    uris = [f"c{i % 97:02d}/{i}.jpg" for i in rng.permutation(n)]
    uris[7] = "/etc/passwd"  # outside the manifest's folder: planned refused
    uris[8] = "https://user:secret@example.com/a.jpg?X-Amz-Signature=abc"  # masked; real one kept aside
    labels = [None if i % 5 == 0 else f"l{i % 7}" for i in range(n)]
    pq.write_table(pa.table({"uri": uris, "label": labels, "split": ["train", "val"] * (n // 2)}),
                   tmp_path / "m.parquet")
    cfg = SourceConfig(uri=str(tmp_path / "m.parquet"), format="manifest")
    plan = plan_source(cfg)
    assert plan.equals(old_plan(cfg), check_metadata=True) and len(plan) == n
    ids = plan["sample_id"].to_pylist()
    assert ids == sorted(ids) and len(set(ids)) == n
    by_id = {r["sample_id"]: r for r in plan.to_pylist()}
    assert by_id["/etc/passwd"]["refused"] == REFUSED_URI
    masked = "https://user:***@example.com/a.jpg?X-Amz-Signature=***"
    assert by_id[masked]["uri"] == masked and by_id[masked]["fetch_uri"] == uris[8]
    assert by_id[uris[0]]["refused"] == "" and by_id[uris[0]]["uri"] == f"file://{tmp_path}/{uris[0]}"

    # one id twice, in the first and the last batch: refused by name
    pq.write_table(pa.table({"uri": uris[:-1] + [uris[0]]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError, match=f"^sample_id '{uris[0]}' appears twice in the source$"):
        plan_source(cfg)


def test_a_plan_of_one_row_and_a_csv_manifest_of_only_a_header(tmp_path):
    (tmp_path / "one.csv").write_text("uri,label\na.jpg,x\n")
    plan = plan_source(SourceConfig(uri=str(tmp_path / "one.csv"), format="manifest"))
    assert plan["sample_id"].to_pylist() == ["a.jpg"] and plan["label"].to_pylist() == ["x"]
    (tmp_path / "none.csv").write_text("uri,label\n")
    with pytest.raises(SourceError, match="no manifest samples found"):
        plan_source(SourceConfig(uri=str(tmp_path / "none.csv"), format="manifest"))
