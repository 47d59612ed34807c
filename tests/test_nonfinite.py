"""Non-finite features are never published: end to end on the session's Ray, with weights whose
features overflow float16 (the stage-level checks are in test_models.py and test_temporal.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from pipeline.output.record import format_summary
from pipeline.samples import encode_video, make_image_folder

from conftest import accounted, job_dict, read_errors, run


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


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_clip_features_that_overflow_float16_are_temporal_error_rows(tmp_path, ray_session):
    """Frame features near 1e6 are finite in float32 (the temporal heads take them so); their mean
    clip feature overflows float16 as stored."""
    src, out = tmp_path / "videos", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    for i in range(2):
        (src / "a" / f"v{i}.avi").write_bytes(encode_video(12 + i))
    data = job_dict(str(src), str(out), name="overflow-video", source={"format": "video_folder"},
                    resources={"batch_size": 8, "decode_batch_size": 2})
    data["model"] = {"arch": "resnet18", "weights": overflowing_resnet18(tmp_path / "big_bias.safetensors")}
    data["video"] = {"num_frames": 4}
    data["temporal"] = [{"kind": "mean", "name": "mean"}]
    summary = run(data)
    assert summary.features == 0 and summary.errors == {"temporal/NonFiniteFeature": 2}
    assert set(read_errors(str(out))["message"].to_pylist()) == {
        "clip_mean: 512 of 512 values overflow float16 (largest 65504): use output.dtype float32"}
