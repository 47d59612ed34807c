"""`featurize apply` (pipeline/train/apply.py): a head over a features table, committed like a run.

The input tables are made here with pyarrow in a run's layout (features/split_dir=<s>/..., the
exact split and label in every file, _job.json, an errors table), the heads with models.build and
checkpoint.save (random init), so no extraction runs."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ApplyError
from pipeline.output.ledger import part_name
from pipeline.output.record import format_summary, inspect_output
from pipeline.output.root import JOB_FILE
from pipeline.output.status import status
from pipeline.output.tensors import sequences, vectors
from pipeline.train.apply import apply_head
from pipeline.train.checkpoint import load, save
from pipeline.train.models import build
from pipeline.train.trainfile import HeadConfig

from conftest import S3_BUCKET, assert_exactly_once, assert_whole_files, read_errors, read_features, recorded, tree

pytestmark = pytest.mark.usefixtures("ray_session")
DIM, FRAMES, CLASSES = 8, 5, ["cat", "dog", "eel"]
SECRET = "apply-planted-secret-7Hq2"


def make_table(out: Path, n: int = 24, splits=("train", "val"), partition_by=("split",), video: bool = False,
               dim: int = DIM, files_per_folder: int = 2) -> list:
    """A run's output root with n feature rows (float16) and one error row; returns the feature ids."""
    rng = np.random.default_rng(0)
    ids = [f"s{i:03d}.{'mp4' if video else 'jpg'}" for i in range(n)]
    rows = [{"sample_id": s, "uri": f"/data/{s}", "label": CLASSES[i % 3], "split": splits[i % len(splits)]}
            for i, s in enumerate(ids)]
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in partition_by), []).append(r)
    vec = pa.list_(pa.float16(), dim)
    meta = {"featurize.dtype": "float16", "featurize.dim": str(dim), "featurize.job": "tiny"}
    for key, members in groups.items():
        folder = out / "features" / "/".join(f"{c}_dir={v}" for c, v in zip(partition_by, key))
        folder.mkdir(parents=True)
        for k in range(files_per_folder):
            part = members[k::files_per_folder]
            cols = {c: pa.array([r[c] for r in part], pa.string()) for c in ("sample_id", "uri", "label", "split")}
            cols["feature"] = pa.array([rng.standard_normal(dim).astype(np.float16) for _ in part], vec)
            if video:  # clips of 2..FRAMES+1 frames: shorter and longer than the head's FRAMES
                clips = [[rng.standard_normal(dim).astype(np.float16) for _ in range(2 + j % FRAMES)] for j in range(len(part))]
                cols["frame_features"] = pa.array(clips, pa.list_(vec))
            pq.write_table(pa.table(cols).replace_schema_metadata(meta), folder / f"part-{k}.parquet")
    (out / "errors").mkdir()
    pq.write_table(pa.table({"sample_id": ["broken.jpg"], "uri": ["/data/broken.jpg"], "stage": ["decode"],
                             "error_type": ["DecodeError"], "message": ["bad"], "attempts": pa.array([1], pa.int32())}),
                   out / "errors" / "part-e.parquet")
    record = {"name": "tiny", "status": "complete", "counts": {"planned": n + 1},
              "settings": {"output.partition_by": list(partition_by), "output.dtype": "float16"}}
    (out / JOB_FILE).write_text(json.dumps(record))
    return ids


def make_head(folder: Path, kind: str, column: str = "feature", dim: int = DIM, options=None, uri=None) -> str:
    head = dataclasses.asdict(HeadConfig(kind=kind, code_dim=4 if kind == "autoencoder" else None, hidden=6))
    classes = [] if kind == "autoencoder" else CLASSES
    model = build(kind, dim, len(classes) or 1, head)
    config = {"kind": kind, "head": head, "classes": classes, "source": {"uri": "/somewhere"},
              "input": {"column": column, "dim": dim, **({"frames": FRAMES} if column == "frame_features" else {})}}
    uri = uri or str(folder)
    save(uri, options, model, config, metrics=[])
    return uri


