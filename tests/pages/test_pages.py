"""The pictures: thumbnails, the search and duplicate pages, and `featurize report` (pipeline/pages).

Tables are written directly with pyarrow (tests/tables.py); no Ray. One test opens the pages in a
real headless Chromium, skipped where none is installed.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import zlib
from html.parser import HTMLParser
from typing import Dict, List
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.output.store import parquet_bytes
from pipeline.pages import dedup_page, search_page, thumbnail, thumbnails, write_report
from pipeline.samples import encode, encode_video, photo

from tables import write_table

VOID = {"meta", "img", "br", "hr", "input", "link", "source", "area", "base", "col", "embed", "wbr"}
SECRET = "hunter2pass"
SIGNATURE = "deadbeefSIG0123"


class Page(HTMLParser):
    """Parses a page, checking that every tag closes in order, and collects what a test looks at."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.stack: List[str] = []
        self.tags: List[str] = []
        self.attrs: List[Dict[str, str]] = []
        self.text: List[str] = []
        self.errors: List[str] = []
        self.feed(html)
        self.close()
        assert not self.errors, self.errors
        assert not self.stack, f"unclosed tags {self.stack}"
        assert self.tags[:1] == ["html"] and "head" in self.tags and "body" in self.tags

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs.append({"tag": tag, **{k: v or "" for k, v in attrs}})
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)

    @property
    def images(self) -> List[str]:
        return [a["src"] for a in self.attrs if a["tag"] == "img"]


def self_contained(html: str) -> Page:
    page = Page(html)
    assert not {"script", "link", "iframe", "object", "embed"} & set(page.tags)
    for a in page.attrs:
        for name in ("src", "href", "srcset", "action"):
            if name in a:
                assert a[name].startswith("data:"), f"{a['tag']} {name}={a[name][:60]}"
    assert "url(" not in html and "@import" not in html  # no CSS fetch either
    return page


def jpeg_size(src: str):
    assert src.startswith("data:image/jpeg;base64,"), src[:80]
    with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
        assert img.format == "JPEG"
        return img.size


def reason(src: str) -> str:
    assert src.startswith("data:image/svg+xml"), src[:80]
    return unquote(src.split(",", 1)[1])


def _bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (the IHDR rewritten, its CRC too)."""
    png = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    png[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")
    return bytes(png)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Images (one rotated by EXIF), a video, a tar shard, a broken file and a decompression bomb."""
    root = tmp_path_factory.mktemp("media")
    files = {"wide.jpg": encode(photo(400, 200, 0)), "tall.png": encode(photo(90, 300, 1), "PNG"),
             "broken.jpg": b"\xff\xd8 not really a jpeg"}
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned a quarter: 300 wide -> 150 wide, 300 tall
    files["rotated.jpg"] = encode(photo(300, 150, 2), exif=exif.tobytes())
    files["bomb.png"] = _bomb(30000, 30000)
    files["clip.avi"] = encode_video(50, 160, 120)  # 2 s at 25 fps
    for name, data in files.items():
        (root / name).write_bytes(data)
    with tarfile.open(root / "shard-000.tar", "w") as tar:
        for name, data in [("a/0001.jpg", encode(photo(200, 200, 3))), ("a/0001.cls", b"cat"),
                           ("a/0002.png", encode(photo(100, 50, 4), "PNG")), ("a/0003.avi", files["clip.avi"])]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def test_thumbnails_of_images_paths_and_file_uris(media):
    assert jpeg_size(thumbnail(str(media / "wide.jpg"))) == (160, 80)
    assert jpeg_size(thumbnail(f"file://{media}/tall.png", size=100)) == (30, 100)
    assert jpeg_size(thumbnail(str(media / "rotated.jpg"))) == (80, 160)  # as displayed (EXIF)


def test_thumbnails_of_videos_tar_members_and_failures(media):
    middle, start = thumbnail(str(media / "clip.avi")), thumbnail(str(media / "clip.avi"), start_s=0.0)
    assert jpeg_size(middle) == jpeg_size(start) == (160, 120)
    assert middle != start  # the frames drift with time: the middle is not the first
    shard = f"{media}/shard-000.tar"
    got = thumbnails([(f"{shard}#a/0001", None), (f"{shard}#a/0002", None), (f"{shard}#a/0003", 0.5),
                      (f"{shard}#a/0999", None)])
    assert [jpeg_size(g) for g in got[:3]] == [(160, 160), (100, 50), (160, 120)]  # never enlarged
    assert "not found" in reason(got[3])
    assert "FileNotFoundError" in reason(thumbnail(str(media / "missing.jpg")))
    assert "cannot identify image file" in reason(thumbnail(str(media / "broken.jpg")))
    assert "decompression bomb" in reason(thumbnail(str(media / "bomb.png")))
    assert "no URI" in reason(thumbnail(""))


