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
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.output.store import parquet_bytes
from pipeline.pages import build_report, dedup_page, search_page, thumbnail, thumbnails, write_report
from pipeline.samples import encode, encode_video, photo

from tables import apply_metadata, run_metadata, write_table

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


def _table(root, column="feature", n=120, name="tiny", metadata=None) -> str:
    rng = np.random.default_rng(0)
    labels = [f"class{i % 3}" for i in range(n)]
    x = rng.normal(0, 1, (n, 16)) + np.eye(16)[[i % 3 for i in range(n)]] * 6  # three clusters
    write_table(str(root), ["train"] * (n // 2) + ["val"] * (n - n // 2), labels, feature=x, name=name,
                metadata=metadata)
    if column != "feature":  # a video table: clip_<head> columns
        for path in pq.ParquetDataset(str(root / "features")).files:
            t = pq.read_table(path)
            renamed = t.rename_columns([column if c == "feature" else c for c in t.column_names])
            t = renamed.replace_schema_metadata(t.schema.metadata).append_column("clip_attn", renamed[column])
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


# ---------------------------------------------------------------- what made the table; charts that mean something

RANDOM = "random-init(seed=0)"


def _text(html: str) -> str:
    """The page's text, a space between every element's, runs of blanks as one."""
    return " ".join(" ".join(self_contained(html).text).split())


def _one_commit_job() -> Dict:
    job = _job()
    job["runs"] = job["runs"][1:]
    job["runs"][0]["progress"] = [[0.0, 0], [4.0, 120]]  # every row in the run's one commit, 4 s in
    job["timings"].update(samples_per_s=30.0, steady_samples_per_s=0.0, first_commit_s=4.0)
    return job


def test_a_one_commit_run_reports_its_rate_over_the_whole_run(tmp_path):
    out = _table(tmp_path / "out", metadata=run_metadata())
    (tmp_path / "out" / "_job.json").write_text(json.dumps(_one_commit_job()))
    html = build_report(out)
    page, text = self_contained(html), _text(html)
    assert "30.0 samples/s over the whole run (one commit: all rows at once after 4.0 s" in text
    assert "0.0 once the pipeline was full" not in text
    assert "made one commit: all 120 rows at once, 4.0 s after execution began (30.0 rows/s over the run)" in text
    assert len(_pngs(page)) == 4  # stages, throughput (a dot for the one rate), norms, projection


def test_the_report_names_the_model_and_warns_of_random_weights(tmp_path):
    trained = _table(tmp_path / "trained", metadata=run_metadata())
    text = _text(build_report(trained))
    assert "model resnet18 (torchvision)" in text and "weights IMAGENET1K_V1, sha256 5c1f1d6e2a9b" in text
    assert "layer avgpool, pool avg" in text and "WARNING" not in text and "random" not in text
    heads = [{"name": "mean", "kind": "mean", "weights": ""}, {"name": "lstm", "kind": "lstm", "weights": RANDOM}]
    video = _table(tmp_path / "video", column="clip_mean", metadata=run_metadata(RANDOM, heads=heads))
    text = _text(build_report(video))
    assert (f"WARNING: random weights: resnet18 ({RANDOM}); temporal head lstm ({RANDOM}) were never trained"
            in text)
    assert f"weights {RANDOM}" in text and f"temporal clip_mean: mean; clip_lstm: lstm ({RANDOM})" in text
    bare = _table(tmp_path / "bare")  # files without provenance (written by hand): said, not guessed
    assert "model unknown: the table's files carry no featurize.* provenance" in _text(build_report(bare))


def test_the_summary_names_the_model_and_warns_of_random_weights(tmp_path):
    from pipeline.output.record import Summary, format_summary

    def summary(meta):
        return format_summary(Summary(str(tmp_path), 3, 3, {}, 1.0, 1.0, provenance=meta)).splitlines()

    lines = summary(run_metadata(RANDOM))
    assert lines[-5:] == ["model        resnet18 (torchvision)", f"weights      {RANDOM}", "layer        avgpool, pool avg",
                          f"WARNING      random weights: resnet18 ({RANDOM}) was never trained, so these vectors say "
                          "nothing learned about the content: for tests and demos only", f"output       {tmp_path}"]
    assert not any("WARNING" in line for line in summary(run_metadata()))
    applied = summary(apply_metadata(run_metadata(RANDOM), "linear", ["a", "b"]))  # an apply: head, then its source
    assert applied[-7:-2] == ["head         linear from /heads/probe, sha256 9f86d081884c, 2 classes",
                              "source       /out/tiny", "model        resnet18 (torchvision)",
                              f"weights      {RANDOM}", "layer        avgpool, pool avg"]
    assert applied[-2].startswith("WARNING      random weights: resnet18")
    assert not any(line.startswith(("model", "WARNING")) for line in summary({}))  # nothing recorded: nothing said


def test_search_and_dedup_pages_name_model_metric_centring_threshold_and_warn(tmp_path, capsys):
    x = np.random.default_rng(1).normal(size=(24, 8))
    x[5] = x[2] + 0.001  # one planted pair
    out = str(tmp_path / "out")
    write_table(out, ["train"] * 24, ["c"] * 24, feature=x, metadata=run_metadata(RANDOM))
    assert main(["index", out, "--center"]) == 0
    capsys.readouterr()
    search, dedup = tmp_path / "search.html", tmp_path / "dedup.html"
    assert main(["search", out, "--id", "s00002", "-k", "2", "--html", str(search)]) == 0
    assert "featurize: WARNING: random weights: resnet18" in capsys.readouterr().err
    assert main(["dedup", out, "--threshold", "0.9", "--html", str(dedup)]) == 0
    assert "featurize: WARNING: random weights: resnet18" in capsys.readouterr().err
    warning = f"WARNING: random weights: resnet18 ({RANDOM}) was never trained"
    common = ["model resnet18 (torchvision)", f"weights {RANDOM}", "layer avgpool, pool avg",
              "metric cosine (higher is closer)", "centring yes: the table's mean is taken off every vector", warning]
    text = _text(search.read_text())
    assert all(c in text for c in common) and "threshold" not in text
    text = _text(dedup.read_text())
    assert all(c in text for c in common) and "threshold 0.9 (cosine similarity at or above)" in text
    assert "group 0: 2 samples" in text
    write_table(out, ["train"] * 24, ["c"] * 24, feature=x, metadata=run_metadata())  # trained weights: no warning
    assert main(["dedup", out, "--html", str(dedup)]) == 0
    assert "WARNING" not in capsys.readouterr().err and "WARNING" not in dedup.read_text()
    assert "centring yes" in _text(dedup.read_text())  # as the index was built


def _applied(root, kind: str, n: int = 90, source=None) -> tuple:
    """An apply output of a `kind` head over a three-class table: (OUT, labels, preds, splits)."""
    rng = np.random.default_rng(2)
    classes = ["cat", "dog", "eel"]
    labels = [classes[i % 3] for i in range(n)]
    splits = ["val" if i % 4 == 0 else "train" for i in range(n)]
    right = rng.random(n) < np.where(np.array(splits) == "train", 0.9, 0.6)  # better on the rows it saw
    preds = [lab if ok else classes[(classes.index(lab) + 1) % 3] for lab, ok in zip(labels, right)]
    probs = np.full((n, 3), 0.1)
    probs[np.arange(n), [classes.index(p) for p in preds]] = 0.8
    columns = {"pred": pa.array(preds), "probs": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel(), pa.float32()), 3)}
    if kind == "lstm":
        columns["clip_lstm"] = pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 8), pa.float32()), 8)
    meta = apply_metadata(source or run_metadata(), kind, classes)
    write_table(str(root), splits, labels, columns=columns, metadata=meta, name=f"apply-{kind}",
                record={"kind": "apply"})
    return str(root), labels, preds, splits


