"""JPEGs decoded in batches on the model's device (nvJPEG on a GPU), resized and cropped there.

On a GPU the CPU decode bounds the run: one GPU embeds ResNet-50 faster than dozens of cores
decode JPEGs. So a GPU actor that decodes its own batch (`resources.decode_on: actor`) takes the
encoded bytes, reads each header on the CPU (format, colour mode and Pillow's decompression-bomb
limit: cheap, no pixels), decodes the RGB and greyscale JPEGs in one
`torchvision.io.decode_jpeg(device=...)` call and resizes them on the device. Everything else
(PNG, CMYK JPEGs, a file the device decoder refuses) takes the CPU path, `decode.decode_rows`,
so such a file gets the same pixels, or the same error row, as it would there.

The device's pixels are torchvision's Resize + CenterCrop on the decoded tensor (geometry.py);
they differ from the CPU path's as torchvision's tensor and PIL transforms differ, and by libjpeg's
reduced-scale decoding (`draft`) there.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ..rows import ERROR_COLUMNS
from ..timing import timed
from .decode import ImageSpec, decode_rows, decoded_columns, fault_point, open_image
from .geometry import WHOLE, crop_offsets, resized_size, source_box

DEVICE_MODES = ("RGB", "L")  # what decode_jpeg turns into RGB the way Pillow does


@timed("decode")
def decode_on_device(batch: Dict[str, np.ndarray], spec: ImageSpec, device: torch.device,
                     pool: Optional[Executor] = None, parts: int = 1) -> Dict[str, object]:
    """`data` bytes -> `pixels`, a (N, crop, crop, 3) uint8 tensor on `device`; failures are error rows."""
    out = decoded_columns(batch)
    pixels = torch.zeros((len(batch["data"]), spec.crop, spec.crop, 3), dtype=torch.uint8, device=device)
    jpegs, elsewhere = _sort_rows(batch)
    for i, img in zip(jpegs, _decode_jpegs([batch["data"][i] for i in jpegs], device)):
        if img is None:
            elsewhere.append(i)
            continue
        out["height"][i], out["width"][i] = img.shape[1:]
        pixels[i] = _resize_center_crop(img, spec).permute(1, 2, 0)
    if elsewhere:
        rows = np.array(sorted(elsewhere))
        done = decode_rows({k: v[rows] for k, v in batch.items()}, spec, pool, parts)
        pixels[torch.from_numpy(rows).to(device)] = torch.from_numpy(done["pixels"]).to(device)
        for col in ("width", "height", *ERROR_COLUMNS):
            out[col][rows] = done[col]
    out["pixels"] = pixels
    return out


def _sort_rows(batch: Dict[str, np.ndarray]):
    """(rows the device decodes, rows the CPU path takes); rows that failed earlier are in neither."""
    jpegs: List[int] = []
    elsewhere: List[int] = []
    for i, data in enumerate(batch["data"]):
        if batch["error_stage"][i]:
            continue
        try:
            with open_image(data) as img:
                plain = img.format == "JPEG" and img.mode in DEVICE_MODES
        except Exception:  # the CPU path raises it again, and records it as this row's error
            plain = False
        if plain:  # the CPU path's rows meet the failpoint there
            fault_point(batch, i)
        (jpegs if plain else elsewhere).append(i)
    return jpegs, elsewhere


def _decode_jpegs(files: List[bytes], device: torch.device) -> List[Optional[torch.Tensor]]:
    """(3, H, W) uint8 on `device` per file, EXIF orientation applied; None where decoding failed.
    One call for the batch; if any file fails it, each file alone, to find which."""
    if not files:
        return []
    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    try:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except RuntimeError:
        out: List[Optional[torch.Tensor]] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
            except RuntimeError:
                out.append(None)
        return out


def _resize_center_crop(img: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    """Resize(resize) + CenterCrop(crop) on the device, at torchvision's geometry (geometry.py):
    resized whole then cropped, torchvision's tensor transform exactly; beyond geometry.WHOLE only
    the crop's region, whose edges then differ within the antialiasing filter's reach."""
    height, width = img.shape[1:]
    new_w, new_h = resized_size(width, height, spec.resize, spec.squash)
    left, top = crop_offsets(new_w, new_h, spec.crop)
    if new_w * new_h <= WHOLE * spec.crop * spec.crop:
        out = _interpolate(img, (new_h, new_w), spec.interpolation)[:, top:top + spec.crop, left:left + spec.crop]
    else:
        x0, y0, x1, y1 = source_box(width, height, spec.resize, spec.crop, spec.squash)
        x0, y0 = int(x0), int(y0)
        x1, y1 = min(width, max(x0 + 1, round(x1))), min(height, max(y0 + 1, round(y1)))
        out = _interpolate(img[:, y0:y1, x0:x1], (spec.crop, spec.crop), spec.interpolation)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _interpolate(img: torch.Tensor, size, interpolation: str) -> torch.Tensor:
    """torchvision's tensor Resize: antialiased bilinear or bicubic, or nearest (its `nearest` is
    torch's legacy `nearest`, which Resize keeps for compatibility)."""
    region = img.unsqueeze(0).float()
    if interpolation == "nearest":
        return F.interpolate(region, size=size, mode="nearest")[0]
    return F.interpolate(region, size=size, mode=interpolation, antialias=True, align_corners=False)[0]
