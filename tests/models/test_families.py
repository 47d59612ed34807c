"""Model families beyond torchvision (timm, open_clip) behind the one actor: fidelity against each
library's own forward and preprocessing, weights from files, refusals, and a video job's stages per family.

Weights are random-init models saved to files here; nothing is downloaded.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
import open_clip
import pytest
import timm
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

from pipeline.config import parse_job
from pipeline.errors import ModelError, WeightsError
from pipeline.extract.decode import decode_image
from pipeline.extract.prepare import prepare
from pipeline.extract.video import center_crop
from pipeline.models.actor import Embedder, EmbedSpec
from pipeline.models.families.torchvision_video import input_defaults
from pipeline.output.root import differences, settings
from pipeline.samples import encode, encode_video, photo

from conftest import job_dict, video_stage_rows

JOBS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs")
CLIP = "ViT-S-32"  # the smallest plain open_clip ViT: 224 px, 384-d embedding


@pytest.fixture(scope="module")
def images():
    """Real-looking JPEGs of several sizes and aspect ratios."""
    return [encode(photo(w, h, seed), quality=92) for seed, (w, h) in enumerate([(320, 240), (200, 300)])]


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("family-weights")


def save(model: torch.nn.Module, path) -> str:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


def prepared_for(model: dict, preprocess: dict | None = None, tmp="/tmp/unused", video: dict | None = None):
    data = job_dict(f"{tmp}/src", f"{tmp}/out")
    data["model"] = {"device": "cpu", **model}  # float32 on any machine: the fidelity bounds are for float32
    data["preprocess"] = preprocess or {}
    if model.get("family") == "torchvision_video":
        data["source"]["format"] = "video_folder"
        data["video"] = video or {}
    return prepare(parse_job(data))


def pipeline_features(prepared, jpegs=(), clips=None):
    """What the pipeline's model actor writes for these files (float32), and the pixels it saw; for
    `clips` (N, T, H, W, 3), the clip features and the actor."""
    spec = EmbedSpec(model=prepared.job.model, weights=prepared.weights, crop=prepared.image.crop, dim=prepared.dim,
                     mean=prepared.mean, std=prepared.std, dtype="float32", torch_threads=2,
                     storage_options=prepared.model_options, clips=prepared.job.clips)
    embedder = Embedder(spec)
    if clips is not None:
        return embedder.embed(clips), embedder
    pixels = np.stack([decode_image(b, prepared.image)[0] for b in jpegs])
    return embedder.embed(pixels), pixels, embedder


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def as_tensor(pixels, mean, std) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# --- timm -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def timm_model(weights_dir):
    def make(arch: str, suffix: str = ".safetensors"):
        torch.manual_seed(7)
        model = timm.create_model(arch, pretrained=False).eval()
        return model, save(model, weights_dir / f"{arch}{suffix}")
    return make


@pytest.mark.parametrize("arch", ["convnext_atto", "vit_tiny_patch16_224"])
def test_timm_equals_timms_own_forward_and_preprocessing(timm_model, images, arch):
    model, path = timm_model(arch)
    prepared = prepared_for({"family": "timm", "arch": arch, "weights": path})
    data = resolve_data_config(model=model)
    # The job left preprocess unset: timm's own defaults (input size, crop_pct, interpolation, mean/std).
    assert prepared.image.crop == data["input_size"][-1] and prepared.image.interpolation == data["interpolation"]
    assert prepared.mean == pytest.approx(list(data["mean"])) and prepared.std == pytest.approx(list(data["std"]))
    ours, pixels, _ = pipeline_features(prepared, images)
    with torch.no_grad():
        same_pixels = model.forward_head(model.forward_features(as_tensor(pixels, data["mean"], data["std"])),
                                         pre_logits=True).numpy()
        transform = create_transform(**data)  # timm's eval transform on the original images
        own = torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
        timms = model.forward_head(model.forward_features(own), pre_logits=True).numpy()
    assert ours.shape == (len(images), model.num_features) == (len(images), prepared.dim)
    assert cosine(ours, same_pixels).min() >= 0.9999
    assert cosine(ours, timms).min() >= 0.99  # Pillow's resize over the crop box vs timm's resize, then crop


def test_timm_intermediate_stage_is_pooled_as_asked(timm_model, images):
    model, path = timm_model("convnext_atto", ".pth")  # a .pth, loaded with weights_only=True
    prepared = prepared_for({"family": "timm", "arch": "convnext_atto", "weights": path, "layer": "stages.2",
                             "pool": "max"}, {"resize": 72, "crop": 64})
    ours, pixels, _ = pipeline_features(prepared, images)
    with torch.no_grad():
        maps = model.forward_intermediates(as_tensor(pixels, prepared.mean, prepared.std), indices=[2],
                                           intermediates_only=True)[0]
    assert prepared.dim == maps.shape[1] == ours.shape[1]
    assert cosine(ours, maps.amax(dim=(2, 3)).numpy()).min() >= 0.9999


def test_a_timm_checkpoint_fine_tuned_on_other_classes_fits(weights_dir, images):
    torch.manual_seed(3)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()  # a user's 10-class model
    prepared = prepared_for({"family": "timm", "arch": "resnet18", "weights": save(model, weights_dir / "r18-10.pth")},
                            {"resize": 64, "crop": 64})
    ours, pixels, _ = pipeline_features(prepared, images)
    with torch.no_grad():
        ref = model.forward_head(model.forward_features(as_tensor(pixels, prepared.mean, prepared.std)), pre_logits=True)
    assert cosine(ours, ref.numpy()).min() >= 0.9999


def test_timm_refusals_name_the_key(timm_model, tmp_path):
    _, path = timm_model("resnet18")
    with pytest.raises(ModelError, match=r"model.arch: 'resnet18x' is not a timm model; did you mean resnet18"):
        prepared_for({"family": "timm", "arch": "resnet18x", "weights": "none"})
    with pytest.raises(ModelError, match=r"model.layer: 'layer9' is not a module of resnet18; did you mean"):
        prepared_for({"family": "timm", "arch": "resnet18", "weights": "none", "layer": "layer9"})
    with pytest.raises(WeightsError, match=r"does not fit convnext_atto"):
        prepared_for({"family": "timm", "arch": "convnext_atto", "weights": path})
    with pytest.raises(WeightsError, match=r"sha256"):
        prepared_for({"family": "timm", "arch": "resnet18", "weights": path, "weights_sha256": "0" * 64})
    with pytest.raises(WeightsError, match=r"not in the local Hugging Face cache; offline, fetch https://huggingface.co/"
                                           r"timm/resnet18.a1_in1k/resolve/main/model.safetensors"):
        prepared_for({"family": "timm", "arch": "resnet18", "weights": "DEFAULT"})
    with pytest.raises(WeightsError, match=r"'nope' is not a pretrained tag of resnet18 \(DEFAULT, a1_in1k"):
        prepared_for({"family": "timm", "arch": "resnet18", "weights": "nope"})
    with pytest.raises(ModelError, match=r"preprocess.crop: vit_tiny_patch16_224 does not take 64x64 .*crop 224"):
        prepared_for({"family": "timm", "arch": "vit_tiny_patch16_224", "weights": "none"}, {"resize": 64, "crop": 64})


def test_a_tag_in_the_hugging_face_cache_is_used_offline(timm_model, tmp_path, monkeypatch):
    model, path = timm_model("resnet18")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    snapshot = tmp_path / "models--timm--resnet18.a2_in1k" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(open(path, "rb").read())
    (tmp_path / "models--timm--resnet18.a2_in1k" / "refs").mkdir()
    (tmp_path / "models--timm--resnet18.a2_in1k" / "refs" / "main").write_text("abc")
    prepared = prepared_for({"family": "timm", "arch": "resnet18", "weights": "a2_in1k"})
    assert prepared.weights.id == "timm:resnet18.a2_in1k"
    assert prepared.image.crop == 224 and prepared.image.resize == 235  # the a2 tag's crop_pct 0.95


# --- open_clip ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_model(weights_dir):
    torch.manual_seed(11)
    model, _, preprocess = open_clip.create_model_and_transforms(CLIP, pretrained=None)
    return model.eval(), preprocess, save(model, weights_dir / "clip.safetensors")


def test_open_clip_equals_encode_image_with_its_own_preprocessing(clip_model, images):
    model, preprocess, path = clip_model
    prepared = prepared_for({"family": "open_clip", "arch": CLIP, "weights": path})
    assert (prepared.image.resize, prepared.image.crop, prepared.image.interpolation) == (224, 224, "bicubic")
    assert prepared.dim == 384
    ours, pixels, embedder = pipeline_features(prepared, images)
    # The actor holds the image tower only: the text tower was never built, its weights dropped.
    held = sum(p.numel() for p in embedder.module.parameters())
    assert held == sum(p.numel() for p in model.visual.parameters()) < sum(p.numel() for p in model.parameters()) / 1.5
    with torch.no_grad():
        same_pixels = model.encode_image(as_tensor(pixels, prepared.mean, prepared.std), normalize=True).numpy()
        own = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
        clips = model.encode_image(own, normalize=True).numpy()
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)  # L2-normalised, as CLIP search expects
    assert cosine(ours, same_pixels).min() >= 0.9999
    assert cosine(ours, clips).min() >= 0.99


def test_open_clip_refusals_name_the_file_or_the_tags():
    with pytest.raises(WeightsError, match=r"'DEFAULT' is not a pretrained tag of ViT-B-32 \(openai, laion400m_e31"):
        prepared_for({"family": "open_clip", "arch": "ViT-B-32"})
    with pytest.raises(WeightsError, match=r"offline, fetch https://huggingface.co/timm/vit_base_patch32_clip_224"
                                           r".openai/resolve/main/open_clip_model.safetensors"):
        prepared_for({"family": "open_clip", "arch": "ViT-B-32", "weights": "openai"})
    with pytest.raises(ModelError, match=r"model.arch: 'ViT-B-33' is not a model of open_clip; did you mean ViT-B-32"):
        prepared_for({"family": "open_clip", "arch": "ViT-B-33", "weights": "none"})


def test_the_family_is_in_the_settings_so_a_resume_with_another_is_refused():
    tv = prepared_for({"arch": "resnet18", "weights": "none"}, {"resize": 64, "crop": 56})
    tm = prepared_for({"family": "timm", "arch": "resnet18", "weights": "none"}, {"resize": 64, "crop": 56})
    assert "model.family" not in settings(tv)  # outputs made before families hold none: still resumable
    assert "model.family (null -> \"timm\")" in differences(settings(tv), settings(tm))
    assert tm.provenance()["featurize.model_family"] == "timm"
    assert tv.provenance()["featurize.model_family"] == "torchvision"


# --- torchvision_video: clip models, one feature per clip -------------------------------------------------

VIDEO = {"family": "torchvision_video", "weights": "none"}


@pytest.mark.parametrize("arch,dim,crop,frames", [
    ("r3d_18", 512, 56, 8), ("mc3_18", 512, 56, 8), ("r2plus1d_18", 512, 56, 8),
    pytest.param("swin3d_t", 768, 64, 4, marks=pytest.mark.slow),
    pytest.param("swin3d_s", 768, 64, 4, marks=pytest.mark.slow),
    pytest.param("swin3d_b", 1024, 64, 4, marks=pytest.mark.slow),
    pytest.param("s3d", 1024, 224, 14, marks=pytest.mark.slow),  # its pooling needs 7x7 by 2 at the end
    pytest.param("mvit_v1_b", 768, 224, 16, marks=pytest.mark.slow),  # fixed positions: 16 frames at 224
    pytest.param("mvit_v2_s", 768, 224, 16, marks=pytest.mark.slow),
])
def test_every_clip_model_builds_and_gives_its_dimension(arch, dim, crop, frames):
    prepared = prepared_for({**VIDEO, "arch": arch}, {"resize": crop, "crop": crop},
                            video={"num_frames": frames})
    assert prepared.dim == dim and prepared.job.clips and prepared.sink_spec().columns[-1][0] == "feature"
    clip = np.random.default_rng(0).integers(0, 256, (1, frames, crop, crop, 3), dtype=np.uint8)
    assert pipeline_features(prepared, clips=clip)[0].shape == (1, dim)


def test_clip_defaults_come_from_the_weights():
    """r2plus1d_18's KINETICS400_V1 (its DEFAULT, also for `none`): frames resized to exactly 128x171,
    cropped to 112, Kinetics' mean and std, 16 frames; s3d squashes to 256 and reads 128 frames."""
    p = prepared_for({**VIDEO, "arch": "r2plus1d_18"})
    assert (p.image.resize, p.image.crop, p.job.video.num_frames, p.frame_size) == (128, 112, 16, (128, 171))
    assert p.mean == [0.43216, 0.394666, 0.37645] and p.std == [0.22803, 0.22145, 0.216989]
    assert p.frames.scaled(320, 240) == p.frames.scaled(1920, 1080) == (171, 128)  # as Resize([128, 171])
    assert json.loads(p.provenance()["featurize.preprocess"])["frame_size"] == [128, 171]
    own = prepared_for({**VIDEO, "arch": "r2plus1d_18"}, {"resize": 64, "crop": 56}, video={"num_frames": 4})
    assert own.frame_size is None and own.frames.scaled(320, 240) == (85, 64)  # the job's keys win
    s3d = input_defaults(torchvision.models.get_model_weights("s3d").DEFAULT)
    assert (s3d["resize"], s3d["crop"], s3d["resize_mode"], s3d["num_frames"]) == (256, 224, "squash", 128)


