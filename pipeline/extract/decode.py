"""Image decoding: bytes -> uint8 RGB at the model's input size.

Pillow does the work. Two things matter for speed and memory: JPEGs are decoded at a reduced
scale by libjpeg (`draft`) when the target is much smaller, and the resize + center crop is one
`resize(box=...)` over the crop's region of the original, so an 8000x8 image never becomes a
256000x256 intermediate. The region is torchvision's Resize(resize) + CenterCrop(crop) geometry
(geometry.py): without `draft`, the pixels are the reference transform's (on a PIL image, as
torchvision, timm and open_clip apply it) to a rounding. `preprocess.jpeg_draft: false` turns
`draft` off (measured in bench/README.md).
"""
from __future__ import annotations

import io
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .. import faults
from ..errors import DecodeFailure
from ..rows import ERROR_COLUMNS, error_fields
from ..timing import timed
from .geometry import WHOLE, crop_offsets, resized_size, source_box

ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class ImageSpec:
    resize: int  # shorter side, before the center crop
    crop: int
    interpolation: str = "bilinear"  # bilinear | bicubic | nearest, antialiased like torchvision's
    jpeg_draft: bool = True  # JPEGs decoded at 1/2 .. 1/8 scale when that still covers `resize`
    squash: bool = False  # preprocess.resize_mode squash: both sides to `resize`, the aspect not kept


class DecodeError(DecodeFailure):
    """A file that is not a usable image; the message says why."""


def decode_image(data: bytes, spec: ImageSpec) -> Tuple[np.ndarray, int, int]:
    """Return (crop x crop x 3 uint8 array, original width, original height)."""
    with open_image(data) as img:
        img.seek(0)  # animated images: the first frame
        width, height = _displayed_size(img)
        if img.format == "JPEG" and spec.jpeg_draft:
            # libjpeg scales by 1/2, 1/4 or 1/8 while decoding; keep at least `resize` pixels.
            img.draft("RGB", (spec.resize, spec.resize))
        rgb = to_rgb(ImageOps.exif_transpose(img))
        pixels = _resize_center_crop(rgb, spec, width, height)
    return pixels, width, height


# Formats Pillow decodes by running another program (EPS: Ghostscript): a crafted file would run
# it on the worker, so they are refused before any pixel is decoded.
EXTERNAL = frozenset({"EPS"})


def open_image(data: bytes) -> Image.Image:
    """The image's header read, its pixels not yet decoded."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # Pillow's message names a buffer's address, new each run
        raise UnidentifiedImageError("cannot identify image file: not an image Pillow can read") from None
    try:
        if img.format in EXTERNAL:
            raise DecodeError(f"{img.format} is not decoded: Pillow would hand it to an outside program")
        _check_pixels(img)
    except BaseException:
        img.close()
        raise
    return img


def _check_pixels(img: Image.Image) -> None:
    """Refuse an image over Pillow's decompression-bomb limit, from its header, before any pixel is
    decoded. Pillow itself only warns between the limit and twice it, and a warnings filter to
    make that an error would change process-wide state under the concurrent decode threads.
    Only the first frame is ever decoded (decode_image), and `size` is that frame's (for ICO and
    ICNS, the largest entry, the one Pillow loads)."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = img.size
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(
            f"image size {width}x{height} ({width * height} pixels) exceeds limit of {limit} pixels, "
            "could be decompression bomb DOS attack")


