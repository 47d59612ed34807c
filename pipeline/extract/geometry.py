"""Where Resize(resize) + CenterCrop(crop) puts the picture: torchvision's geometry, to the pixel.

torchvision (and timm's and open_clip's eval transforms, which are built from it) scale the shorter
side to `resize` and truncate the longer one (`int(resize * long / short)`), then crop at offsets
rounded half to even (`int(round((size - crop) / 2))`). Cropping at the exact fractional centre
instead moves the picture by up to half a pixel whenever `resize - crop` is odd or the longer side
is not a whole number (timm's convnext_tiny, resize 235 and crop 224: 7.4 levels on average, a
random-init ConvNeXt's feature at cosine 0.978). These functions give the reference's numbers;
decode.py, device_decode.py and video.py apply them.
"""
from __future__ import annotations

from typing import Tuple

# A resized image up to this many times crop x crop (38 MB of float32 at 224) may be made whole and
# cropped, where a path needs that for exactness (nearest on Pillow, every mode on the device);
# beyond (an 8000x8 strip would become 256000x256) only the crop's region is resampled.
WHOLE = 64


def resized_size(width: int, height: int, resize: int, squash: bool = False) -> Tuple[int, int]:
    """(width, height) after Resize(resize): the shorter side at `resize`, the longer truncated;
    squashed (timm's crop_mode and open_clip's resize_mode `squash`): Resize((resize, resize))."""
    if squash:
        return resize, resize
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def crop_offsets(width: int, height: int, crop: int) -> Tuple[int, int]:
    """(left, top) of CenterCrop(crop) in a width x height image (Python's round: half to even)."""
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def source_box(width: int, height: int, resize: int, crop: int,
               squash: bool = False) -> Tuple[float, float, float, float]:
    """The crop window of the resized image in the source's coordinates: resampling only this box
    to crop x crop (Pillow's `resize(box=...)`, whose filter still reads the pixels around it)
    gives the pixels of resizing the whole image and cropping, without the large intermediate."""
    new_w, new_h = resized_size(width, height, resize, squash)
    left, top = crop_offsets(new_w, new_h, crop)
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + crop) * sx, (top + crop) * sy
