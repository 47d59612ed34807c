"""The pixels the model receives are the reference transform's: torchvision's Resize + CenterCrop
(on PIL images and on tensors), timm's create_transform of resolve_data_config and open_clip's
preprocess, over sizes whose resize - crop is odd and even, portrait, landscape, tiny and extreme.
Real photos: scikit-learn's two sample images, saved as PNG (no JPEG draft decoding involved)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from pipeline.extract.decode import ImageSpec, decode_image
from pipeline.extract.device_decode import _resize_center_crop
from pipeline.extract.geometry import crop_offsets, resized_size, source_box
from pipeline.extract.video import center_crop, scaled_size

SIZES = [(640, 427), (427, 640), (301, 200), (200, 301), (17, 9), (9, 17), (1000, 37), (240, 240), (255, 256)]
PAIRS = [(256, 224), (235, 224), (232, 224), (224, 224)]  # resize - crop even, odd, even, none
MODES = ["bilinear", "bicubic", "nearest"]


@pytest.fixture(scope="module")
def photos():
    from sklearn.datasets import load_sample_images

    return [np.asarray(a) for a in load_sample_images().images]  # 640x427 each: china, flower


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _reference(pixels: np.ndarray, resize: int, crop: int, mode: str) -> np.ndarray:
    transform = T.Compose([T.Resize(resize, getattr(T.InterpolationMode, mode.upper())), T.CenterCrop(crop)])
    return np.asarray(transform(Image.fromarray(pixels)))


def _unnormalised(tensor: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """A reference transform's normalised (3, H, W) tensor back to (H, W, 3) uint8 pixels."""
    return (tensor * std + mean).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def _close(got: np.ndarray, want: np.ndarray, where) -> None:
    """The issue's bar: within 1 level on average and at most 1% of pixels more than 8 apart."""
    assert got.shape == want.shape, where
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.mean() <= 1.0 and (diff > 8).mean() <= 0.01, (where, diff.mean(), (diff > 8).mean())


def test_the_geometry_is_torchvisions():
    assert resized_size(640, 427, 235) == (352, 235)  # 352.3 truncated, as torchvision does
    assert resized_size(427, 640, 235) == (235, 352)
    assert crop_offsets(235, 352, 224) == (6, 64)  # 5.5 rounds half to even: 6
    assert crop_offsets(233, 233, 224) == (4, 4)  # 4.5: 4
    box = source_box(640, 427, 235, 224)
    assert box[0] == pytest.approx(64 * 640 / 352) and box[1] == pytest.approx(6 * 427 / 235)
    assert box[2] - box[0] == pytest.approx(224 * 640 / 352)
    assert scaled_size(1920, 1080, 128) == (227, 128)  # video: the decoder scales to the same sizes


@pytest.mark.parametrize("mode", MODES)
def test_pil_pixels_equal_torchvisions_resize_and_center_crop(photos, mode):
    for k, (w, h) in enumerate(SIZES):
        src = np.asarray(Image.fromarray(photos[k % 2]).resize((w, h), Image.Resampling.BILINEAR))
        for resize, crop in PAIRS:
            got, width, height = decode_image(_png(src), ImageSpec(resize, crop, mode))
            assert (width, height) == (w, h)
            _close(got, _reference(src, resize, crop, mode), (w, h, resize, crop, mode))


@pytest.mark.parametrize("mode", MODES)
def test_device_pixels_equal_torchvisions_tensor_transform(photos, mode):
    for k, (w, h) in enumerate(SIZES):
        src = np.asarray(Image.fromarray(photos[k % 2]).resize((w, h), Image.Resampling.BILINEAR))
        tensor = torch.from_numpy(src.copy()).permute(2, 0, 1).contiguous()
        for resize, crop in PAIRS:
            got = _resize_center_crop(tensor, ImageSpec(resize, crop, mode)).permute(1, 2, 0).numpy()
            want = T.CenterCrop(crop)(T.Resize(resize, getattr(T.InterpolationMode, mode.upper()))(tensor))
            _close(got, want.permute(1, 2, 0).numpy(), (w, h, resize, crop, mode))


