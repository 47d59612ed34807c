"""Pages read a hit's URI only under the table's own source or a prefix the user allows (pipeline/pages/allowed.py).

A real HTTP server on 127.0.0.1 counts the requests a page makes; tables are written with pyarrow
(tests/tables.py) and their `uri` column rewritten; no Ray.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import os
import tarfile
import threading
from typing import List, Tuple
from urllib.parse import unquote

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.pages import dedup_page, search_page, thumbnails
from pipeline.pages.allowed import NOT_READ, page_roots, readable
from pipeline.samples import encode, photo

from tables import write_table

NOT_READ_WORDS = "not read: outside the source"


class Counting(http.server.BaseHTTPRequestHandler):
    """Answers every request (a PNG for /internal.png; /src/redirect* redirects there) and records it."""

    seen: List[Tuple[str, str]] = []
    png = encode(photo(64, 48, 7), "PNG")

    def _answer(self, body: bool) -> None:
        self.seen.append((self.command, self.path))
        if self.path.startswith("/src/redirect"):
            self.send_response(302)
            self.send_header("Location", "/internal.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = self.png if self.path.startswith("/internal.png") else b"deleted"
        self.send_response(200)
        self.send_header("Content-Type", "image/png" if data is self.png else "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_GET(self):  # noqa: N802 - http.server's name
        self._answer(True)

    def do_HEAD(self):  # noqa: N802
        self._answer(False)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """(the server's base URL, the list of requests it saw)."""
    Counting.seen = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Counting)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", Counting.seen
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def disk(tmp_path):
    """A source folder with images (one a symlink to a private image outside it), the private
    image, and a tar shard outside the source."""
    src, private = tmp_path / "src", tmp_path / "private"
    (src / "cat").mkdir(parents=True)
    private.mkdir()
    (src / "cat" / "a.jpg").write_bytes(encode(photo(200, 100, 0)))
    (private / "secret.jpg").write_bytes(encode(photo(120, 120, 1)))
    os.symlink(private / "secret.jpg", src / "cat" / "link.jpg")
    with tarfile.open(private / "shard.tar", "w") as tar:
        data = encode(photo(50, 50, 2))
        info = tarfile.TarInfo("k/0001.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return src, private


def is_jpeg(src: str) -> bool:
    if not src.startswith("data:image/jpeg;base64,"):
        return False
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
        img.load()
    return True


def said(src: str) -> str:
    return unquote(src.split(",", 1)[1]) if src.startswith("data:image/svg+xml") else ""


def table_with(root, uris: List[str], source: dict, x=None) -> str:
    """OUT with one row per URI (vectors `x`, default random) and a _job.json naming `source`."""
    n = len(uris)
    x = np.random.default_rng(0).normal(size=(n, 8)) if x is None else x
    write_table(str(root), ["train"] * n, ["c"] * n, feature=x, rows_per_file=64)
    for path in pq.ParquetDataset(str(root / "features")).files:
        t = pq.read_table(path)
        mapped = [uris[int(s[1:])] for s in t["sample_id"].to_pylist()]
        pq.write_table(t.set_column(t.column_names.index("uri"), "uri", [mapped]), path)
    (root / "_job.json").write_text(json.dumps({"name": "t", "status": "complete", "config": {"source": source}}))
    return str(root)


def hostile(base: str, src, private) -> List[str]:
    return [f"{base}/internal.png", f"{base}/admin?delete=1", "file:///etc/passwd", "/proc/self/environ",
            "s3://other-bucket/x.jpg", "http://169.254.169.254/latest/meta-data", str(private / "secret.jpg"),
            f"{src}/../private/secret.jpg", f"file://{src}/cat/../../private/secret.jpg", str(src / "cat" / "link.jpg"),
            f"{private}/shard.tar#k/0001", f"file://{src}/%2e%2e/private/secret.jpg"]


def test_a_table_pointing_elsewhere_gets_placeholders_and_no_request(server, disk, tmp_path):
    base, seen = server
    src, private = disk
    bad = hostile(base, src, private)
    inside = [str(src / "cat" / "a.jpg"), f"file://{src}/cat/a.jpg", f"{src}/cat/../cat/a.jpg"]
    out = table_with(tmp_path / "out", inside + bad, {"uri": str(src), "format": "image_folder"})
    hits = [{"rank": i + 1, "sample_id": f"s{i:05d}", "score": 1.0, "label": "c", "uri": u}
            for i, u in enumerate(inside + bad)]
    query = {"kind": "id", "value": "s00003", "uri": bad[0]}  # a row's uri: confined like the hits
    html = search_page(query, hits, table=out)
    images = [a for a in html.split('src="')[1:]]
    images = [unquote(s.split('"', 1)[0]).replace("&amp;", "&") for s in images]
    assert len(images) == 1 + len(hits)
    assert NOT_READ_WORDS in said(images[0])
    assert all(is_jpeg(s) for s in images[1:4])  # inside the source: read, however written
    assert all(NOT_READ_WORDS in said(s) for s in images[4:]), [said(s)[:200] for s in images[4:]]
    groups = {"group": [0] * len(hits), "sample_id": [h["sample_id"] for h in hits], "uri": inside + bad,
              "label": ["c"] * len(hits), "split": ["train"] * len(hits), "score": [1.0] * len(hits)}
    import pyarrow as pa

    dedup = dedup_page(pa.table(groups), table=out)
    assert dedup.count("data:image/jpeg") == 3 and dedup.count("not%20read%3A%20outside%20the%20source") == len(bad)
    assert seen == []  # not a HEAD, not a GET


def test_allow_uris_reads_that_prefix_only(server, disk, tmp_path):
    base, seen = server
    src, _ = disk
    out = table_with(tmp_path / "out", [f"{base}/internal.png"], {"uri": str(src), "format": "image_folder"})
    items = [(f"{base}/internal.png", None), (f"{base}/admin?delete=1", None), ("http://127.0.0.2:9/x.png", None)]
    got = thumbnails(items, roots=page_roots(out, {}, [f"{base}/internal.png"]))
    assert is_jpeg(got[0]) and NOT_READ_WORDS in said(got[1]) and NOT_READ_WORDS in said(got[2])
    assert {p for _, p in seen} == {"/internal.png"}
    seen.clear()
    got = thumbnails(items[:2], roots=page_roots(None, {}, [f"{base}/"]))
    assert is_jpeg(got[0]) and not is_jpeg(got[1]) and NOT_READ_WORDS not in said(got[1])  # read: not an image
    assert {p for _, p in seen} == {"/internal.png", "/admin?delete=1"}


def test_a_server_inside_the_roots_cannot_redirect_a_read_outside(server):
    base, seen = server
    got = thumbnails([(f"{base}/src/redirect.png", None)], roots=page_roots(None, {}, [f"{base}/src/"]))
    assert not is_jpeg(got[0]) and seen and all(path == "/src/redirect.png" for _, path in seen)
    seen.clear()
    assert is_jpeg(thumbnails([(f"{base}/src/redirect.png", None)])[0])  # unconfined (the caller's own URI)
    assert ("GET", "/internal.png") in seen


def test_search_and_dedup_html_from_the_cli(server, disk, tmp_path, capsys):
    base, seen = server
    src, private = disk
    x = np.repeat(np.random.default_rng(1).normal(size=(2, 8)), 2, axis=0)  # two pairs of duplicates
    uris = [f"{base}/internal.png", f"{base}/admin?delete=1", str(src / "cat" / "a.jpg"), str(private / "secret.jpg")]
    out = table_with(tmp_path / "out", uris, {"uri": str(src), "format": "image_folder"}, x=x)
    assert main(["index", out]) == 0
    page, dups = tmp_path / "search.html", tmp_path / "dups.html"
    assert main(["search", out, "--id", "s00002", "-k", "4", "--html", str(page)]) == 0
    assert main(["dedup", out, "--html", str(dups)]) == 0
    for html, jpegs in ((page.read_text(), 2), (dups.read_text(), 1)):
        assert html.count("data:image/jpeg") == jpegs  # a.jpg, the only row inside the source (and the query)
        assert html.count("not%20read%3A%20outside%20the%20source") == 3
    assert seen == []
    assert main(["search", out, "--id", "s00002", "-k", "4", "--html", str(page), "--allow-uris", f"{base}/",
                 "--allow-uris", str(private)]) == 0
    assert page.read_text().count("data:image/jpeg") == 4  # query a.jpg, a.jpg, secret.jpg, internal.png (not /admin)
    assert ("GET", "/internal.png") in seen
    assert main(["dedup", out, "--html", str(dups), "--allow-uris", f"{base}/internal.png"]) == 0
    assert dups.read_text().count("data:image/jpeg") == 2
    capsys.readouterr()


def test_an_apply_table_reads_under_its_source_tables_source(disk, tmp_path):
    src, private = disk
    first = table_with(tmp_path / "first", [str(src / "cat" / "a.jpg")], {"uri": str(src), "format": "image_folder"})
    applied = tmp_path / "applied"
    applied.mkdir()
    (applied / "_job.json").write_text(json.dumps({"name": "apply-h", "kind": "apply", "input": {"uri": first}}))
    assert page_roots(str(applied)) == [str(src)]
    again = tmp_path / "again"  # applied to an apply table
    again.mkdir()
    (again / "_job.json").write_text(json.dumps({"kind": "apply", "settings": {"apply.input": str(applied)}}))
    got = thumbnails([(str(src / "cat" / "a.jpg"), None), (str(private / "secret.jpg"), None)],
                     roots=page_roots(str(again)))
    assert is_jpeg(got[0]) and NOT_READ_WORDS in said(got[1])
    loop = tmp_path / "loop"  # an apply table that names itself: no source, no endless walk
    loop.mkdir()
    (loop / "_job.json").write_text(json.dumps({"kind": "apply", "input": {"uri": str(loop)}}))
    assert page_roots(str(loop)) == [] and page_roots(str(tmp_path / "nothing")) == []


def test_shards_and_manifests_roots(disk, tmp_path):
    src, private = disk
    with tarfile.open(src / "shard-000.tar", "w") as tar:
        data = encode(photo(40, 40, 3))
        info = tarfile.TarInfo("k/0002.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    shards = {"uri": f"{src}/shard-{{000..001}}.tar", "format": "webdataset"}
    out = table_with(tmp_path / "wds", [f"{src}/shard-000.tar#k/0002"], shards)
    got = thumbnails([(f"{src}/shard-000.tar#k/0002", None), (f"{private}/shard.tar#k/0001", None)],
                     roots=page_roots(out))
    assert is_jpeg(got[0]) and NOT_READ_WORDS in said(got[1])
    manifest = {"uri": f"{src}/cat/list.csv", "format": "manifest", "allow_uris": [f"{private}/shard.tar"]}
    out = table_with(tmp_path / "man", [str(src / "cat" / "a.jpg")], manifest)
    roots = page_roots(out)
    assert readable(str(src / "cat" / "a.jpg"), roots) and readable(f"{private}/shard.tar", roots)
    assert not readable(str(private / "secret.jpg"), roots) and not readable(str(src / "x.jpg"), roots)
    assert page_roots(None, {}, ["s3://b/p/"]) == ["s3://b/p/"]


@pytest.mark.parametrize("uri", [
    "http://h:1/src/%2e%2e/admin", "http://h:1/src/.%2E/admin", "http://h:1/src/..%2fadmin", "http://h:1/src/../admin",
    "http://h:2/src/x.png", "https://h:1/src/x.png", "http://h:1/srcfoo/x.png", "http://h:1/src/x.png::s3://b/k",
    "http://h:1/src/..\\admin", "http://h:1/src/x\n.png", "http://other/src/x.png", "s3://h:1/src/x.png", ""])
def test_readable_compares_normalised_uris(uri):
    assert not readable(uri, ["http://h:1/src/"])


def test_readable_accepts_what_lies_under_a_root():
    roots = ["http://h:1/src/", "s3://bucket/data"]
    for uri in ("http://h:1/src/x.png", "http://user:pw@H:1/src/a/../b.png?x=1", "s3://bucket/data/a/b.jpg",
                "s3://bucket/data"):
        assert readable(uri, roots), uri
    assert not readable("s3://bucket/database/x", roots) and not readable("s3://other-bucket/data/x", roots)
    assert not readable("http://h:1/src/x.png", [])


def test_a_video_thumbnail_opens_nothing_its_bytes_name(server, tmp_path):
    """An HLS playlist or concat list saved as .mp4 (PyAV is told no protocol at all: defence in depth)."""
    base, seen = server
    src = tmp_path / "src"
    src.mkdir()
    (src / "hls.mp4").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{base}/seg.ts\n#EXT-X-ENDLIST\n")
    (src / "cat.mp4").write_text(f"ffconcat version 1.0\nfile '{base}/c.mp4'\n")
    got = thumbnails([(str(src / "hls.mp4"), None), (str(src / "cat.mp4"), None)], roots=[str(src)])
    assert not any(is_jpeg(g) for g in got) and seen == []


def test_not_read_is_the_placeholder_text():
    assert NOT_READ.startswith(NOT_READ_WORDS)


def test_a_table_on_an_object_store_reads_its_own_bucket_prefix_only(s3, tmp_path):
    fs, options = s3
    bucket = "featurize-e2e"
    fs.pipe(f"{bucket}/img/a.jpg", encode(photo(80, 40, 5)))
    fs.pipe(f"{bucket}/private/b.jpg", encode(photo(80, 40, 6)))
    fs.pipe(f"{bucket}/out/_job.json", json.dumps({"config": {"source": {"uri": f"s3://{bucket}/img"}}}).encode())
    roots = page_roots(f"s3://{bucket}/out", options)
    assert roots == [f"s3://{bucket}/img"]
    got = thumbnails([(f"s3://{bucket}/img/a.jpg", None), (f"s3://{bucket}/private/b.jpg", None),
                      (f"s3://{bucket}/img/../private/b.jpg", None), ("s3://other-bucket/img/a.jpg", None)],
                     options, roots=roots)
    assert is_jpeg(got[0]) and all(NOT_READ_WORDS in said(g) for g in got[1:])
