"""The similarity index: build, search, incremental add, dedup, refusals; on hand-made tables (no Ray)."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import featurize
from pipeline.cli import main
from pipeline.index import build_index, find_duplicates, open_index
from pipeline.index import generations as index_store
from pipeline.output.store import parquet_bytes

from tables import windows, write_table

D = 16


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def make_table(root, x: np.ndarray, rows_per_file: int = 16) -> str:
    n = len(x)
    write_table(str(root), ["train"] * n, [f"c{i % 3}" for i in range(n)], feature=x, rows_per_file=rows_per_file)
    return str(root)


def exact(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Top-k positions by cosine over float16-stored vectors, as the table holds them."""
    x = x.astype(np.float16).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(q @ x.T), axis=1)[:, :k]


def ids(hits):
    return [h["sample_id"] for h in hits]


def positions(hits):
    return [int(h["sample_id"][1:]) for h in hits]


def test_flat_round_trips_and_answers_as_exact_search(tmp_path):
    x = vectors(200)
    out = make_table(tmp_path / "out", x)
    meta = build_index(out)
    assert (meta["kind"], meta["action"], meta["rows"], meta["exact"]) == ("flat", "built", 200, True)
    index = open_index(out)
    assert index.meta["generation"] == meta["generation"] and index.note is None
    q = vectors(20, seed=1)
    got = np.array([positions(h) for h in index.search(q, 5)])
    np.testing.assert_array_equal(got, exact(x, q, 5))
    hit = index.search(q[:1], 1)[0][0]
    assert set(hit) == {"rank", "sample_id", "score", "label", "uri", "split"} and hit["rank"] == 1
    np.testing.assert_allclose(index.vector("s00007"), x[7], rtol=1e-3, atol=1e-3)  # float16 as stored
    assert build_index(out)["action"] == "unchanged"


@pytest.mark.parametrize("kind, options", [("ivf", {"nlist": 4}), ("hnsw", {"hnsw_m": 8})])
def test_approximate_index_answers_as_exact_search_and_states_its_recall(tmp_path, kind, options):
    x = vectors(300)
    out = make_table(tmp_path / "out", x, rows_per_file=64)
    meta = build_index(out, kind=kind, **options)
    assert meta["kind"] == kind and not meta["exact"]
    assert meta["recall"]["value"] >= 0.95 and meta["recall"]["queries"] == 300
    on_disk = json.loads((tmp_path / "out/_index/feature/meta.json").read_text())
    assert on_disk["recall"] == meta["recall"] and on_disk["search"] == meta["search"]
    q = vectors(30, seed=2)
    got = [set(positions(h)) for h in open_index(out).search(q, 10)]
    want = [set(row) for row in exact(x, q, 10)]
    recall = sum(len(g & w) for g, w in zip(got, want)) / 300
    assert recall >= 0.9  # the sample's stated recall holds for other queries too (roughly)


def test_new_files_are_added_and_replaced_files_rebuild(tmp_path):
    x = vectors(100)
    out = make_table(tmp_path / "out", x[:64])
    build_index(out)
    extra = tmp_path / "extra"
    write_table(str(extra), ["val"] * 36, ["c9"] * 36, feature=x[64:], rows_per_file=16)
    # a file as an incremental run adds it (its ids renamed: write_table numbers from s00000 again)
    t = pq.read_table(sorted((extra / "features").rglob("*.parquet"))[0])
    t = t.set_column(0, "sample_id", pa.array([f"n{i}" for i in range(len(t))]))
    (tmp_path / "out/features/split_dir=val").mkdir()
    (tmp_path / "out/features/split_dir=val/part-new.parquet").write_bytes(parquet_bytes(t))
    note = open_index(out).note
    assert note and "16 rows are not indexed yet" in note
    meta = build_index(out)
    assert (meta["action"], meta["added_rows"], meta["rows"]) == ("added", 16, 80)
    assert ids(open_index(out).search(open_index(out).vector("n3")[None], 1)[0]) == ["n3"]
    os.remove(next((tmp_path / "out/features/split_dir=train").rglob("part-00000.parquet")))
    meta = build_index(out)
    assert meta["action"] == "rebuilt" and "removed or replaced" in meta["reason"] and meta["rows"] == 80 - 16


