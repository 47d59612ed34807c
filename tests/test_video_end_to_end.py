"""Video jobs end to end on the shared local Ray: a UCF101-style tree with its split lists (and the
order videos of make_order_videos), webdataset video shards, and windows over a long video; every
video accounted for once."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.samples import encode_video, make_order_videos

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


ORDER = ("a_then_b", "b_then_a")


@pytest.fixture(scope="module")
def ucf101(tmp_path_factory):
    """UCF-101/<Class>/v_<Class>_gXX_cYY.avi (MPEG-4 Part 2 in AVI) and its split lists, with the
    order videos of test_order_videos (make_order_videos) as two more classes in the same lists."""
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
    order = make_order_videos(str(base / "order"), n=8, frames=16, size=64, seed=3)
    for cls in ORDER:
        (base / "order" / cls).rename(root / cls)
    order_lists = {split: listed(path) for split, path in order["split_files"].items()}
    (base / "trainlist01.txt").write_text("".join(f"{n} {1 + (n[0] == 'B')}\n" for n in train)
                                          + "".join(f"{n} {3 + (n[0] == 'b')}\n" for n in order_lists["train"]))
    (base / "testlist01.txt").write_text("".join(f"{n}\r\n" for n in test + order_lists["test"]))
    return base, train, test, order_lists


def listed(path):
    with open(path) as f:
        return f.read().split()


@pytest.fixture(scope="module")
def ucf101_run(ray_session, ucf101, tmp_path_factory):
    """One run over the UCF-101 tree (6 frames a video, three heads, frame_features kept): (out, summary)."""
    base = ucf101[0]
    out = str(tmp_path_factory.mktemp("ucf-out") / "out")
    split_files = {"train": str(base / "trainlist01.txt"), "test": str(base / "testlist01.txt")}
    summary = run(video_job(str(base / "UCF-101"), out,
                            source={"format": "video_folder", "split_files": split_files},
                            output={"frame_features": True}))
    return out, summary


@pytest.mark.timeout(300)
def test_ucf101_tree_with_split_lists(ucf101, ucf101_run):
    base, train, test, order = ucf101
    out, summary = ucf101_run
    features, errors = assert_exactly_once(out, train + test + order["train"] + order["test"])
    assert sorted(errors) == ["Basketball/v_Basketball_g09_c01.avi", "Basketball/v_Basketball_g10_c01.avi"]
    assert summary.features == 6 + 8 and sum(summary.errors.values()) == 2

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
    meta = pq.read_schema(next((Path(out) / "features").rglob("*.parquet"))).metadata
    heads = json.loads(meta[b"featurize.temporal"])
    assert [h["name"] for h in heads] == ["mean", "lstm", "attn"]
    assert json.loads(meta[b"featurize.video_sampling"])["num_frames"] == 6


@pytest.mark.timeout(300)
def test_featurize_reads_order_videos_with_their_splits(ucf101, ucf101_run):
    """make_order_videos' videos (test_order_videos) in that run: their own split lists and labels,
    and the same scene's frame features in both classes equal with the halves swapped (6 frames of
    16: frames 1, 4, 6 from the first half, 9, 12, 14 from the second)."""
    order = ucf101[3]
    rows = [r for r in read_features(ucf101_run[0]).to_pylist() if r["label"] in ORDER]
    assert len(rows) == 8
    assert {(r["split"], r["label"]) for r in rows} == {(s, c) for s in ("train", "test") for c in ORDER}
    for r in rows:
        assert r["sample_id"] in order[r["split"]]
        assert r["sample_id"].startswith(r["label"] + "/")
        assert np.array(r["frame_features"], np.float32).shape == (6, 512)
    by_id = {r["sample_id"]: np.array(r["frame_features"], np.float32) for r in rows}
    for name, a in by_id.items():
        if name.startswith(ORDER[0]):
            b = by_id[name.replace(ORDER[0], ORDER[1])]
            swapped = np.concatenate([b[3:], b[:3]])
            scale = np.abs(a[:3].mean(0) - a[3:].mean(0)).mean()
            assert np.abs(a - swapped).mean() < 0.25 * scale  # codec noise only
            assert np.abs(a.mean(0) - b.mean(0)).mean() < 0.1 * scale  # mean pooling: the same


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


@pytest.mark.timeout(300)
def test_clip_model_windows_equal_its_own_forward_on_pyav_frames(ray_session, tmp_path):
    """model.family torchvision_video: each window's frames (C, T, H, W) through r2plus1d_18 in one
    forward, one row per window with `feature`; each row equals the model's own forward on the frames
    PyAV decodes at the row's frame_timestamps_s, preprocessed as torchvision does."""
    import av
    import torch
    import torchvision
    from safetensors.torch import save_file
    from torchvision.transforms import functional as F

    root = tmp_path / "videos"
    (root / "a").mkdir(parents=True)
    (root / "a" / "long.avi").write_bytes(encode_video(50, width=160, height=120))  # 2 s: two 1 s windows
    (root / "a" / "broken.avi").write_bytes(b"RIFF....AVI garbage" * 40)
    torch.manual_seed(5)
    model = torchvision.models.video.r2plus1d_18().eval()
    weights = str(tmp_path / "r2plus1d_18.safetensors")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    out = str(tmp_path / "out")
    data = video_job(str(root), out, video={"num_frames": 4, "window_s": 1.0}, temporal=[],
                     model={"family": "torchvision_video", "arch": "r2plus1d_18", "weights": weights})
    data["preprocess"] = {"resize": 64, "crop": 56}
    summary = run(data)
    assert summary.features == 2 and summary.errors == {"decode/VideoDecodeError": 1}
    features, errors = assert_exactly_once(out, ["a/long.avi#w0", "a/long.avi#w1", "a/broken.avi"])
    table = read_features(out)
    assert {"feature", "start_s", "end_s", "frame_timestamps_s"} <= set(table.column_names)
    assert not [c for c in table.column_names if c.startswith("clip_") or c == "frame_features"]
    rows = {r["sample_id"]: r for r in table.to_pylist()}
    assert [(rows[f"a/long.avi#w{k}"]["start_s"], rows[f"a/long.avi#w{k}"]["end_s"]) for k in (0, 1)] == [
        (0.0, 1.0), (1.0, 2.0)]
    model.fc = torch.nn.Identity()
    mean, std = torch.tensor([0.43216, 0.394666, 0.37645]), torch.tensor([0.22803, 0.22145, 0.216989])
    for sample_id, row in rows.items():
        with av.open(str(root / sample_id.split("#")[0])) as container:
            decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        frames = torch.from_numpy(np.stack([decoded[round(t * row["fps"])] for t in row["frame_timestamps_s"]]))
        x = F.center_crop(F.resize(frames.permute(0, 3, 1, 2), 64, antialias=True), 56).float() / 255
        x = ((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).permute(1, 0, 2, 3)  # C, T, H, W
        with torch.inference_mode():
            expected = model(x[None])[0].numpy()
        got = np.asarray(row["feature"], np.float64)
        assert got.shape == (512,) and len(row["frame_timestamps_s"]) == 4
        assert got @ expected / np.linalg.norm(got) / np.linalg.norm(expected) >= 0.99, sample_id
    meta = pq.ParquetFile(next((tmp_path / "out" / "features").rglob("*.parquet"))).schema_arrow.metadata
    assert json.loads(meta[b"featurize.video_sampling"])["num_frames"] == 4
    assert meta[b"featurize.model_family"] == b"torchvision_video"
