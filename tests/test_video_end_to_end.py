"""Video jobs end to end on the shared local Ray: a UCF101-style tree with its split lists,
webdataset video shards, and windows over a long video; every video accounted for once."""
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.samples import encode_video

from conftest import assert_exactly_once, job_dict, read_errors, read_features, run

HEADS = [
    {"kind": "mean", "name": "mean"},
    {"kind": "lstm", "name": "lstm", "allow_random_init": True, "hidden_size": 24},
    {"kind": "attention", "name": "attn", "allow_random_init": True},
]


def video_job(source_uri, out, **extra):
    data = job_dict(source_uri, out, name="e2e-video", source={"format": "video_folder"},
                    resources={"batch_size": 16, "decode_batch_size": 4})
    data["video"] = {"num_frames": 6, **extra.pop("video", {})}
    data["temporal"] = extra.pop("temporal", HEADS)
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value}
    return data


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory):
    """UCF-101/<Class>/v_<Class>_gXX_cYY.avi (MPEG-4 Part 2 in AVI) and its split lists."""
    base = tmp_path_factory.mktemp("ucf")
    root = base / "UCF-101"
    train, test = [], []
    for cls in ("ApplyEyeMakeup", "Basketball"):
        (root / cls).mkdir(parents=True)
        for group in (1, 2, 3):
            name = f"{cls}/v_{cls}_g0{group}_c01.avi"
            (root / name).write_bytes(encode_video(30 + 5 * group))
            (test if group == 1 else train).append(name)
    (root / "Basketball" / "v_Basketball_g09_c01.avi").write_bytes(b"RIFF....AVI garbage" * 40)
    test.append("Basketball/v_Basketball_g09_c01.avi")
    (root / "Basketball" / "v_Basketball_g10_c01.avi").write_bytes(b"")
    train.append("Basketball/v_Basketball_g10_c01.avi")
    (base / "trainlist01.txt").write_text("".join(f"{n} {1 + (n[0] == 'B')}\n" for n in train))
    (base / "testlist01.txt").write_text("".join(f"{n}\r\n" for n in test))
    return base, train, test


@pytest.mark.timeout(300)
def test_ucf101_tree_with_split_lists(ray_session, ucf101, tmp_path):
    base, train, test = ucf101
    out = str(tmp_path / "out")
    split_files = {"train": str(base / "trainlist01.txt"), "test": str(base / "testlist01.txt")}
    summary = run(video_job(str(base / "UCF-101"), out,
                            source={"format": "video_folder", "split_files": split_files},
                            output={"frame_features": True}))
    features, errors = assert_exactly_once(out, train + test)
    assert sorted(errors) == ["Basketball/v_Basketball_g09_c01.avi", "Basketball/v_Basketball_g10_c01.avi"]
    assert summary.features == 6 and sum(summary.errors.values()) == 2

    table = read_features(out)
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    assert {r["split"] for r in rows.values()} == {"train", "test"}
    assert all(rows[n]["split"] == "train" for n in train if n in rows)
    assert all(rows[n]["split"] == "test" for n in test if n in rows)
    assert rows["Basketball/v_Basketball_g02_c01.avi"]["label"] == "Basketball"
    clip = rows["ApplyEyeMakeup/v_ApplyEyeMakeup_g03_c01.avi"]  # 45 frames at 25 fps
    assert clip["decoder"] == "decord" and clip["fps"] == pytest.approx(25.0)
    assert clip["num_frames"] == 6 and clip["end_s"] == pytest.approx(1.8)
    assert np.allclose(clip["frame_timestamps_s"], (np.arange(6) + 0.5) * 45 / 6 // 1 / 25, atol=1e-4)
    schema = table.schema
    assert schema.field("clip_mean").type == pa.list_(pa.float16(), 512)
    assert schema.field("clip_lstm").type == pa.list_(pa.float16(), 24)
    assert schema.field("clip_attn").type == pa.list_(pa.float16(), 512)
    assert schema.field("frame_features").type == pa.list_(pa.list_(pa.float16(), 512))
    frames = np.array(clip["frame_features"], dtype=np.float32)
    assert frames.shape == (6, 512)
    np.testing.assert_allclose(np.array(clip["clip_mean"], np.float32), frames.mean(0), rtol=2e-2, atol=2e-2)

    errors_table = read_errors(out)
    assert set(errors_table["stage"].to_pylist()) == {"decode"}
    meta = pq.read_schema(next((tmp_path / "out" / "features").rglob("*.parquet"))).metadata
    heads = json.loads(meta[b"featurize.temporal"])
    assert [h["name"] for h in heads] == ["mean", "lstm", "attn"]
    assert json.loads(meta[b"featurize.video_sampling"])["num_frames"] == 6


@pytest.mark.timeout(300)
def test_webdataset_video_shards_and_windows(ray_session, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    expected = []
    for s in range(2):
        with tarfile.open(shards / f"vid-{s:03d}.tar", "w") as tar:
            for k, (data, ext, label) in enumerate([
                (encode_video(50, codec="libx264", fmt="mp4"), "mp4", "run"),  # 2 s
                (encode_video(20, codec="libvpx-vp9", fmt="webm"), "webm", "jump"),
                (b"\x00" * 300, "mkv", "bad"),
            ]):
                for name, payload in ((f"k{k}.{ext}", data), (f"k{k}.json", json.dumps({"label": label}).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                # 1 s windows, 0.5 s apart: the 2 s video gives 3 rows, the 0.8 s one a single row
                windows = ["#w0", "#w1", "#w2"] if k == 0 else ["#w0"]
                expected += [f"vid-{s:03d}.tar/k{k}{w}" for w in (windows if k < 2 else [""])]
    out = str(tmp_path / "out")
    run(video_job(str(shards / "vid-{000..001}.tar"), out, source={"format": "webdataset"},
                  video={"window_s": 1.0, "stride_s": 0.5, "num_frames": 4},
                  temporal=[{"kind": "max", "name": "max"}]))
    features, errors = assert_exactly_once(out, expected)
    assert sorted(errors) == ["vid-000.tar/k2", "vid-001.tar/k2"]
    rows = {r["sample_id"]: r for r in read_features(out).to_pylist()}
    assert [(rows[f"vid-000.tar/k0#w{i}"]["start_s"], rows[f"vid-000.tar/k0#w{i}"]["end_s"]) for i in range(3)] == [
        (0.0, 1.0), (0.5, 1.5), (1.0, 2.0)]
    assert rows["vid-001.tar/k1#w0"]["label"] == "jump"