def test_timms_own_transform_and_its_convnext_feature(photos):
    """convnext_tiny: crop_pct 0.95 (resize 235, crop 224), bicubic: the issue's case, where the
    exact-centre crop moved the picture half a pixel (cosine 0.978 at worst)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from pipeline.models.families import timm as family

    model = timm.create_model("convnext_tiny", pretrained=False).eval()
    reference = create_transform(**resolve_data_config(model=model))
    ours = family.data_config("convnext_tiny")
    spec = ImageSpec(ours["resize"], ours["crop"], ours["interpolation"])
    assert (spec.resize, spec.crop, spec.interpolation) == (235, 224, "bicubic")
    mean, std = torch.tensor(ours["mean"])[:, None, None], torch.tensor(ours["std"])[:, None, None]
    for k, (w, h) in enumerate([(640, 427), (427, 640), (301, 200)]):
        src = np.asarray(Image.fromarray(photos[k % 2]).resize((w, h), Image.Resampling.BILINEAR))
        got, _, _ = decode_image(_png(src), spec)
        want = reference(Image.fromarray(src))  # normalised tensor
        _close(got, _unnormalised(want, mean, std), (w, h))
        ours_in = (torch.from_numpy(got).permute(2, 0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            a, b = model(ours_in[None]), model(want[None])
        assert torch.nn.functional.cosine_similarity(a, b).item() >= 0.999


def test_torchvisions_convnext_feature_on_an_odd_resize_minus_crop(photos):
    """A random-init torchvision ConvNeXt-T on resize 235, crop 224 (odd: the half-pixel case). A
    weak detector (the old exact-centre crop, 5.6 levels off on the first photo, still gave 0.9998):
    the pixel tests above are the check; this is the issue's bar on the feature."""
    import torchvision

    model = torchvision.models.convnext_tiny(weights=None).eval()
    reference = T.Compose([T.Resize(235), T.CenterCrop(224), T.ToTensor()])
    for k, (w, h) in enumerate([(640, 427), (427, 640), (1000, 37)]):
        src = np.asarray(Image.fromarray(photos[k % 2]).resize((w, h), Image.Resampling.BILINEAR))
        got, _, _ = decode_image(_png(src), ImageSpec(235, 224, "bilinear"))
        with torch.no_grad():
            a = model(torch.from_numpy(got.copy()).permute(2, 0, 1).float()[None] / 255)
            b = model(reference(Image.fromarray(src))[None])
        assert torch.nn.functional.cosine_similarity(a, b).item() >= 0.999, (w, h)


def test_open_clips_own_preprocess(photos):
    import open_clip

    from pipeline.models.families import open_clip as family

    _, _, reference = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    ours = family.preprocess("ViT-B-32", {})
    spec = ImageSpec(ours["resize"], ours["crop"], ours["interpolation"])
    mean, std = torch.tensor(ours["mean"])[:, None, None], torch.tensor(ours["std"])[:, None, None]
    for k, (w, h) in enumerate([(640, 427), (427, 640), (1000, 37)]):
        src = np.asarray(Image.fromarray(photos[k % 2]).resize((w, h), Image.Resampling.BILINEAR))
        got, _, _ = decode_image(_png(src), spec)
        want = reference(Image.fromarray(src))
        _close(got, _unnormalised(want, mean, std), (w, h))


def test_video_frames_are_cropped_where_torchvision_crops(photos):
    """The decoder scales frames to torchvision's size (scaled_size); the crop is then at its offsets."""
    frames = np.stack([np.asarray(Image.fromarray(p).resize((352, 235))) for p in photos])  # 235 - 224: odd
    got = center_crop(frames, 224)
    want = np.stack([np.asarray(T.CenterCrop(224)(Image.fromarray(f))) for f in frames])
    assert np.array_equal(got, want)