def _displayed_size(img: Image.Image) -> Tuple[int, int]:
    """The size as shown to a person: the header's size, turned by the EXIF orientation."""
    width, height = img.size
    if img.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8):
        return height, width
    return width, height


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _high_bit_depth_to_rgb(img)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        return _gray_array_to_rgb(arr, float(arr.max()) or 1.0)
    if (mode == "P" and "transparency" in img.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        # Transparent pixels are composited onto white, the usual page background.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        img.load()
        return img
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    full_scale = 65535.0 if arr.max(initial=0) > 255 or img.mode.startswith("I;16") else 255.0
    return _gray_array_to_rgb(arr.astype(np.float32), full_scale)


def _gray_array_to_rgb(arr: np.ndarray, full_scale: float) -> Image.Image:
    gray = np.clip(arr * (255.0 / full_scale) + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def _resize_center_crop(img: Image.Image, spec: ImageSpec, width: Optional[int] = None,
                        height: Optional[int] = None) -> np.ndarray:
    """The reference's crop window, resampled once to crop x crop. The geometry is that of the
    image's full size (width x height), scaled to what `draft` decoded: the reference's window
    whatever scale libjpeg chose."""
    width, height = width or img.width, height or img.height
    fx, fy = img.width / width, img.height / height
    mode = Image.Resampling[spec.interpolation.upper()]
    if mode == Image.Resampling.NEAREST and (fx, fy) == (1, 1):
        # nearest picks one source pixel by rounding down a position: the box's positions, one
        # float operation apart, pick the neighbour of the reference's in ~1% of pixels
        new_w, new_h = resized_size(width, height, spec.resize, spec.squash)
        if new_w * new_h <= WHOLE * spec.crop * spec.crop:
            left, top = crop_offsets(new_w, new_h, spec.crop)
            out = img.resize((new_w, new_h), mode).crop((left, top, left + spec.crop, top + spec.crop))
            return np.asarray(out, dtype=np.uint8)
    x0, y0, x1, y1 = source_box(width, height, spec.resize, spec.crop, spec.squash)
    out = img.resize((spec.crop, spec.crop), mode, box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy))
    return np.asarray(out, dtype=np.uint8)


@timed("decode")
def decode_batch(batch: Dict[str, np.ndarray], spec: ImageSpec, pool: Optional[Executor] = None,
                 parts: int = 1) -> Dict[str, np.ndarray]:
    """Ray Data map_batches function: `data` bytes -> `pixels`, failures become error rows."""
    return decode_rows(batch, spec, pool, parts)


def decode_rows(batch: Dict[str, np.ndarray], spec: ImageSpec, pool: Optional[Executor] = None,
                parts: int = 1) -> Dict[str, np.ndarray]:
    """`data` bytes -> `pixels`. Rows that failed to decode keep a zero image so the column stays
    one dense array; their `error_stage` tells every later stage to skip them. With a thread
    `pool`, the rows are split in `parts` decoded at once (Pillow releases the GIL while it
    decodes and resizes).
    """
    n = len(batch["data"])
    out = decoded_columns(batch)
    out["pixels"] = np.zeros((n, spec.crop, spec.crop, 3), dtype=np.uint8)
    chunks = np.array_split(np.arange(n), max(1, min(parts, n)))
    if pool is None or len(chunks) == 1:
        for rows in chunks:
            _decode_into(out, batch, rows, spec)
    else:
        list(pool.map(lambda rows: _decode_into(out, batch, rows, spec), chunks))
    return out


def decoded_columns(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """A decoder's output but its pixels: the batch without `data`, zero sizes, its own error columns."""
    n = len(batch["data"])
    out = {k: v for k, v in batch.items() if k != "data"}
    out.update(width=np.zeros(n, dtype=np.int32), height=np.zeros(n, dtype=np.int32),
               **{k: batch[k].copy() for k in ERROR_COLUMNS})
    return out


def fault_point(batch: Dict[str, np.ndarray], i: int) -> None:
    """The decode failpoint, keyed by the row's URI (tests/test_faults.py)."""
    faults.point("decode", str(batch["uri"][i]) if "uri" in batch else "")


def _decode_into(out: Dict[str, np.ndarray], batch: Dict[str, np.ndarray], rows: np.ndarray,
                 spec: ImageSpec) -> None:
    for i in rows:
        if out["error_stage"][i]:
            continue
        fault_point(batch, i)
        try:
            out["pixels"][i], out["width"][i], out["height"][i] = decode_image(batch["data"][i], spec)
        except Exception as e:  # any failure of this one file is its error row, never the job's
            for col, value in error_fields("decode", e).items():
                out[col][i] = value