@pytest.fixture(scope="module")
def r2plus1d(weights_dir):
    torch.manual_seed(3)
    model = torchvision.models.video.r2plus1d_18().eval()
    return model, save(model, weights_dir / "r2plus1d_18.safetensors")


def test_clip_preprocessing_and_features_equal_torchvisions(r2plus1d):
    """Frames at the weights' size (the decoder's resize; torchvision's is then the identity): the
    actor's crop, normalisation and layout give torchvision's `transforms()` tensor, and the
    feature its own forward (penultimate: fc removed)."""
    model, path = r2plus1d
    prepared = prepared_for({**VIDEO, "arch": "r2plus1d_18", "weights": path}, video={"num_frames": 8})
    frames = np.random.default_rng(1).integers(0, 256, (2, 8, 128, 171, 3), dtype=np.uint8)
    clips = np.stack([center_crop(f, prepared.image.crop) for f in frames])
    ours, embedder = pipeline_features(prepared, clips=clips)
    reference = torchvision.models.get_weight("R2Plus1D_18_Weights.KINETICS400_V1").transforms()
    expected = torch.stack([reference(torch.from_numpy(f).permute(0, 3, 1, 2)) for f in frames])  # N, C, T, H, W
    torch.testing.assert_close(embedder.input(clips), expected, rtol=0, atol=1e-5)
    model.fc = torch.nn.Identity()
    with torch.inference_mode():
        theirs = model(expected).numpy()
    assert cosine(ours, theirs).min() >= 0.9999