def expected(checkpoint: str, out: Path, column: str, name: str) -> dict:
    """sample_id -> the head's outputs computed directly on OUT's rows."""
    table = read_features(str(out))
    head = load(checkpoint)
    if column == "frame_features":
        x, n = sequences(table[column], FRAMES)
        values = head.outputs(x, n, name)
    else:
        values = head.outputs(vectors(table[column]), None, name)
    ids = table["sample_id"].to_pylist()
    return {c: dict(zip(ids, v)) for c, v in values.items()}


def check_values(out2: Path, want: dict, atol: float) -> None:
    got = read_features(str(out2))
    ids = got["sample_id"].to_pylist()
    for column, by_id in want.items():
        values = got[column].to_pylist()
        for sid, v in zip(ids, values):
            if isinstance(v, str):
                assert v == by_id[sid], (sid, column)
            else:
                np.testing.assert_allclose(np.asarray(v, np.float32), by_id[sid], atol=atol, rtol=1e-2)


@pytest.fixture(scope="module")
def linear_applied(tmp_path_factory, ray_session):
    """(OUT, OUT2, OUT's feature ids, the head, the summary): a linear head applied to a table, read
    here and copied by the tests that write to OUT2."""
    root = tmp_path_factory.mktemp("linear-applied")
    out, out2 = root / "out", root / "out2"
    ids = make_table(out)
    head = make_head(root / "linear", "linear")
    return out, out2, ids, head, apply_head(head, str(out), str(out2), batch_size=5)


@pytest.mark.timeout(300)
def test_a_linear_head_makes_a_table_of_every_sample_with_pred_and_probs(linear_applied):
    out, out2, ids, head, summary = linear_applied
    assert summary.features == len(ids) and summary.planned == len(ids) and not summary.errors
    features, errors = assert_exactly_once(str(out2), ids)  # broken.jpg (an error row of OUT) is not carried
    assert not errors
    assert_whole_files(str(out2))
    got = read_features(str(out2))
    assert set(got.column_names) == {"sample_id", "uri", "label", "split", "pred", "probs", "split_dir"}
    assert sorted(p.name for p in (out2 / "features").iterdir()) == ["split_dir=train", "split_dir=val"]
    source = read_features(str(out), columns=["sample_id", "uri", "label", "split"]).to_pylist()
    assert sorted(read_features(str(out2), columns=["sample_id", "uri", "label", "split"]).to_pylist(),
                  key=lambda r: r["sample_id"]) == sorted(source, key=lambda r: r["sample_id"])
    assert pq.read_schema(next((out2 / "features").rglob("*.parquet"))).field("probs").type == pa.list_(pa.float32(), 3)
    check_values(out2, expected(head, out, "feature", "linear"), atol=1e-5)

    st = status(str(out2))
    assert st["complete"] and st["planned"] == len(ids) and st["features"] == len(ids) and st["remaining"] == 0
    text = inspect_output(str(out2))
    assert "apply-linear (complete), planned 24" in text and "probs" in text and "head:" in text
    meta = pq.read_schema(next((out2 / "features").rglob("*.parquet"))).metadata
    assert json.loads(meta[b"featurize.head"])["sha256"] == load(head).sha256
    assert json.loads(meta[b"featurize.source"])["job"] == "tiny"
    record = json.loads((out2 / JOB_FILE).read_text())
    assert record["kind"] == "apply" and record["settings"]["apply.input_rows"] == len(ids)
    assert record["runs"][-1]["progress"][-1][1] == len(ids)  # rows committed over time
    from pipeline.pages import build_report

    page = build_report(str(out2))  # an apply table's report: no stage timings, its series, its predictions
    assert "not recorded for this apply" in page and 'id="predictions"' in page and "<code>probs</code>" not in page
    assert page.count('src="data:image/png;base64,') == 3  # the series, a confusion matrix per split
    assert f"head         linear from {head}" in format_summary(summary)  # the summary names the head

    before = tree(out2 / "features")  # the same apply again: nothing to do, nothing rewritten
    again = apply_head(head, str(out), str(out2))
    assert again.skipped == len(ids) and again.samples == 0
    assert tree(out2 / "features") == before


