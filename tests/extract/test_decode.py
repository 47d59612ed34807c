import sys

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms import v2

from pipeline.extract.decode import ImageSpec, decode_batch, decode_image, decode_rows
from pipeline.rows import ERROR_COLUMNS
from pipeline.samples import encode, image_cases, photo

SPEC = ImageSpec(resize=64, crop=56)
CASES = image_cases()


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_kind_of_file_decodes_or_fails_cleanly(name):
    data, ok = CASES[name]
    if ok:
        pixels, width, height = decode_image(data, SPEC)
        assert pixels.shape == (56, 56, 3) and pixels.dtype == np.uint8
        assert width >= 1 and height >= 1
    else:
        with pytest.raises(Exception) as err:
            decode_image(data, SPEC)
        assert str(err.value)


def test_bomb_is_refused_by_pillows_limit():
    with pytest.raises(Exception, match="decompression bomb|exceeds limit"):
        decode_image(CASES["bad_bomb.png"][0], SPEC)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_matches_torchvision_resize_and_center_crop(mode):
    img = photo(300, 200, seed=5)
    ours, w, h = decode_image(encode(img, "PNG"), ImageSpec(resize=128, crop=112, interpolation=mode))
    assert (w, h) == (300, 200)
    interpolation = v2.InterpolationMode(mode)
    ref = v2.Compose([v2.PILToTensor(), v2.Resize(128, interpolation, antialias=True), v2.CenterCrop(112)])(img)
    diff = np.abs(ours.astype(int) - ref.permute(1, 2, 0).numpy().astype(int))
    assert diff.mean() < 2.0, diff.mean()


def test_exif_orientation_is_applied_and_size_is_as_displayed():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = (255, 0, 0)  # left half red, right half blue
    arr[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: red on top
    pixels, w, h = decode_image(encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95),
                                ImageSpec(resize=40, crop=40))
    assert (w, h) == (40, 80)
    top, bottom = pixels[:10].reshape(-1, 3).mean(0), pixels[-10:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    pixels, _, _ = decode_image(encode(rgba, "PNG"), ImageSpec(resize=20, crop=20))
    assert pixels.min() == 255


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((16, 16), 32768, np.uint16)
    pixels, _, _ = decode_image(encode(Image.fromarray(arr), "PNG"), ImageSpec(resize=16, crop=16))
    assert 126 <= pixels.mean() <= 130


def test_cmyk_and_grayscale_become_rgb():
    base = photo(64, 64, seed=2)
    rgb, _, _ = decode_image(encode(base, "PNG"), ImageSpec(resize=64, crop=64))
    cmyk, _, _ = decode_image(encode(base.convert("CMYK"), "JPEG", quality=95), ImageSpec(resize=64, crop=64))
    gray, _, _ = decode_image(encode(base.convert("L"), "PNG"), ImageSpec(resize=64, crop=64))
    assert np.abs(cmyk.astype(int) - rgb.astype(int)).mean() < 20
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (30, 30), c) for c in ((250, 0, 0), (0, 250, 0))]
    buf = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    pixels, _, _ = decode_image(buf, ImageSpec(resize=30, crop=30))
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 50


def test_extreme_aspect_ratio_and_tiny_images():
    wide, w, h = decode_image(CASES["ok_8000x8.png"][0], SPEC)
    assert (w, h) == (8000, 8) and wide.shape == (56, 56, 3)
    tiny, w, h = decode_image(CASES["ok_1x1.png"][0], SPEC)
    assert (w, h) == (1, 1) and (tiny == (200, 10, 10)).all()


def test_jpeg_draft_keeps_quality_at_large_downscale():
    img = photo(2000, 1500, seed=9)
    fast, _, _ = decode_image(encode(img, "JPEG", quality=95), ImageSpec(resize=128, crop=112))
    exact, _, _ = decode_image(encode(img, "PNG"), ImageSpec(resize=128, crop=112))
    assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 4


def test_decode_batch_keeps_order_and_marks_errors():
    names = ["ok_rgb.jpg", "bad_html.jpg", "ok_gray.png", "bad_zero_bytes.jpg"]
    data = np.empty(len(names), dtype=object)
    data[:] = [CASES[n][0] for n in names]
    batch = {"sample_id": np.array(names, dtype=object), "data": data}
    for col in ERROR_COLUMNS:
        batch[col] = np.array([""] * len(names), dtype=object)
    batch["error_stage"][3] = "read"  # a row that already failed upstream is left as it was
    batch["error_type"][3] = "FileNotFoundError"
    out = decode_batch(batch, SPEC)
    assert "data" not in out
    assert out["pixels"].shape == (4, 56, 56, 3)
    assert list(out["error_stage"]) == ["", "decode", "", "read"]
    assert out["error_type"][1] == "UnidentifiedImageError"
    assert out["error_type"][3] == "FileNotFoundError"
    assert out["width"][0] == 96 and out["height"][0] == 64
    assert out["pixels"][1].max() == 0


def _batch(blobs):
    data = np.empty(len(blobs), dtype=object)
    data[:] = blobs
    batch = {"sample_id": np.array([str(i) for i in range(len(blobs))], dtype=object), "data": data}
    for col in ERROR_COLUMNS:
        batch[col] = np.array([""] * len(blobs), dtype=object)
    return batch


def test_bomb_limit_holds_under_concurrent_decode_threads(monkeypatch):
    """Issue 12 case 11: the limit is checked from the header in every thread; no process-wide
    warnings filter that another decode thread could be restoring at that moment."""
    limit = 250_000  # lowered to keep the test fast; 100-megapixel PNGs behave the same
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    over = encode(Image.new("RGB", (limit // 400 + 1, 400), (90, 120, 30)), "PNG")  # Pillow only warns here
    at_limit = encode(Image.new("RGB", (500, 500), (90, 120, 30)), "PNG")  # exactly the limit: decodes
    batch = _batch([over] * 16 + [at_limit] * 4)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads interleave often, as busy decode threads do
    try:
        _decode_repeatedly(batch)
    finally:
        sys.setswitchinterval(switch)


def _decode_repeatedly(batch) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        for _ in range(30):
            out = decode_rows(batch, SPEC, pool, parts=4)
            assert list(out["error_stage"][:16]) == ["decode"] * 16, "an over-limit image was decoded"
            assert all("exceeds limit" in m for m in out["error_message"][:16])
            assert list(out["error_stage"][16:]) == [""] * 4
            assert (out["width"][16:] == 500).all() and out["pixels"][16:].max() > 0


def test_formats_pillow_hands_to_another_program_are_refused(monkeypatch, tmp_path):
    """EPS is decoded by running Ghostscript: a crafted file must not reach it (the marker proves
    no program ran, even where a `gs` is on PATH)."""
    import os

    from pipeline.extract.decode import DecodeError, decode_image

    marker = tmp_path / "ran"
    gs = tmp_path / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\n")
    gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    with pytest.raises(DecodeError, match="EPS is not decoded"):
        decode_image(eps, SPEC)
    assert not marker.exists()