def test_jpeg_draft_false_decodes_at_full_size_as_the_reference_does(photos):
    from pipeline.config import parse_job
    from pipeline.extract.prepare import _resolve_image

    buf = io.BytesIO()
    Image.fromarray(photos[0]).save(buf, format="JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))  # libjpeg at full scale
    want = _reference(decoded, 64, 56, "bilinear")
    full, _, _ = decode_image(buf.getvalue(), ImageSpec(64, 56, "bilinear", jpeg_draft=False))
    _close(full, want, "jpeg_draft false")
    drafted, _, _ = decode_image(buf.getvalue(), ImageSpec(64, 56, "bilinear"))  # decoded at 1/4 scale
    assert not np.array_equal(drafted, full)
    job = parse_job({"name": "j", "source": {"uri": "/x"}, "output": {"uri": "/y"},
                     "preprocess": {"jpeg_draft": False}})
    assert _resolve_image(job, {}).jpeg_draft is False


def test_pyav_frames_equal_torchvision_on_the_decoded_frames(photos, tmp_path):
    """Frames scaled by the decoder (swscale) then cropped, against the full frames PyAV decodes
    through torchvision's Resize + CenterCrop: only the scalers' filters differ (1.4-1.8 levels on
    average here), where a crop one pixel off differs by 5.6-7.6."""
    import av

    from pipeline.config import VideoConfig
    from pipeline.extract.video import FrameSpec, _decode_pyav

    path, (w, h) = str(tmp_path / "pan.mp4"), (400, 300)
    with av.open(path, "w") as container:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "mpeg4":
            stream.bit_rate = 8_000_000
        for i in range(8):  # the photo panning
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(photos[1][i * 4:i * 4 + h, i * 4:i * 4 + w]),
                                               format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(path) as container:
        full = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    for resize, crop in [(235, 224), (256, 224), (129, 112)]:
        (clip,) = _decode_pyav(path, FrameSpec(resize, crop), VideoConfig(num_frames=4))
        want = np.stack([_reference(full[int(i)], resize, crop, "bilinear") for i in clip.window.frames])
        diff = np.abs(clip.pixels.astype(np.int16) - want.astype(np.int16)).mean()
        shifted = np.abs(clip.pixels[:, :, 1:].astype(np.int16) - want[:, :, :-1].astype(np.int16)).mean()
        assert diff <= 2.5 and diff < 0.4 * shifted, (resize, crop, diff, shifted)


def test_a_squash_model_is_squashed_as_timm_does_and_a_padding_one_is_refused(photos):
    """crop_mode squash (131 of timm's pretrained configs: the whole picture, its aspect not kept);
    border (6: resized by the longer side, then padded) is refused unless the job chooses."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    from pipeline.config import ConfigError, parse_job
    from pipeline.extract.prepare import _resolve_image
    from pipeline.models.families import timm as family

    name = "coat_lite_medium_384.in1k"
    data = resolve_data_config(pretrained_cfg=get_pretrained_cfg(name).to_dict())
    assert data["crop_mode"] == "squash"
    defaults = family.data_config(name)
    job = parse_job({"name": "j", "source": {"uri": "/x"}, "output": {"uri": "/y"}})
    spec = _resolve_image(job, defaults)
    assert spec.squash and (spec.resize, spec.crop) == (384, 384)
    reference = create_transform(**data)
    mean, std = torch.tensor(data["mean"])[:, None, None], torch.tensor(data["std"])[:, None, None]
    for w, h in [(640, 427), (300, 500)]:
        src = np.asarray(Image.fromarray(photos[0]).resize((w, h), Image.Resampling.BILINEAR))
        got, _, _ = decode_image(_png(src), spec)
        _close(got, _unnormalised(reference(Image.fromarray(src)), mean, std), (w, h))

    border = family.data_config("deepseek_vit_412m.deepseek_v4_1_flash")
    with pytest.raises(ConfigError, match="preprocess.resize_mode: the weights' transforms resize the border way"):
        _resolve_image(job, border)
    job.preprocess.resize_mode = "shorter"  # the job's choice: accepted
    assert not _resolve_image(job, border).squash