def test_the_report_of_a_classifiers_output_shows_accuracy_and_confusion_matrices(tmp_path):
    out, labels, preds, splits = _applied(tmp_path / "out", "linear")
    html = build_report(out)
    page, text = self_contained(html), _text(html)
    assert [a.get("id") for a in page.attrs if a["tag"] == "h2"] == ["time", "errors", "predictions"]
    truth = pq.ParquetDataset(os.path.join(out, "features")).read(columns=["split", "label", "pred"])
    for split in ("train", "val"):  # recomputed from the table as written
        rows = truth.filter(pc.equal(truth["split"], split))
        right = int(pc.sum(pc.equal(rows["label"], rows["pred"])).as_py())
        assert f"{split} {len(rows)} {right / len(rows):.4f} ({right} of {len(rows)})" in text
    right = sum(a == b for a, b in zip(labels, preds))
    assert f"all {len(labels)} {right / len(labels):.4f} ({right} of {len(labels)})" in text
    assert "3 classes" in text and "norm" not in text.lower() and "<code>probs</code>" not in html
    assert len(_pngs(page)) == 2  # a confusion matrix per split (and no runs in this _job.json to draw)
    assert "head linear from /heads/probe" in text and "model resnet18 (torchvision)" in text
    assert "WARNING" not in text
    random_source = _applied(tmp_path / "random", "linear", source=run_metadata(RANDOM))[0]
    assert f"WARNING: random weights: resnet18 ({RANDOM})" in _text(build_report(random_source))


