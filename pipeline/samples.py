"""Generated sample data for the demo, the tests and the benchmarks: no downloads.

`image_cases()` holds one of every awkward kind of file the decode stage must survive, each
with what should become of it: a feature row (`ok`) or an error row.
"""
from __future__ import annotations

import io
import os
from typing import Dict, Tuple

import numpy as np
from PIL import Image

CLASSES = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079")


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (gradients and blobs), so JPEG sizes are realistic."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.28)]
        channels.append(127 + 100 * np.sin(x * fx + y * fy + phase))
    img = np.stack(channels, axis=-1) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def image_cases() -> Dict[str, Tuple[bytes, bool]]:
    """name -> (file bytes, decodes to a feature row?)."""
    base = photo(96, 64, seed=1)
    jpeg = encode(base)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette = base.convert("P", palette=Image.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [photo(40, 30, seed=s) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    return {
        "ok_rgb.jpg": (jpeg, True),
        "ok_cmyk.jpg": (encode(base.convert("CMYK")), True),
        "ok_gray.png": (encode(base.convert("L"), "PNG"), True),
        "ok_16bit.png": (encode(Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 10).astype(np.uint16)), "PNG"), True),
        "ok_palette_transparent.png": (encode(palette, "PNG"), True),
        "ok_rgba.png": (encode(rgba, "PNG"), True),
        "ok_1x1.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), True),
        "ok_8000x8.png": (encode(photo(8000, 8, seed=2), "PNG"), True),
        "ok_animated.gif": (gif.getvalue(), True),
        "ok_exif_rotated.jpg": (encode(base, exif=exif.tobytes()), True),
        "ok_image.webp": (encode(base, "WEBP"), True),
        "ok_image.bmp": (encode(base, "BMP"), True),
        "ok_upper.JPEG": (jpeg, True),
        "bad_zero_bytes.jpg": (b"", False),
        "bad_truncated.jpg": (jpeg[: len(jpeg) // 2], False),
        "bad_html.jpg": (b"<!doctype html><html><body>404 Not Found</body></html>", False),
        "bad_random.png": (np.random.default_rng(3).bytes(4096), False),
        "bad_header_only.jpg": (jpeg[:20], False),
        "bad_bomb.png": (encode(Image.new("1", (20000, 20000)), "PNG"), False),
    }


def make_image_folder(root: str, n: int = 300, broken: int = 4, seed: int = 0) -> Dict[str, int]:
    """A class-per-folder dataset of `n` JPEGs of ImageNet-like sizes plus `broken` bad files."""
    rng = np.random.default_rng(seed)
    for cls in CLASSES:
        os.makedirs(os.path.join(root, cls), exist_ok=True)
    for i in range(n):
        width, height = int(rng.integers(300, 640)), int(rng.integers(240, 500))
        path = os.path.join(root, CLASSES[i % len(CLASSES)], f"img_{i:05d}.jpg")
        if not os.path.exists(path):
            photo(width, height, seed=seed * 100003 + i).save(path, quality=90)
    bad = [(k, v) for k, (v, ok) in image_cases().items() if not ok and k != "bad_bomb.png"][:broken]
    for i, (name, data) in enumerate(bad):
        with open(os.path.join(root, CLASSES[i % len(CLASSES)], name), "wb") as f:
            f.write(data)
    return {"images": n, "classes": len(CLASSES), "broken": len(bad)}


def video_frame(k: int, width: int, height: int) -> np.ndarray:
    """Frame k of a generated video: smooth colour fields that drift with k, easy to compare."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 127 + 100 * np.sin(x / 23.0 + k / 5.0)
    g = 127 + 100 * np.sin(y / 17.0 - k / 7.0)
    b = np.full_like(x, (k * 9) % 256)
    return np.stack([r, g, b], axis=-1).clip(0, 255).astype(np.uint8)


def encode_video(frames: int, width: int = 320, height: int = 240, fps: int = 25,
                 codec: str = "mpeg4", fmt: str = "avi", pts_jitter: bool = False) -> bytes:
    """A real encoded video (PyAV): `mpeg4` in AVI as UCF101 has, `libx264` in mkv/mp4, `libvpx-vp9` in webm."""
    import av
    from fractions import Fraction

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if pts_jitter:  # variable frame rate: uneven gaps between timestamps
            stream.codec_context.time_base = Fraction(1, fps * 10)
        pts = 0
        for k in range(frames):
            frame = av.VideoFrame.from_ndarray(video_frame(k, width, height), format="rgb24")
            if pts_jitter:
                frame.pts, frame.time_base = pts, Fraction(1, fps * 10)
                pts += 10 + (7 if k % 3 == 0 else -3)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_video_folder(root: str, n: int = 12, seed: int = 0) -> Dict[str, int]:
    """UCF101-style clips (320x240, 25 fps, MPEG-4 in AVI) in class folders, and one broken file."""
    classes = ("ApplyEyeMakeup", "Basketball", "Drumming")
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = classes[i % len(classes)]
        path = os.path.join(root, cls, f"v_{cls}_g{i // len(classes) + 1:02d}_c01.avi")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(encode_video(int(rng.integers(40, 90))))
    with open(os.path.join(root, classes[0], "v_broken.avi"), "wb") as f:
        f.write(b"RIFF\x00\x00\x00\x00AVI not really" * 20)
    return {"videos": n, "classes": len(classes), "broken": 1}