def test_a_read_that_hangs_gets_a_placeholder_in_time(media, monkeypatch):
    import importlib
    import threading

    module = importlib.import_module("pipeline.pages.thumbnails")  # the package's `thumbnails` is the function

    release = threading.Event()
    real = module.thumbnail

    def slow(uri, *args):
        if "tall" in uri:
            release.wait(30)  # a store that does not answer
        return real(uri, *args)

    monkeypatch.setattr(module, "thumbnail", slow)
    got = thumbnails([(f"{media}/wide.jpg", None), (f"{media}/tall.png", None)], timeout_s=1.0)
    release.set()
    assert jpeg_size(got[0]) == (160, 80) and "not read within 1 s" in reason(got[1])


def _hits(media) -> List[Dict]:
    hits = [{"rank": 1, "sample_id": "wide.jpg", "score": 0.99, "label": "<script>alert(1)</script>",
             "uri": f"file://{media}/wide.jpg", "split": "train"},
            {"rank": 2, "sample_id": "missing.jpg", "score": 0.8, "label": "dog & cat", "uri": f"{media}/missing.jpg",
             "split": "train"},
            {"rank": 3, "sample_id": "clip.avi", "score": 0.7, "label": "v", "uri": f"{media}/clip.avi",
             "split": "val", "start_s": 1.0, "end_s": 2.0},
            {"rank": 4, "sample_id": "shard-000.tar/a/0002", "score": 0.5, "label": "x",
             "uri": f"{media}/shard-000.tar#a/0002", "split": "train"}]
    return hits


def test_search_page_is_valid_self_contained_and_shows_every_hit(media):
    html = search_page({"kind": "image", "value": "tall.png", "uri": f"{media}/tall.png"}, _hits(media),
                       allow_uris=[str(media)])
    page = self_contained(html)
    assert "http://" not in html and "https://" not in html
    images = page.images
    assert len(images) == 1 + 4
    assert jpeg_size(images[0]) == (48, 160)  # the query first
    assert jpeg_size(images[1]) == (160, 80)
    assert "FileNotFoundError" in reason(images[2])
    assert jpeg_size(images[3]) == (160, 120) and jpeg_size(images[4]) == (100, 50)
    text = "".join(page.text)
    assert "<script>alert(1)</script>" in text and "dog & cat" in text  # shown as text, escaped in the source
    assert "0.9900" in text and "shard-000.tar/a/0002" in text and "1.00" in text and "2.00 s" in text
    assert search_page({"kind": "text", "value": "a red car", "uri": None}, []).count("<img") == 0


def test_no_secret_of_a_uri_reaches_a_page(media):
    uri = f"https://user:{SECRET}@127.0.0.1:9/b/x.jpg?X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKIAXYZ"
    hits = [{"rank": 1, "sample_id": "x.jpg", "score": 1.0, "label": "a", "uri": uri, "split": "train"}]
    groups = pa.table({"group": pa.array([0, 0], pa.int64()), "sample_id": ["x.jpg", "y.jpg"], "uri": [uri, uri],
                       "label": ["a", "a"], "split": ["train", "train"], "score": pa.array([1.0, 0.97], pa.float32())})
    allowed = ["https://127.0.0.1:9/b/"]  # read (and fail: nothing listens there), so the error is shown
    for html in (search_page({"kind": "id", "value": "x.jpg", "uri": uri}, hits, allow_uris=allowed),
                 dedup_page(groups, allow_uris=allowed)):
        self_contained(html)
        decoded = html + "".join(unquote(s) for s in Page(html).images)
        assert SECRET not in decoded and SIGNATURE not in decoded and "AKIAXYZ" not in decoded
        assert "user:***@" in html


def test_dedup_page_rows_of_thumbnails(media):
    uris = [f"{media}/wide.jpg", f"{media}/rotated.jpg", f"{media}/tall.png", f"{media}/missing.jpg",
            f"{media}/wide.jpg", f"{media}/tall.png"]
    groups = pa.table({"group": pa.array([0, 0, 1, 1, 2, 2], pa.int64()), "sample_id": [f"s{i}" for i in range(6)],
                       "uri": uris, "label": list("aabbcc"), "split": ["train"] * 6,
                       "score": pa.array([1.0, 0.98, 1.0, 0.96, 1.0, 0.95], pa.float32())})
    page = self_contained(dedup_page(groups, max_groups=2, allow_uris=[str(media)]))
    assert len(page.images) == 4  # the first two groups
    assert [jpeg_size(s) for s in page.images[:3]] == [(120, 60), (60, 120), (36, 120)]
    assert "FileNotFoundError" in reason(page.images[3])
    text = "".join(page.text)
    assert "group 0: 2 samples" in text and "showing the first 2 of 3 groups" in text and "0.9600" in text
    pq.write_table(groups, media / "groups.parquet")  # or the table's file
    assert dedup_page(str(media / "groups.parquet"), max_groups=2, allow_uris=[str(media)]).count("<img") == 4
    assert "no near-duplicates" in dedup_page(groups.slice(0, 0))


