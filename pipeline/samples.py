"""Generated sample data for the demo, the tests and the benchmarks: no downloads.

`image_cases()` holds one of every awkward kind of file the decode stage must survive, each
with what should become of it: a feature row (`ok`) or an error row.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Tuple

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
        "ok_16bit.png": (encode(Image.fromarray((np.arange(64 * 96).reshape(64, 96) * 10).astype(np.uint16)), "PNG"),
                         True),
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
    from fractions import Fraction

    import av

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


def encode_frames(frames: np.ndarray, fps: int = 25, codec: str = "mpeg4", fmt: str = "avi",
                  bit_rate: int = 2_000_000) -> bytes:
    """Encode given RGB frames (T, H, W, 3) uint8 as a real video (PyAV); a high bit rate keeps
    small synthetic frames close to their pixels."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.bit_rate = "yuv420p", bit_rate
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _shape_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A disc or a square, the same area, at a uniformly random place fully inside the frame."""
    side = max(4, size // 4)
    top, left = (int(v) for v in rng.integers(1, size - side, 2))  # a 1 px margin: the disc is a bit wider
    y, x = np.mgrid[0:size, 0:size]
    if kind == "disc":
        r = side / 2 * 1.13  # area of a disc of this radius == area of the square
        return (y - top - side / 2 + 0.5) ** 2 + (x - left - side / 2 + 0.5) ** 2 <= r * r
    return (y >= top) & (y < top + side) & (x >= left) & (x < left + side)


def _scene(frames: int, size: int, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: `frames // 2` noisy frames of a red disc and as many of a blue square."""
    half = frames // 2
    level = rng.uniform(90, 150)
    shown = []
    for kind, colour in (("disc", (220, 30, 30)), ("square", (30, 60, 220))):
        mask = _shape_mask(kind, size, rng)
        clip = level + rng.normal(0, 8, (half, size, size, 3))
        clip[:, mask] = colour
        shown.append(np.clip(clip, 0, 255).astype(np.uint8))
    return shown[0], shown[1]


def make_order_videos(folder: str, n: int = 24, classes: Tuple[str, str] = ("a_then_b", "b_then_a"),
                      frames: int = 16, size: int = 64, seed: int = 0,
                      split_fraction: float = 0.5) -> Dict[str, Any]:
    """Videos whose class is the ORDER of two events, never their content (MPEG-4 in AVI, 25 fps).

    Each of the n // 2 scenes draws a red disc and a blue square at random places on a mildly
    noisy grey background, `frames // 2` frames of each; the scene is written once per class:
    classes[0] shows the disc frames then the square frames, classes[1] the same frames with the
    halves swapped. Both classes hold exactly the same frames, so any per-frame feature averaged
    over the clip cannot tell them apart; only the sequence can.

    Layout (a `video_folder` source with UCF101-style split lists):
      folder/<class>/<class>_s<scene>.avi, folder/trainlist.txt, folder/testlist.txt
    The lists hold relative paths; both versions of a scene land in the same split, and
    `split_fraction` of the scenes go to train. Returns {"videos", "classes", "frames", "size",
    "split_files": {"train": path, "test": path}, "counts": {split: videos}}.
    """
    if len(classes) != 2 or n < 4 or n % 2 or frames < 2 or frames % 2:
        raise ValueError(f"make_order_videos: need 2 classes, an even n >= 4 and an even frames >= 2 "
                         f"(got {len(classes)}, {n}, {frames})")
    rng = np.random.default_rng(seed)
    scenes = n // 2
    n_train = min(scenes - 1, max(1, round(split_fraction * scenes)))
    in_train = set(rng.permutation(scenes)[:n_train].tolist())
    lists: Dict[str, list] = {"train": [], "test": []}
    for s in range(scenes):
        disc, square = _scene(frames, size, rng)
        for cls, order in zip(classes, ((disc, square), (square, disc))):
            rel = f"{cls}/{cls}_s{s:03d}.avi"
            os.makedirs(os.path.join(folder, cls), exist_ok=True)
            with open(os.path.join(folder, rel), "wb") as f:
                f.write(encode_frames(np.concatenate(order)))
            lists["train" if s in in_train else "test"].append(rel)
    split_files = {}
    for split, names in lists.items():
        split_files[split] = os.path.join(folder, f"{split}list.txt")
        with open(split_files[split], "w") as f:
            f.write("".join(f"{name}\n" for name in names))
    return {"videos": 2 * scenes, "classes": 2, "frames": frames, "size": size,
            "split_files": split_files, "counts": {k: len(v) for k, v in lists.items()}}