@pytest.mark.timeout(300)
def test_an_lstm_over_frame_features_and_an_autoencoder(tmp_path):
    out = tmp_path / "out"
    ids = make_table(out, n=18, partition_by=("split", "label"), video=True)
    lstm = make_head(tmp_path / "lstm", "lstm", column="frame_features")
    apply_head(lstm, str(out), str(tmp_path / "clips"), name="mine", batch_size=4)
    assert_exactly_once(str(tmp_path / "clips"), ids)
    got = read_features(str(tmp_path / "clips"))
    assert got.schema.field("clip_mine").type == pa.list_(pa.float16(), 6)  # OUT's dtype, the head's size
    assert got.schema.field("probs").type == pa.list_(pa.float32(), 3) and "pred" in got.column_names  # its classifier's
    assert {p.name for p in (tmp_path / "clips" / "features" / "split_dir=train").iterdir()} == \
        {f"label_dir={c}" for c in CLASSES}
    check_values(tmp_path / "clips", expected(lstm, out, "frame_features", "mine"), atol=2e-3)

    auto = make_head(tmp_path / "auto", "autoencoder")
    apply_head(auto, str(out), str(tmp_path / "codes"))
    assert_exactly_once(str(tmp_path / "codes"), ids)
    assert read_features(str(tmp_path / "codes")).schema.field("code").type == pa.list_(pa.float16(), 4)
    check_values(tmp_path / "codes", expected(auto, out, "feature", "autoencoder"), atol=2e-3)
    assert status(str(tmp_path / "codes"))["complete"]