def _job(progress=True, kind=None) -> Dict:
    stages = {"stages": {"read": {"busy_s": 0.5, "workers": 2, "samples_per_s": 800.0, "busy_share": 0.05},
                         "model": {"busy_s": 6.0, "workers": 1, "samples_per_s": 70.0, "busy_share": 0.6}},
              "bound": "model", "suggestion": "the model bounds the run"}
    runs = [{"started_at": "2026-01-01T10:00:00Z", "status": "failed", "todo": 120, "error": "KeyboardInterrupt: "},
            {"started_at": "2026-01-01T10:05:00Z", "status": "complete", "finished_at": "2026-01-01T10:05:12Z",
             "samples": 120, "features": 117, "errors": 3}]
    if progress:
        runs[-1]["progress"] = [[0.0, 0], [2.5, 16], [5.0, 64], [9.0, 120]]
    record = {"name": "tiny", "status": "complete", "counts": {"planned": 120, "features": 117, "errors": 3},
              "timings": {"wall_s": 9.0, "startup_s": 3.0, "samples_per_s": 13.3, "steady_samples_per_s": 16.0},
              "stages": {} if kind else stages, "runs": runs, "finished_at": "2026-01-01T10:05:12Z"}
    return {**record, "kind": kind} if kind else record


def _table(root, column="feature", n=120, name="tiny") -> str:
    rng = np.random.default_rng(0)
    labels = [f"class{i % 3}" for i in range(n)]
    x = rng.normal(0, 1, (n, 16)) + np.eye(16)[[i % 3 for i in range(n)]] * 6  # three clusters
    write_table(str(root), ["train"] * (n // 2) + ["val"] * (n - n // 2), labels, feature=x, name=name)
    if column != "feature":  # a video table: clip_<head> columns
        for path in pq.ParquetDataset(str(root / "features")).files:
            t = pq.read_table(path)
            t = t.rename_columns([column if c == "feature" else c for c in t.column_names])
            t = t.append_column("clip_attn", t[column])
            pq.write_table(t, path)
    errors = pa.table({"sample_id": ["a/1.jpg", "a/2.jpg", "b/3.jpg"],
                       "uri": [f"s3://b/a/{i}.jpg" for i in range(3)], "stage": ["decode", "decode", "read"],
                       "error_type": ["DecodeError", "DecodeError", "OSError"],
                       "message": ["empty file (0 bytes)", "truncated",
                                   f"https://u:{SECRET}@host/b/3.jpg?X-Amz-Signature={SIGNATURE}: 403"],
                       "attempts": pa.array([1, 1, 3], pa.int32())})
    (root / "errors").mkdir(exist_ok=True)
    (root / "errors" / "part-0.parquet").write_bytes(parquet_bytes(errors))
    return str(root)


def _pngs(page: Page) -> List[tuple]:
    sizes = []
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as img:
            assert img.format == "PNG" and np.asarray(img.convert("L")).std() > 5  # not blank
            sizes.append(img.size)
    return sizes


def test_report_of_a_table_has_the_four_sections(tmp_path):
    out = _table(tmp_path / "out")
    (tmp_path / "out" / "_job.json").write_text(json.dumps(_job()))
    assert write_report(out) == f"{out}/_report.html"
    html = (tmp_path / "out" / "_report.html").read_text()
    page = self_contained(html)
    ids = [a.get("id") for a in page.attrs if a["tag"] == "h2"]
    assert ids == ["time", "errors", "norms", "projection"]
    assert len(_pngs(page)) == 4  # stages, throughput, norms, projection
    text = "".join(page.text)
    assert "the model bounds the run" in text and "not recorded" not in text
    assert "decode/DecodeError" in text and "a/1.jpg: empty file (0 bytes)" in text and "read/OSError" in text
    assert "120 rows sampled" in text and "coloured by label (3 labels)" in text and "column feature" in text
    assert SECRET not in html and SIGNATURE not in html


def test_report_of_an_apply_table_without_series_and_a_clip_column(tmp_path):
    out = _table(tmp_path / "out", column="clip_mean", name="apply-lstm")
    (tmp_path / "out" / "_job.json").write_text(json.dumps(_job(progress=False, kind="apply")))
    target = tmp_path / "elsewhere" / "r.html"
    assert main(["report", out, "--out", str(target)]) == 0
    page = self_contained(target.read_text())
    text = "".join(page.text)
    assert "not recorded for this apply" in text and "not recorded for this run" in text
    assert "column clip_mean (the table's vector columns: clip_mean, clip_attn)" in text
    assert len(_pngs(page)) == 3  # the runs' start and end instead of a series; norms; projection
    assert not os.path.exists(os.path.join(out, "_report.html"))


def test_report_of_errors_only_and_the_refusals(tmp_path, capsys):
    out = tmp_path / "out"
    _table(out)
    shutil.rmtree(out / "features")
    (out / "_job.json").unlink()
    assert main(["report", str(out)]) == 0
    page = self_contained((out / "_report.html").read_text())
    assert "no features table" in "".join(page.text) and "decode/DecodeError" in "".join(page.text)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no featurize output there" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()
    assert main(["report", str(out), "--storage-options", "{not json"]) == 2
    assert main(["report", str(out), "--out", str(out / "errors" / "part-0.parquet" / "x.html")]) == 2  # cannot be written


def test_report_and_thumbnails_on_an_object_store(tmp_path, s3, media):
    fs, options = s3
    local = _table(tmp_path / "out")
    (tmp_path / "out" / "_job.json").write_text(json.dumps(_job()))
    fs.put(local + "/", "featurize-e2e/out/", recursive=True)
    fs.put(str(media / "wide.jpg"), "featurize-e2e/img/wide.jpg")
    assert write_report("s3://featurize-e2e/out", options) == "s3://featurize-e2e/out/_report.html"
    assert len(_pngs(Page(fs.cat_file("featurize-e2e/out/_report.html").decode()))) == 4
    assert jpeg_size(thumbnail("s3://featurize-e2e/img/wide.jpg", options)) == (160, 80)
    html = fs.cat_file("featurize-e2e/out/_report.html").decode()
    assert options["secret"] not in html and options["key"] not in html


def test_progress_series_is_bounded_and_cumulative():
    from pipeline.jobrun import progress_series

    commits = [(100.0 + i * 0.5, 3) for i in range(1000)][::-1]  # any order, as write tasks end
    series = progress_series(commits, started=99.0)
    assert len(series) == 300 and series[0] == [0.0, 0] and series[-1] == [500.5, 3000]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(series, series[1:]))
    assert progress_series([(5.0, 2)], 4.0) == [[0.0, 0], [1.0, 2]] and progress_series([], 0.0) == []


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_pages_open_in_a_headless_browser(tmp_path, media):
    out = _table(tmp_path / "out")
    (tmp_path / "out" / "_job.json").write_text(json.dumps(_job()))
    write_report(out)
    search = tmp_path / "search.html"
    search.write_text(search_page({"kind": "image", "value": "tall.png", "uri": f"{media}/tall.png"}, _hits(media),
                                  allow_uris=[str(media)]))
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run(browser + ["--window-size=1000,1800", f"--screenshot={shot}", f"file://{out}/_report.html"],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("L"))
    assert img.size == (1000, 1800) and pixels.std() > 20  # charts and text, not a blank page
    dom = subprocess.run(browser + ["--dump-dom", f"file://{search}"], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    page = Page(dom)  # what the browser built from it: every image still there, no script
    assert len([s for s in page.images if s.startswith("data:image/jpeg")]) == 4 and len(page.images) == 5


def test_report_charts_draw_names_as_plain_text(tmp_path):
    """Stage, run, column and label names with mathtext and TeX in them: matplotlib would parse
    `$...$` (and fail on `cost$_$model`); every chart still renders."""
    root = tmp_path / "out"
    n, names = 60, ["cost$_$model", "$\\undefined{$", "a_b^c{d}$$", "\\", "{}}{"]
    x = np.random.default_rng(0).normal(0, 1, (n, 8)) + np.eye(8)[[i % 5 for i in range(n)]] * 6
    write_table(str(root), ["train"] * n, [names[i % 5] for i in range(n)], feature=x)
    for path in pq.ParquetDataset(str(root / "features")).files:  # the vector column's name too
        t = pq.read_table(path)
        pq.write_table(t.rename_columns(["clip_$_$" if c == "feature" else c for c in t.column_names]), path)
    job = _job()
    job["stages"]["stages"] = {name: dict(job["stages"]["stages"]["model"]) for name in names}
    job["stages"]["bound"] = names[0]
    job["runs"][-1]["started_at"] = "$_$"
    job["runs"][0].update(progress=[[0.0, 0], [1.0, 5]], started_at="x^{")
    (root / "_job.json").write_text(json.dumps(job))
    write_report(str(root))
    page = self_contained((root / "_report.html").read_text())
    assert len(_pngs(page)) == 4
    assert "column clip_$_$" in "".join(page.text) and "coloured by label (5 labels)" in "".join(page.text)