def test_the_report_of_a_temporal_heads_output_and_of_an_autoencoders_code(tmp_path):
    out = _applied(tmp_path / "lstm", "lstm")[0]
    page = self_contained(build_report(out))
    assert [a.get("id") for a in page.attrs if a["tag"] == "h2"] == ["time", "errors", "predictions", "norms",
                                                                     "projection"]
    assert "column clip_lstm (the table's vector columns: probs, clip_lstm)" not in "".join(page.text)
    assert "column clip_lstm" in "".join(page.text) and len(_pngs(page)) == 2 + 2  # matrices; norms, projection
    code = np.random.default_rng(3).normal(size=(30, 4)) + np.eye(4)[[i % 3 for i in range(30)]] * 5
    columns = {"code": pa.FixedSizeListArray.from_arrays(pa.array(code.ravel(), pa.float32()), 4)}
    auto = tmp_path / "auto"
    write_table(str(auto), ["train"] * 30, [f"c{i % 3}" for i in range(30)], columns=columns,
                metadata=apply_metadata(run_metadata(), "autoencoder", []), record={"kind": "apply"})
    html = build_report(str(auto))
    page, text = self_contained(html), _text(html)
    assert [a.get("id") for a in page.attrs if a["tag"] == "h2"] == ["time", "errors", "norms", "projection"]
    assert "column code" in text and "30 sampled rows on their first two principal components" in text
    assert "coloured by label (3 labels)" in text and "head autoencoder from /heads/probe" in text


def test_predictions_with_labels_the_head_never_learned_without_labels_and_of_no_rows(tmp_path):
    out = tmp_path / "out"
    probs = pa.FixedSizeListArray.from_arrays(pa.array([0.5] * 8, pa.float32()), 2)
    columns = {"pred": pa.array(["cat", "cat", "dog", "cat"]), "probs": probs}
    write_table(str(out), ["val"] * 4, ["cat", "dog", "fox", "cat"], columns=columns,
                metadata=apply_metadata(run_metadata(), "linear", ["cat", "dog"]))
    text = _text(build_report(str(out)))
    # fox is not one of the head's classes: counted apart, not scored; macro F1 (cat 0.8, dog 0) / 2
    assert "val 3 0.6667 (2 of 3) 0.4000 1" in text and "2 classes" in text
    files = sorted(out.rglob("*.parquet"))
    for path in files:  # the same table without its label column
        t = pq.read_table(path)
        pq.write_table(t.drop_columns(["label"]), path)
    text = _text(build_report(str(out)))
    assert "no label column: no accuracy; the predicted classes pred rows cat 3 dog 1" in text
    for path in files:  # no rows at all
        t = pq.read_table(path)
        pq.write_table(t.slice(0, 0), path)
    assert "Predictions no rows" in _text(build_report(str(out)))