def test_clip_weights_files_load_and_wrong_ones_are_refused(r2plus1d, weights_dir):
    model, path = r2plus1d
    clip = np.random.default_rng(2).integers(0, 256, (1, 4, 56, 56, 3), dtype=np.uint8)
    small = {"resize": 64, "crop": 56}
    loaded = pipeline_features(prepared_for({**VIDEO, "arch": "r2plus1d_18", "weights": path}, small,
                                            video={"num_frames": 4}), clips=clip)[0]
    random = pipeline_features(prepared_for({**VIDEO, "arch": "r2plus1d_18"}, small, video={"num_frames": 4}),
                               clips=clip)[0]
    model.fc = torch.nn.Identity()
    with torch.inference_mode():  # the file's weights, not the seed's
        theirs = model(torch.from_numpy(clip).permute(0, 4, 1, 2, 3).float().sub(
            torch.tensor([0.43216, 0.394666, 0.37645]).view(1, 3, 1, 1, 1) * 255).div(
            torch.tensor([0.22803, 0.22145, 0.216989]).view(1, 3, 1, 1, 1) * 255)).numpy()
    np.testing.assert_allclose(loaded, theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(loaded, random, rtol=1e-2)
    r3d = save(torchvision.models.video.r3d_18(), weights_dir / "r3d_18.pth")
    with pytest.raises(WeightsError, match=r"^model.weights: .*r3d_18.pth does not fit r2plus1d_18 \(") as e:
        prepared_for({**VIDEO, "arch": "r2plus1d_18", "weights": r3d}, small, video={"num_frames": 4})
    assert "\n" not in str(e.value)
    with pytest.raises(ModelError, match=r"is not a model of torchvision_video; did you mean r2plus1d_18"):
        prepared_for({**VIDEO, "arch": "r2plus1d_19"})
    with pytest.raises(ModelError, match=r"does not take clips of 4 frames at 64x64 .*its weights use crop 224"):
        prepared_for({**VIDEO, "arch": "s3d"}, {"resize": 64, "crop": 64}, video={"num_frames": 4})


# --- a video job per family, through extraction's own stage functions ----------------------------------

@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-videos")
    for cls in ("Basketball", "Drumming"):
        (root / cls).mkdir()
        (root / cls / f"v_{cls}_g01_c01.avi").write_bytes(encode_video(20, width=160, height=120))
    return root


@pytest.mark.parametrize("model,preprocess", [
    ({"family": "timm", "arch": "convnext_atto", "weights": "none"}, {"resize": 64, "crop": 64}),
    ({"family": "open_clip", "arch": CLIP, "weights": "none"}, {}),
])
def test_a_video_job_per_family(two_videos, tmp_path, model, preprocess):
    """Each family's image model on a video job's frames: frame_features per video, the mean head over
    them, and the family and its crop in the provenance every features file carries. (A whole video
    run on Ray: test_video_end_to_end; the stages are family-blind past the model actor.)"""
    data = job_dict(str(two_videos), str(tmp_path / "out"), name="family-video", source={"format": "video_folder"},
                    output={"frame_features": True, "dtype": "float32"}, resources={"batch_size": 8})
    data.update(model={"device": "cpu", **model}, preprocess=preprocess, video={"num_frames": 3},
                temporal=[{"kind": "mean", "name": "mean"}])
    prepared = prepare(parse_job(data))
    rows = video_stage_rows(prepared, sorted(two_videos.rglob("*.avi")), two_videos)
    assert len(rows["sample_id"]) == 2 and not any(rows["error_stage"])
    frames = np.stack([np.stack(f) for f in rows["frame_features"]])
    clips = np.stack(rows["clip_mean"])
    assert frames.shape[:2] == (2, 3) and clips.shape == (2, frames.shape[2]) == (2, prepared.dim)
    np.testing.assert_allclose(clips, frames.mean(axis=1), rtol=1e-4, atol=1e-5)
    meta = prepared.provenance()
    assert meta["featurize.model_family"] == model["family"]
    assert json.loads(meta["featurize.preprocess"])["crop"] == (preprocess.get("crop") or 224)


def test_the_example_jobs_parse_and_an_unknown_family_is_refused(tmp_path):
    from pipeline.config import load_job
    from pipeline.errors import ConfigError

    assert load_job(f"{JOBS}/images_timm_convnext.yaml").model.family == "timm"
    assert load_job(f"{JOBS}/images_open_clip_vit_b32.yaml").model.arch == "ViT-B-32"
    clips = load_job(f"{JOBS}/ucf101_r2plus1d_clips.yaml")
    assert clips.clips and clips.model.weights == "KINETICS400_V1" and clips.video.window_s == 2.0
    assert parse_job(job_dict("src", "out")).model.family == "torchvision"  # job files without the key, as before
    with pytest.raises(ConfigError, match=r"model.family: 'keras' is not one of torchvision, open_clip, timm"):
        load_job(f"{JOBS}/images_timm_convnext.yaml", ["model.family=keras"])
