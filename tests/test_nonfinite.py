"""Non-finite features are never published, with weights whose features overflow float16: an image
run end to end on the session's Ray, and a video job's stages in this process (the checks of each
stage alone are in test_models.py and test_temporal.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from pipeline.config import parse_job
from pipeline.extract.prepare import prepare
from pipeline.output.record import format_summary
from pipeline.samples import encode_video, make_image_folder

from conftest import accounted, job_dict, read_errors, run, video_stage_rows


def overflowing_resnet18(path) -> str:
    """A random-init ResNet-18 whose last BatchNorm adds 1e6 to every channel: its pooled features
    are finite in float32, inf in float16 (largest 65504)."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    state["layer4.1.bn2.bias"].fill_(1e6)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


@pytest.mark.timeout(240)
def test_features_that_overflow_float16_are_error_rows_not_features(tmp_path, ray_session):
    src, out = tmp_path / "images", tmp_path / "out"
    make_image_folder(str(src), n=4, broken=0)
    data = job_dict(str(src), str(out), name="overflow")
    data["model"] = {"arch": "resnet18", "weights": overflowing_resnet18(tmp_path / "big_bias.safetensors")}
    summary = run(data)
    assert summary.features == 0 and summary.errors == {"model/NonFiniteFeature": 4}
    assert "error          4  model/NonFiniteFeature" in format_summary(summary)
    features, errors = accounted(str(out))
    assert features == [] and len(errors) == 4  # every sample once, none of them as a feature
    messages = set(read_errors(str(out))["message"].to_pylist())
    assert messages == {"feature: 512 of 512 values overflow float16 (largest 65504): use output.dtype float32"}
    record = json.loads((out / "_job.json").read_text())
    assert record["status"] == "complete" and record["counts"]["errors_by_kind"] == {"model/NonFiniteFeature": 4}


def test_clip_features_that_overflow_float16_are_temporal_error_rows(tmp_path):
    """Frame features near 1e6 are finite in float32 (the model actor passes them on, the temporal
    heads take them so); their mean clip feature overflows float16 as stored: a temporal error row.
    Through the video stages in this process (decode, model actor, temporal actor); how error rows
    reach the errors table and the summary, the image run above shows."""
    src = tmp_path / "videos"
    (src / "a").mkdir(parents=True)
    for i in range(2):
        (src / "a" / f"v{i}.avi").write_bytes(encode_video(12 + i))
    data = job_dict(str(src), str(tmp_path / "out"), name="overflow-video", source={"format": "video_folder"},
                    resources={"batch_size": 8, "decode_batch_size": 2})
    data["model"] = {"arch": "resnet18", "weights": overflowing_resnet18(tmp_path / "big_bias.safetensors")}
    data["video"] = {"num_frames": 4}
    data["temporal"] = [{"kind": "mean", "name": "mean"}]
    rows = video_stage_rows(prepare(parse_job(data)), sorted(src.rglob("*.avi")), src)
    assert list(rows["sample_id"]) == ["a/v0.avi", "a/v1.avi"]
    assert list(rows["error_stage"]) == ["temporal"] * 2 and set(rows["error_type"]) == {"NonFiniteFeature"}
    assert set(rows["error_message"]) == {
        "clip_mean: 512 of 512 values overflow float16 (largest 65504): use output.dtype float32"}