@pytest.mark.timeout(300)
def test_refusals_name_the_problem_before_any_work(linear_applied, tmp_path):
    out, applied, _, linear, _ = linear_applied  # read only: every case here is refused before it writes
    (tmp_path / "empty").mkdir()
    cases = [
        (linear, tmp_path / "empty", tmp_path / "o1", "holds no features table"),
        (make_head(tmp_path / "frames", "linear", column="clip_x"), out, tmp_path / "o2", "reads column 'clip_x'"),
        (make_head(tmp_path / "wide", "linear", dim=16), out, tmp_path / "o3",
         "expects feature of dimension 16, .* has dimension 8"),
        (make_head(tmp_path / "seq", "lstm", column="feature"), out, tmp_path / "o4", "lstm head over sequences"),
        (linear, out, out, "is the input table"),
    ]
    for head, src, dst, message in cases:
        with pytest.raises(ApplyError, match=message):
            apply_head(head, str(src), str(dst))
        assert dst == out or not dst.exists()  # refused before anything was written
    video = tmp_path / "video"
    make_table(video, n=6, video=True)
    with pytest.raises(ApplyError, match="linear head over vectors of frame_features, but .* holds sequences"):
        apply_head(make_head(tmp_path / "vec", "linear", column="frame_features"), str(video), str(tmp_path / "o5"))

    with pytest.raises(ApplyError, match="holds the output of run 'tiny', not of this apply"):
        apply_head(linear, str(video), str(out))  # OUT2 holds a run's output
    out2 = tmp_path / "out2"
    shutil.copytree(applied, out2)  # the linear head's apply output, as if made here
    auto = make_head(tmp_path / "auto", "autoencoder")
    with pytest.raises(ApplyError, match=r"different settings: .*apply\.checkpoint_sha256.*apply\.kind"):
        apply_head(auto, str(out), str(out2))  # another apply's output
    apply_head(auto, str(out), str(out2), overwrite=True)
    assert "code" in read_features(str(out2)).column_names and status(str(out2))["complete"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_exactly_once_after_a_failure_midway_and_the_rerun_applies_only_the_rest(tmp_path, faults, faults_dir):
    out, out2 = tmp_path / "out", tmp_path / "out2"
    ids = make_table(out, n=40, splits=("train",), files_per_folder=4)
    head = make_head(tmp_path / "linear", "linear")
    # OUT2 is committed file by file as OUT was made: the write of OUT's last file fails, the job with it
    last = ids[3::4]
    faults("write", action="raise", match=part_name(last))
    with pytest.raises(Exception, match="fault injected"):  # file_size 1: a write call, so a file, per block
        apply_head(head, str(out), str(out2), batch_size=4, file_size=1)
    done = set(read_features(str(out2), columns=["sample_id"])["sample_id"].to_pylist()) if (out2 / "features").exists() else set()
    assert not done & set(last) and len(done) % 10 == 0  # whole files of OUT, never the failed one
    assert json.loads((out2 / JOB_FILE).read_text())["status"] == "failed"
    assert not status(str(out2))["complete"]

    faults("apply", action="record", once=False)
    summary = apply_head(head, str(out), str(out2), batch_size=4, file_size=1)
    applied = set("\n".join(recorded(faults_dir, "apply")).split("\n"))
    assert set(last) <= applied and not applied & done, "the rerun applied the head to rows already committed"
    assert summary.skipped >= len(done) and summary.skipped + summary.features == len(ids)
    assert_exactly_once(str(out2), ids)
    assert_whole_files(str(out2))
    assert status(str(out2))["complete"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_head_actor_killed_midway_still_gives_every_row_once(tmp_path, faults, faults_dir):
    out, out2 = tmp_path / "out", tmp_path / "out2"
    ids = make_table(out, n=24, files_per_folder=3)
    faults("apply", action="exit", after=2)  # the actor's process exits on its second batch
    summary = apply_head(make_head(tmp_path / "auto", "autoencoder"), str(out), str(out2), batch_size=4)
    assert (faults_dir / "apply.json.fired").exists()  # it did die; Ray restarted it and ran its batches again
    assert summary.features == len(ids) and not summary.errors
    assert_exactly_once(str(out2), ids)
    assert status(str(out2))["complete"]


@pytest.mark.timeout(300)
def test_credentials_of_the_input_and_the_output_appear_nowhere(s3, tmp_path):
    fs, options = s3
    local = tmp_path / "out"
    ids = make_table(local, n=12)
    fs.put(str(local), f"{S3_BUCKET}/out", recursive=True)
    planted = {**options, "secret": SECRET, "token": SECRET}
    head = make_head(tmp_path / "h", "linear", options=planted, uri=f"s3://{S3_BUCKET}/heads/linear")
    src, dst = f"s3://{S3_BUCKET}/out", f"s3://{S3_BUCKET}/out2"
    summary = apply_head(head, src, dst, storage_options=planted)
    assert summary.features == len(ids)
    assert_exactly_once(dst, ids, fs=fs)
    assert status(dst, planted)["complete"]
    fs.invalidate_cache()
    for path in fs.find(f"{S3_BUCKET}/out2"):
        data = fs.cat_file(path)
        assert SECRET.encode() not in data and options["key"].encode() not in data, path
    record = json.loads(fs.cat_file(f"{S3_BUCKET}/out2/{JOB_FILE}"))
    assert record["settings"]["apply.input"] == src
    assert read_errors(dst, fs) is None


def test_user_info_in_the_input_uri_is_masked_in_settings_record_and_metadata(tmp_path):
    from pipeline.train import apply

    out = tmp_path / "out"
    make_table(out, n=4)
    plan = apply._plan(make_head(tmp_path / "h", "mlp"), str(out), str(tmp_path / "o"), None, {}, {})
    uri = f"https://reader:{SECRET}@example.com/out?X-Amz-Signature={SECRET}"
    plan = dataclasses.replace(plan, table=dataclasses.replace(plan.table, uri=uri))
    written = json.dumps([apply.settings(plan), apply.provenance(plan), apply._record_head(plan)])
    assert SECRET not in written and "https://reader:***@example.com/out" in written
    with pytest.raises(ApplyError, match="batch_size"):
        apply_head(str(tmp_path / "h"), str(out), str(tmp_path / "o"), batch_size=0)