def test_search_by_id_finds_itself_first(tmp_path, capsys):
    out = make_table(tmp_path / "out", vectors(100))
    assert main(["index", out]) == 0
    assert "flat" in capsys.readouterr().out
    assert main(["search", out, "--id", "s00042", "-k", "3", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    first = printed["hits"][0]
    assert first["sample_id"] == "s00042" and first["score"] >= 0.999 and len(printed["hits"]) == 3
    assert printed["query"] == {"kind": "id", "value": "s00042", "uri": "file:///data/s00042"}
    assert main(["search", out, "--id", "s00042"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["rank", "score", "label"] and "s00042" in lines[1]


def _zero_rows(root) -> str:
    t = pa.table({"sample_id": pa.array([], pa.string()), "uri": pa.array([], pa.string()),
                  "label": pa.array([], pa.string()), "split": pa.array([], pa.string()),
                  "feature": pa.array([], pa.list_(pa.float16(), D))})
    (root / "features").mkdir(parents=True)
    (root / "features/part-0.parquet").write_bytes(parquet_bytes(t))
    return str(root)


def test_refusals_exit_2_with_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    out = str(tmp_path / "out")
    write_table(out, ["train"] * 20, ["a"] * 20, feature=vectors(20), frames=rng.normal(size=(20, 3, D)))
    cases = [
        (["search", out, "--id", "s00001"], f"has no index of 'feature'; run featurize index {out} first"),
        (["index", out, "--column", "nope"], "no feature column 'nope' (feature columns: feature (vector), "
                                             "frame_features (sequence))"),
        (["index", out, "--column", "frame_features"], "is a sequence of frame vectors"),
        (["index", _zero_rows(tmp_path / "empty")], "the features table has no rows"),
        (["index", str(tmp_path / "nothing")], "holds no features table"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["index", out]) == 0
    capsys.readouterr()
    assert main(["search", out, "--id", "nobody"]) == 2
    assert "no such sample_id in the index of 'feature'" in capsys.readouterr().err


def windowed_table(root, counts=(3, 2), extra=None) -> tuple:
    """A windowed video table as a job with video.window_s 4 writes it (ids v<j>.avi#w<k>, clip_mean),
    indexed; `extra`: more rows (sample_id -> start_s) after the windows. (OUT, ids, vectors)."""
    rows = windows(list(counts))
    for sample_id, start in (extra or {}).items():
        rows["sample_id"].append(sample_id)
        rows["uri"].append("file:///data/v0.avi")
        rows["start_s"].append(start)
        rows["end_s"].append(start + 4.0)
    x = vectors(len(rows["sample_id"]))
    n = len(x)
    write_table(str(root), ["train"] * n, ["a"] * n, feature=x, column="clip_mean", rows=rows)
    assert build_index(str(root))["column"] == "clip_mean"  # a video table's default: its clip column
    return str(root), rows["sample_id"], x


def test_a_windowed_video_s_clip_is_found_by_its_start_and_every_output_prints_real_ids(tmp_path, capsys):
    out, real, x = windowed_table(tmp_path / "out")
    assert main(["search", out, "--id", "v0.avi#4", "-k", "5", "--json", "--html", str(tmp_path / "p.html")]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["query"] == {"kind": "id", "value": "v0.avi#w1", "uri": "file:///data/v0.avi", "asked": "v0.avi#4"}
    hits = printed["hits"]
    assert hits[0]["sample_id"] == "v0.avi#w1" and hits[0]["score"] > 0.999
    assert sorted(h["sample_id"] for h in hits) == sorted(real)
    page = (tmp_path / "p.html").read_text()
    assert all(f"id {i}</div>" in page for i in real) and "#w1#" not in page
    assert main(["search", out, "--id", "v0.avi#4.0", "-k", "5"]) == 0  # the text output: the same rows
    head, *lines = capsys.readouterr().out.splitlines()
    assert head.split() == ["rank", "score", "label", "clip", "sample_id", "uri"]
    assert [line.split()[3:] for line in lines] == [
        [f"{h['start_s']:g}-{h['end_s']:g}", "s", h["sample_id"], h["uri"]] for h in hits]
    index = open_index(out)
    np.testing.assert_allclose(index.vector("v0.avi#4"), x[1], atol=1e-2)
    np.testing.assert_allclose(index.vector("v1.avi"), x[3], atol=1e-2)  # a video's bare id: its first clip
    np.testing.assert_allclose(index.vector("v0.avi#w2"), x[2], atol=1e-2)
    assert featurize.search(out, id="v1.avi#4", k=1)[0]["sample_id"] == "v1.avi#w1"
    assert featurize.search(out, id="v0.avi", k=1)[0]["sample_id"] == "v0.avi#w0"


def test_an_exact_sample_id_wins_over_a_clip_start(tmp_path):
    out, _, x = windowed_table(tmp_path / "out", counts=(2,), extra={"v0.avi#4": 0.0})
    assert featurize.search(out, id="v0.avi#4", k=1)[0]["sample_id"] == "v0.avi#4"
    np.testing.assert_allclose(open_index(out).vector("v0.avi#4"), x[2], atol=1e-2)


@pytest.mark.parametrize("asked, message", [
    ("v0.avi#5", "--id 'v0.avi#5': no clip of 'v0.avi' starts at 5 s; its nearest clips start at 0 s (v0.avi#w0), "
                 "4 s (v0.avi#w1), 8 s (v0.avi#w2)"),
    ("v0.avi#12.5", "no clip of 'v0.avi' starts at 12.5 s; its nearest clips start at 4 s (v0.avi#w1), "
                    "8 s (v0.avi#w2), 12 s (v0.avi#w3)"),
    ("v9.avi#4", "--id 'v9.avi#4': no such sample_id in the index of 'clip_mean'"),
    ("v0.avi#w7", "--id 'v0.avi#w7': no such sample_id"),
    ("v0.avi#-4", "no such sample_id"),
    ("v0.avi#inf", "no such sample_id"),
    ("#4", "no such sample_id"),
    ("v0.av", "no such sample_id"),  # a prefix of a video's id is not that video
])
def test_a_clip_that_is_not_there_is_one_refusal(tmp_path, capsys, asked, message):
    out, _, _ = windowed_table(tmp_path / "out", counts=(4, 1))
    assert main(["search", out, "--id", asked]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_concurrent_builds_each_publish_a_whole_index(tmp_path, monkeypatch):
    out = make_table(tmp_path / "out", vectors(300), rows_per_file=64)
    stale = tmp_path / "out/_index/feature/g0000000001-deadbeef"  # a build killed long ago: its marker written
    stale.mkdir(parents=True)
    marker = {"made_by": "featurize index", "generation": stale.name, "created": 1.0}
    (stale / index_store.MARKER).write_text(json.dumps(marker))
    users = tmp_path / "out/_index/feature/g0000000002-keepme"  # named like one, but no marker: not ours
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    errors, together = [], threading.Barrier(4)
    real = index_store.write_atomic

    def meeting(fs, path, data, exclusive=False):  # all four write their files before any publishes
        if path.endswith("index.faiss"):
            together.wait(timeout=30)
        return real(fs, path, data, exclusive)

    monkeypatch.setattr(index_store, "write_atomic", meeting)

    def build(kind):
        try:
            build_index(out, kind=kind, nlist=4)
        except Exception as e:  # pragma: no cover - shown by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=build, args=(k,)) for k in ("flat", "ivf", "flat", "ivf")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    monkeypatch.undo()
    index = open_index(out)
    assert index.index.ntotal == len(index.rows) == 300 and index.meta["kind"] in ("flat", "ivf")
    assert not stale.exists() and (users / "notes.txt").read_text() == "mine"
    # a build killed before its publish leaves the published index as it was
    before = index.meta["generation"]

    def killed(fs, path, data, exclusive=False):
        if path.endswith("_index/feature/meta.json"):
            raise KeyboardInterrupt
        return real(fs, path, data, exclusive)

    monkeypatch.setattr(index_store, "write_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        build_index(out, kind="hnsw")
    monkeypatch.undo()
    assert open_index(out).meta["generation"] == before


def test_s3_round_trip(tmp_path, s3):
    fs, options = s3
    local = make_table(tmp_path / "out", vectors(50))
    fs.put(local, "featurize-e2e/out", recursive=True)
    meta = build_index("s3://featurize-e2e/out", options)
    assert meta["rows"] == 50
    assert fs.exists(f"featurize-e2e/out/_index/feature/{meta['generation']}/index.faiss")
    index = open_index("s3://featurize-e2e/out", options)
    assert ids(index.search(index.vector("s00011")[None], 1)[0]) == ["s00011"]


def test_a_secret_in_the_out_url_stays_out_of_meta_and_output(tmp_path, capsys):
    secret = "Zq8vX2pL-index-secret"
    out = make_table(tmp_path / f"out?token={secret}", vectors(40))
    assert main(["index", out]) == 0
    assert main(["search", out, "--id", "s00001", "--json"]) == 0
    assert main(["dedup", out]) == 0
    printed = capsys.readouterr()
    meta = (tmp_path / f"out?token={secret}/_index/feature/meta.json").read_text()
    assert secret not in printed.out + printed.err + meta
    assert "token=***" in printed.out


def test_dedup_finds_planted_groups_exactly(tmp_path, capsys):
    rng = np.random.default_rng(3)
    x = vectors(120)
    planted = [[5, 17, 90], [30, 31], [60, 61, 62, 63]]
    for group in planted:
        for j in group[1:]:
            x[j] = x[group[0]] + rng.normal(scale=0.02, size=D)
    out = make_table(tmp_path / "out", x)
    groups = find_duplicates(out, threshold=0.95)
    assert groups.column_names == ["group", "sample_id", "uri", "label", "split", "score"]
    found = {}
    for g, sid in zip(groups["group"].to_pylist(), groups["sample_id"].to_pylist()):
        found.setdefault(g, []).append(int(sid[1:]))
    assert sorted(sorted(m) for m in found.values()) == sorted(planted)
    assert sorted(found[0]) == [60, 61, 62, 63]  # the largest group first
    first = groups.filter(pa.compute.equal(groups["group"], 0))["score"].to_pylist()
    assert first[0] == 1.0 and first == sorted(first, reverse=True) and min(first) > 0.95
    assert main(["dedup", out, "--threshold", "0.95"]) == 0
    assert "3 groups, 9 rows" in capsys.readouterr().out
    written = pq.read_table(tmp_path / "out/_duplicates/feature.parquet")
    assert written.equals(groups) and written.schema.field("score").type == pa.float32()


def test_center_separates_what_a_common_component_hides(tmp_path, capsys):
    """Features of one backbone share a large common part (ReLU outputs are positive): every cosine
    is near 1 and a 0.95 threshold groups everything; --center subtracts the table's mean first."""
    rng = np.random.default_rng(4)
    x = 10.0 + rng.normal(scale=1.0, size=(80, D))  # a common component far larger than what differs
    x[41] = x[40] + rng.normal(scale=0.05, size=D)  # one planted near-duplicate
    out = make_table(tmp_path / "out", x)
    assert len(find_duplicates(out, threshold=0.95)) == 80  # plain cosine: one group of everything
    groups = find_duplicates(out, threshold=0.95, center=True)
    assert sorted(groups["sample_id"].to_pylist()) == ["s00040", "s00041"]
    assert len(find_duplicates(out, threshold=0.95)) == 2  # dedup keeps the index's centring by default
    index = open_index(out)
    assert index.meta["center"] is not None and len(index.meta["center"]) == D
    hits = index.search(index.vector("s00040")[None], k=2)[0]
    assert ids(hits) == ["s00040", "s00041"] and hits[0]["score"] >= 0.999
    assert main(["index", out]) == 0  # without --center: rebuilt plain, and says why
    assert "--center not asked" in capsys.readouterr().out and open_index(out).meta["center"] is None
    assert main(["index", out, "--center", "--metric", "l2"]) == 2
    assert "only for --metric cosine" in capsys.readouterr().err


def test_index_search_and_dedup_need_neither_ray_nor_torch(tmp_path):
    import subprocess
    import sys

    out = make_table(tmp_path / "out", vectors(30))
    poison = tmp_path / "poison"
    for module in ("ray", "torch"):
        (poison / module).mkdir(parents=True)
        (poison / module / "__init__.py").write_text(f"raise ImportError('{module} imported')\n")
    code = ("import sys; from pipeline.cli import main; "
            f"sys.exit(main(['index', {out!r}]) or main(['search', {out!r}, '--id', 's00001']) "
            f"or main(['dedup', {out!r}]))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": f"{poison}:{root}"})
    assert result.returncode == 0, result.stderr
    assert "s00001" in result.stdout and "duplicates 0 groups" in result.stdout


def test_the_public_api_indexes_searches_dedups_and_reports(tmp_path):
    import featurize

    x = vectors(40)
    x[7] = x[3] + 0.01
    out = make_table(tmp_path / "out", x)
    assert featurize.index(out, center=True)["action"] == "built"
    hits = featurize.search(out, id="s00003", k=3)
    assert ids(hits)[:2] == ["s00003", "s00007"] and hits[0]["score"] >= 0.999
    assert featurize.dedup(out, 0.95)["sample_id"].to_pylist() == ["s00003", "s00007"]
    assert featurize.report(out).endswith("_report.html") and (tmp_path / "out/_report.html").exists()
    with pytest.raises(featurize.Refused, match="exactly one query"):
        featurize.search(out, id="s00003", text="a red car")
