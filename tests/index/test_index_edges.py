"""The index under attack: names that walk out of OUT, users' folders that look like generations,
damaged indexes, another model's table under the same file names, non-finite and null vectors, API
arguments that would reach faiss unchecked (tables written directly; no Ray)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import featurize
from pipeline.cli import main
from pipeline.index import build_index, find_duplicates, open_index
from pipeline.index import generations as index_store
from pipeline.index.dedup import write_groups
from pipeline.output.store import parquet_bytes

D = 16
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def column(x) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(x, np.float16).ravel()), D)


def write_parts(root, x, name: str = "feature", model: str = "resnet18", files: int = 2) -> str:
    """OUT/features/part-K.parquet with `featurize.*` provenance, as a run writes them."""
    n = len(x)
    t = pa.table({"sample_id": [f"s{i:05d}" for i in range(n)], "uri": [f"file:///d/{i}" for i in range(n)],
                  "label": ["a"] * n, "split": ["train"] * n, name: x if isinstance(x, pa.Array) else column(x)})
    t = t.replace_schema_metadata({"featurize.model": model, "featurize.dim": str(D)})
    (root / "features").mkdir(parents=True, exist_ok=True)
    step = -(-n // files)
    for k in range(files):
        (root / "features" / f"part-{k}.parquet").write_bytes(parquet_bytes(t.slice(k * step, step)))
    return str(root)


def listing(folder) -> dict:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


# -- names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../../..", "..", "../escape", "/ABS", "a/b", ".hidden"])
def test_a_column_named_like_a_path_is_refused_and_nothing_outside_out_changes(tmp_path, capsys, name):
    name = str(tmp_path / "abs") if name == "/ABS" else name
    out = tmp_path / "x/y/out"
    keep = tmp_path / "x/g0000000001-keepme"  # where `../../..` under OUT/_index lands, named like a generation
    keep.mkdir(parents=True)
    (keep / "mine.txt").write_text("mine")
    write_parts(out, vectors(20), name=name)
    before = {k: v for k, v in listing(tmp_path).items() if not k.startswith(str(out))}
    for argv in (["index", str(out)], ["index", str(out), "--column", name], ["dedup", str(out)],
                 ["search", str(out), "--column", name, "--id", "s00001"]):
        assert main(argv) == 2, argv
        one_line(capsys, "is not a plain name")
    with pytest.raises(featurize.Refused, match="not a plain name"):
        featurize.index(str(out), column=name)
    with pytest.raises(featurize.Refused, match="not a plain name"):
        write_groups(str(out), None, name, pa.table({"group": [0]}))
    after = {k: v for k, v in listing(tmp_path).items() if not k.startswith(str(out))}
    assert after == before and (keep / "mine.txt").read_text() == "mine"
    assert not (out / "_index").exists() and not (out / "_duplicates").exists()


def test_clean_up_removes_only_generations_holding_the_marker(tmp_path, monkeypatch):
    out = write_parts(tmp_path / "out", vectors(40))
    first = build_index(out)["generation"]
    folder = tmp_path / "out/_index/feature"
    users = [folder / "g0000000001-keepme", folder / "g0000000002-deadbeef", tmp_path / "g0000000003-next"]
    for f in users:  # look-alikes without the marker, inside the index folder and next to OUT
        f.mkdir()
        (f / "data.bin").write_bytes(b"mine")
    (folder / "g0000000004-forged").mkdir()  # a marker naming another folder is not this folder's
    (folder / "g0000000004-forged" / index_store.MARKER).write_text(json.dumps(
        {"made_by": "featurize index", "generation": "g0000000001-keepme", "created": 1.0}))
    target = tmp_path / "target"  # a link to a folder outside OUT that even holds a marker
    target.mkdir()
    (target / index_store.MARKER).write_text(json.dumps({"generation": "g0000000005-link", "created": 1.0}))
    (folder / "g0000000005-link").symlink_to(target, target_is_directory=True)
    users.append(target)
    (target / "data.bin").write_bytes(b"mine")
    monkeypatch.setattr(index_store, "GRACE_S", -1.0)  # every unnamed generation is old enough
    second = build_index(out, rebuild=True)
    assert second["action"] == "rebuilt" and second["reason"] == "--rebuild asked"
    assert not (folder / first).exists() and (folder / second["generation"] / index_store.MARKER).exists()
    assert all((f / "data.bin").read_bytes() == b"mine" for f in users)
    assert (folder / "g0000000004-forged").exists()


def test_clean_up_on_an_object_store_keeps_a_users_look_alike(tmp_path, s3, monkeypatch):
    fs, options = s3
    fs.put(write_parts(tmp_path / "out", vectors(30)), "featurize-e2e/marked", recursive=True)
    out = "s3://featurize-e2e/marked"
    first = build_index(out, options)["generation"]
    fs.pipe("featurize-e2e/marked/_index/feature/g0000000001-keepme/mine.txt", b"mine")
    monkeypatch.setattr(index_store, "GRACE_S", -1.0)
    second = build_index(out, options, rebuild=True)["generation"]
    fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[-1] for p in fs.ls("featurize-e2e/marked/_index/feature"))
    assert left == sorted(["g0000000001-keepme", second, "meta.json"]) and first != second
    assert fs.cat_file("featurize-e2e/marked/_index/feature/g0000000001-keepme/mine.txt") == b"mine"


# -- damaged indexes -------------------------------------------------------------------------------

def _damage(case: str, folder, generation: str, tmp_path) -> None:
    meta = folder / "meta.json"
    gen = folder / generation
    if case == "garbage":
        meta.write_bytes(b"\x00not json{")
    elif case in ("{}", "[]", "null", '"text"'):
        meta.write_text(case)
    elif case == "escape":  # a valid index planted outside OUT, named by a crafted generation
        shutil.copytree(gen, tmp_path / "elsewhere", dirs_exist_ok=True)
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "generation": "../../../elsewhere"}))
    elif case == "file path":
        m = json.loads(meta.read_text())
        m["files"][0]["path"] = "../../../etc/passwd"
        meta.write_text(json.dumps(m))
    elif case == "short rows":
        t = pq.read_table(gen / "rows.parquet")
        (gen / "rows.parquet").write_bytes(parquet_bytes(t.slice(0, 3)))
    elif case == "truncated rows":
        (gen / "rows.parquet").write_bytes((gen / "rows.parquet").read_bytes()[:50])
    elif case == "no index.faiss":
        (gen / "index.faiss").unlink()
    elif case == "garbled index.faiss":
        (gen / "index.faiss").write_bytes(b"IxF2" + os.urandom(64))
    elif case == "a folder":
        (gen / "rows.parquet").unlink()
        (gen / "rows.parquet").mkdir()
    elif case == "wrong dim":
        m = json.loads(meta.read_text())
        meta.write_text(json.dumps({**m, "dim": D * 2}))


DAMAGE = ["garbage", "{}", "[]", "null", '"text"', "escape", "file path", "short rows", "truncated rows",
          "no index.faiss", "garbled index.faiss", "a folder", "wrong dim"]


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_index_is_refused_by_search_and_rebuilt_by_index(tmp_path, capsys, case):
    out = write_parts(tmp_path / "out", vectors(40))
    generation = build_index(out)["generation"]
    _damage(case, tmp_path / "out/_index/feature", generation, tmp_path)
    assert main(["search", out, "--id", "s00001"]) == 2
    one_line(capsys, f"the index at {out}/_index/feature is damaged", f"run featurize index {out} --rebuild")
    assert main(["dedup", out]) == 0  # dedup builds first: it rebuilds the damaged index, saying so
    assert "featurize: note: the index was rebuilt first (the index was damaged: " in capsys.readouterr().err
    _damage(case, tmp_path / "out/_index/feature", open_index(out).meta["generation"], tmp_path)
    assert main(["index", out]) == 0
    said = capsys.readouterr().out
    assert "rebuilt (the index was damaged: " in said and len(said.splitlines()[0].split("\n")) == 1
    assert main(["search", out, "--id", "s00001", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["sample_id"] == "s00001"


def test_a_rebuild_killed_midway_leaves_the_old_index_usable(tmp_path, monkeypatch):
    out = write_parts(tmp_path / "out", vectors(60))
    before = build_index(out)["generation"]
    real = index_store.write_atomic

    for step in ("index.faiss", "rows.parquet", "_index/feature/meta.json"):
        def killed(fs, path, data, exclusive=False, step=step):
            if path.endswith(step):
                raise KeyboardInterrupt
            return real(fs, path, data, exclusive)

        monkeypatch.setattr(index_store, "write_atomic", killed)
        with pytest.raises(KeyboardInterrupt):
            build_index(out, rebuild=True, kind="hnsw", hnsw_m=8)
        monkeypatch.undo()
        index = open_index(out)
        assert index.meta["generation"] == before and index.search(index.vector("s00007")[None], 1)[0][0][
            "sample_id"] == "s00007"
    monkeypatch.setattr(index_store, "GRACE_S", -1.0)
    build_index(out, rebuild=True)  # the killed builds' folders held the marker: cleaned up now
    left = [p.name for p in (tmp_path / "out/_index/feature").iterdir() if p.is_dir()]
    assert left == [open_index(out).meta["generation"]]


# -- lineage ---------------------------------------------------------------------------------------

def test_another_model_under_the_same_file_names_rebuilds_and_search_refuses_until_then(tmp_path, capsys):
    x = vectors(60)
    out = write_parts(tmp_path / "out", x, model="resnet18")
    assert main(["index", out]) == 0
    capsys.readouterr()
    write_parts(tmp_path / "out", x[::-1].copy(), model="resnet34")  # run --overwrite: same part names
    assert main(["search", out, "--id", "s00001"]) == 2
    one_line(capsys, "the index was built from another table", "model resnet18 -> resnet34",
             f"run featurize index {out}")
    assert main(["index", out]) == 0
    said = capsys.readouterr().out
    assert "rebuilt (the table was made by another model (model resnet18 -> resnet34))" in said
    meta = json.loads((tmp_path / "out/_index/feature/meta.json").read_text())
    assert meta["lineage"]["provenance"]["model"] == "resnet34" and meta["table"]["metadata"]["featurize.model"] \
        == "resnet34"
    index = open_index(out)
    assert index.search(index.vector("s00001")[None], 1)[0][0]["sample_id"] == "s00001"
    np.testing.assert_allclose(index.vector("s00001"), x[58], atol=1e-2)
    # dedup rebuilds an index of another table before grouping; its list records the lineage
    write_parts(tmp_path / "out", x, model="resnet50")
    groups = find_duplicates(out)
    made = json.loads(groups.schema.metadata[b"featurize.duplicates"])
    assert made["lineage"]["provenance"]["model"] == "resnet50" and open_index(out).meta["lineage"] == made["lineage"]
    assert made["index"] == {"action": "rebuilt", "reason": "the table was made by another model "
                                                            "(model resnet34 -> resnet50)"}


def test_a_file_rewritten_under_its_name_with_the_same_model_rebuilds(tmp_path):
    out = write_parts(tmp_path / "out", vectors(60))
    build_index(out)
    write_parts(tmp_path / "out", vectors(60, seed=5)[:50])  # same names and model, other rows
    assert open_index(out).note.startswith("note: 2 indexed files are no longer in the table as indexed")
    meta = build_index(out)
    assert (meta["action"], meta["rows"]) == ("rebuilt", 50) and "removed or replaced" in meta["reason"]
    assert build_index(out)["action"] == "unchanged"


def test_an_index_without_lineage_is_rebuilt(tmp_path, capsys):
    out = write_parts(tmp_path / "out", vectors(30))
    build_index(out)
    path = tmp_path / "out/_index/feature/meta.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "lineage"}))
    assert main(["search", out, "--id", "s00001"]) == 2
    one_line(capsys, "records no lineage")
    meta = build_index(out)
    assert meta["action"] == "rebuilt" and "records no lineage" in meta["reason"]


# -- non-finite and null vectors -------------------------------------------------------------------

def _planted(n: int = 120):
    rng = np.random.default_rng(3)
    x = vectors(n) + 5.0  # a common component: --center matters
    planted = [[5, 17, 90], [30, 31], [60, 61, 62, 63]]
    for group in planted:
        for j in group[1:]:
            x[j] = x[group[0]] + rng.normal(scale=0.02, size=D)
    return x, planted


def _with_bad_rows(x: np.ndarray) -> pa.Array:
    """Rows 10 inf, 11 NaN, 12 null, 13 one null value; float16 overflow (1e6) in row 14."""
    values = [list(map(float, row)) for row in x.astype(np.float16).astype(np.float32)]
    values[10][3], values[11][0], values[14][2] = float("inf"), float("nan"), 1e6
    values[12] = None
    values[13][5] = None
    return pa.array(values, pa.list_(pa.float16(), D))


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in meta.json")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_non_finite_and_null_rows_are_skipped_counted_and_meta_stays_json(tmp_path, capsys, kind):
    x, planted = _planted(300 if kind == "ivf" else 120)
    out = write_parts(tmp_path / "out", _with_bad_rows(x), files=3)
    argv = ["index", out, "--center"] + (["--kind", "ivf"] if kind == "ivf" else [])
    assert main(argv) == 0
    said = capsys.readouterr().out
    assert "skipped  5 rows without a finite vector (null, inf or NaN): not indexed" in said
    meta = _strict((tmp_path / "out/_index/feature/meta.json").read_text())
    assert meta["skipped"] == 5 and meta["rows"] == len(x) - 5 and all(np.isfinite(meta["center"]))
    index = open_index(out)
    for sid in ("s00009", "s00015", "s00099"):  # rows after the skipped ones keep their vectors
        np.testing.assert_allclose(index.vector(sid), x[int(sid[1:])], atol=2e-2)
        assert index.search(index.vector(sid)[None], 1)[0][0]["sample_id"] == sid
    with pytest.raises(featurize.Refused, match="no such sample_id"):
        index.vector("s00010")
    groups = find_duplicates(out, threshold=0.95)
    found = {}
    for g, sid in zip(groups["group"].to_pylist(), groups["sample_id"].to_pylist()):
        found.setdefault(g, []).append(int(sid[1:]))
    assert sorted(sorted(m) for m in found.values()) == sorted(planted)
    bad = index.vector("s00005").copy()
    bad[0] = np.inf
    with pytest.raises(featurize.Refused, match="inf or NaN"):
        index.search(bad[None], 3)


def test_a_column_with_no_finite_row_is_refused(tmp_path, capsys):
    out = write_parts(tmp_path / "out", pa.array([None] * 8, pa.list_(pa.float16(), D)))
    assert main(["index", out]) == 2
    one_line(capsys, "none of its 8 rows has a finite vector")
    assert main(["index", out, "--center"]) == 2
    one_line(capsys, "no row of feature has a finite vector")


def test_a_null_vector_is_one_refusal_in_to_numpy_and_the_loader(tmp_path):
    x = vectors(20)
    values = [list(map(float, row)) for row in x]
    values[3] = None
    out = write_parts(tmp_path / "out", pa.array(values, pa.list_(pa.float16(), D)))
    for read in (lambda o: o.to_numpy(), lambda o: o.to_pandas(), lambda o: o.to_numpy("missing")):
        with pytest.raises(featurize.Refused, match=out) as e:
            read(featurize.open(out))
        assert "\n" not in str(e.value)
    with pytest.raises(featurize.Refused, match="1 rows have no vector"):
        featurize.open(out).to_numpy()
    with pytest.raises(featurize.Refused, match=r"1 rows have no vector .*part-0.parquet|part-0.parquet.*1 rows"):
        list(featurize.FeatureDataset(out, "feature", batch_size=4))
    assert build_index(out)["skipped"] == 1


# -- API arguments ---------------------------------------------------------------------------------

@pytest.mark.parametrize("m", [0, 1])
def test_hnsw_m_below_2_is_refused_not_an_abort(tmp_path, m):
    """In a subprocess: faiss aborts on M 0 and crashes on M 1, which would end pytest too."""
    out = write_parts(tmp_path / "out", vectors(30))
    code = ("import featurize\ntry:\n    featurize.index(%r, kind='hnsw', hnsw_m=%d)\n"
            "except featurize.Refused as e:\n    print('refused:', e)\n" % (out, m))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"refused: hnsw_m: {m} is not a whole number from 2 to 256")


BAD = [
    ("index", {"nlist": 10 ** 6}, "nlist: 1000000 lists for 30 rows"),
    ("index", {"nlist": 0}, "nlist: 0"),
    ("index", {"nlist": 4.5}, "nlist: 4.5"),
    ("index", {"hnsw_m": "8", "kind": "hnsw"}, "hnsw_m: '8'"),
    ("index", {"kind": "ivf", "nlist": True}, "nlist: True"),
    ("index", {"center": "yes"}, "center: 'yes'"),
    ("index", {"kind": "lsh"}, "--kind 'lsh'"),
    ("search", {"k": "5"}, "k: '5'"),
    ("search", {"k": 0}, "k: 0"),
    ("search", {"k": -3}, "k: -3"),
    ("search", {"k": 2.0}, "k: 2.0 is not a whole number of at least 1"),
    ("dedup", {"threshold": 1.5}, "--threshold 1.5"),
    ("dedup", {"threshold": -2}, "--threshold -2"),
    ("dedup", {"threshold": float("nan")}, "--threshold nan"),
    ("dedup", {"threshold": "0.9"}, "--threshold '0.9'"),
    ("dedup", {"search": {"nprobe": -1}}, "nprobe: -1"),
    ("dedup", {"search": {"efSearch": 0}}, "efSearch: 0"),
    ("dedup", {"search": {"bogus": 3}}, "search: {'bogus': 3}"),
    ("dedup", {"k": 0}, "k: 0"),
    ("dedup", {"center": "no"}, "center: 'no'"),
]


@pytest.mark.parametrize("call, options, message", BAD, ids=[f"{c}-{o}" for c, o, _ in BAD])
def test_bad_api_arguments_are_one_refusal_naming_the_argument(tmp_path, call, options, message):
    out = write_parts(tmp_path / "out", vectors(30))
    if call != "index":
        build_index(out)
    before = sorted(p.name for p in (tmp_path / "out/_index/feature").iterdir()) if call != "index" else []
    with pytest.raises(featurize.Refused) as e:
        if call == "index":
            featurize.index(out, **options)
        elif call == "search":
            featurize.search(out, id="s00001", **options)
        else:
            featurize.dedup(out, **options)
    assert message in str(e.value) and "\n" not in str(e.value)
    if call == "index":
        assert not (tmp_path / "out/_index").exists()
    else:
        assert sorted(p.name for p in (tmp_path / "out/_index/feature").iterdir()) == before


def test_index_search_checks_k_and_the_query(tmp_path):
    out = write_parts(tmp_path / "out", vectors(30))
    build_index(out)
    index = open_index(out)
    for k, vector, message in [(0, vectors(1), "k: 0"), ("3", vectors(1), "k: '3'"), (3, np.ones((1, 3)), "shape"),
                               (3, [["a"] * D], "not an array of numbers"), (3, np.full((1, D), np.nan), "NaN")]:
        with pytest.raises(featurize.Refused, match=message):
            index.search(vector, k)
    assert len(index.search(vectors(1), 10 ** 12)[0]) == 30  # a k above the rows: all of them, as before


def test_a_search_whose_generation_a_concurrent_build_removed_reads_the_newer_one(tmp_path, monkeypatch):
    out = write_parts(tmp_path / "out", vectors(30))
    build_index(out)
    stale = json.loads((tmp_path / "out/_index/feature/meta.json").read_text())
    monkeypatch.setattr(index_store, "GRACE_S", -1.0)
    newer = build_index(out, rebuild=True)["generation"]  # removes the generation `stale` names
    assert not (tmp_path / f"out/_index/feature/{stale['generation']}").exists()
    real, answers = index_store.read_meta, [stale]

    def late(*args, **kwargs):  # the search read meta.json just before the other build published
        return answers.pop() if answers else real(*args, **kwargs)

    monkeypatch.setattr(index_store, "read_meta", late)
    index = open_index(out)
    assert index.meta["generation"] == newer and index.search(index.vector("s00003")[None], 1)[0][0][
        "sample_id"] == "s00003"
