"""Decoding JPEGs on the model's device (nvJPEG on a GPU), run here on the CPU device: the same
torchvision call, so every rule but the GPU itself is checked: which files the device takes, the
same outcome and error rows as the CPU path, and pixels equal to it up to resampling."""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from pipeline.extract.decode import ImageSpec, decode_batch
from pipeline.extract.device_decode import _sort_rows, decode_on_device
from pipeline.samples import encode, image_cases, photo
from pipeline.timing import block_seconds

SPEC = ImageSpec(resize=73, crop=64)


def batch_of(files):
    n = len(files)
    return {"uri": np.array([f"mem://{k}" for k in files], dtype=object),
            "data": np.array(list(files.values()) + [None], dtype=object)[:n],
            "error_stage": np.array([""] * n, dtype=object), "error_type": np.array([""] * n, dtype=object),
            "error_message": np.array([""] * n, dtype=object)}


def cases():
    files = {name: data for name, (data, _) in image_cases().items()}
    files.update({f"photo_{i}.jpg": encode(photo(300 + 41 * i, 200 + 17 * i, seed=i)) for i in range(4)})
    files["gray.jpg"] = encode(photo(180, 120, seed=9).convert("L"))
    files["failed_earlier.jpg"] = files["photo_0.jpg"]
    return files


def test_the_device_decodes_plain_jpegs_and_the_cpu_path_everything_else():
    files = cases()
    batch = batch_of(files)
    batch["error_stage"][-1], batch["error_type"][-1], batch["error_message"][-1] = "read", "OSError", "gone"
    jpegs, elsewhere = _sort_rows(batch)
    names = list(files)
    assert {names[i] for i in jpegs} == {"ok_rgb.jpg", "ok_exif_rotated.jpg", "ok_upper.JPEG", "gray.jpg",
                                         "bad_truncated.jpg", *(f"photo_{i}.jpg" for i in range(4))}
    assert "ok_cmyk.jpg" in {names[i] for i in elsewhere} and "bad_bomb.png" in {names[i] for i in elsewhere}
    assert len(files) - 1 not in jpegs + elsewhere  # failed before decode: left alone


def test_same_outcome_as_the_cpu_path_and_pixels_equal_up_to_resampling():
    files = cases()
    batch = batch_of(files)
    batch["error_stage"][-1], batch["error_type"][-1], batch["error_message"][-1] = "read", "OSError", "gone"
    with ThreadPoolExecutor(2) as pool:
        ours = decode_on_device(batch, SPEC, torch.device("cpu"), pool=pool, parts=2)
    cpu = decode_batch(batch, SPEC)
    assert ours["pixels"].dtype == torch.uint8 and tuple(ours["pixels"].shape) == (len(files), 64, 64, 3)
    for col in ("error_stage", "error_type", "error_message", "width", "height"):
        assert list(ours[col]) == list(cpu[col]), col  # truncated JPEG: the CPU path's own message
    pixels = ours["pixels"].numpy().astype(np.int16)
    for i, name in enumerate(files):
        diff = np.abs(pixels[i] - cpu["pixels"][i])
        if name.startswith(("photo_", "ok_rgb", "ok_exif", "ok_upper", "gray")):  # decoded on the device
            assert diff.mean() < 3.0 and np.percentile(diff, 99) < 24, (name, diff.mean())
        else:  # the CPU path's very pixels, or zeros for an error row
            assert not diff.any(), name
    assert block_seconds(ours)["decode"] > 0 and "data" not in ours


def test_a_file_the_device_refuses_is_found_alone_and_decoded_on_the_cpu(monkeypatch):
    """A file Pillow reads but the device decoder refuses fails the batch call: each file is then
    tried alone, and the refused one takes the CPU path."""
    import pipeline.extract.device_decode as dd

    files = {f"p{i}.jpg": encode(photo(120, 90, seed=i)) for i in range(3)}
    real = dd.decode_jpeg
    refused = files["p1.jpg"]

    def picky(data, **kw):
        tensors = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy()) == refused for t in tensors):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kw)

    monkeypatch.setattr(dd, "decode_jpeg", picky)
    out = decode_on_device(batch_of(files), SPEC, torch.device("cpu"))
    cpu = decode_batch(batch_of(files), SPEC)
    assert list(out["error_stage"]) == ["", "", ""]
    assert np.array_equal(out["pixels"][1].numpy(), cpu["pixels"][1])  # the CPU path's pixels
    assert np.abs(out["pixels"][0].numpy().astype(int) - cpu["pixels"][0]).mean() < 3.0


def test_interpolation_modes_and_a_tiny_image():
    files = {"tiny.jpg": encode(Image.new("RGB", (3, 2), (10, 200, 30))), "big.jpg": encode(photo(400, 300, seed=5))}
    for interpolation in ("bilinear", "bicubic", "nearest"):
        spec = ImageSpec(resize=73, crop=64, interpolation=interpolation)
        out = decode_on_device(batch_of(files), spec, torch.device("cpu"))
        cpu = decode_batch(batch_of(files), spec)
        diff = np.abs(out["pixels"].numpy().astype(int) - cpu["pixels"])
        # nearest picks single source pixels: one pixel's shift between decoders shows more
        assert diff[0].max() <= 8 and diff[1].mean() < (8.0 if interpolation == "nearest" else 4.0), interpolation


def test_the_actor_embeds_pixels_left_on_the_device():
    """What a GPU actor does after decoding on its device: the tensor is embedded where it lies,
    error rows skipped; features as from the CPU path's pixels, up to their resampling."""
    from pipeline.config import ModelConfig
    from pipeline.models.actor import Embedder, EmbedSpec
    from pipeline.models.base import resolve

    cfg = ModelConfig(arch="resnet18", weights="none")
    embedder = Embedder(EmbedSpec(cfg, resolve(cfg), 64, 512, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                     dtype="float32"))
    files = {f"p{i}.jpg": encode(photo(160, 120, seed=i)) for i in range(3)}
    files["bad.jpg"] = b"nope"
    on_device = embedder(decode_on_device(batch_of(files), SPEC, torch.device("cpu")))
    on_cpu = embedder(decode_batch(batch_of(files), SPEC))
    assert list(on_device["error_stage"]) == ["", "", "", "decode"] and not on_device["feature"][3].any()
    a, b = on_device["feature"][:3], on_cpu["feature"][:3]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert (cosine > 0.98).all(), cosine
