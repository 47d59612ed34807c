"""Pixels against the reference transforms, and what JPEG draft decoding costs and saves.

    .venv/bin/python bench/geometry.py [--sizes 500x375 640x427 1024x768 4000x3000]

Real photos (scikit-learn's two sample images), cropped and scaled to each size, three crops each:
1. as PNG (no draft), the project's decode against torchvision's Resize + CenterCrop and timm's
   create_transform for convnext_tiny (resize 235, crop 224, bicubic): mean absolute difference,
   share of pixels more than 8 levels apart, and a random-init ConvNeXt-T's feature cosine;
2. as JPEG (quality 90), `preprocess.jpeg_draft` true (the default) against false: the same
   differences and cosine, and the decode time of each (one core, ms an image).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.extract.decode import ImageSpec, decode_image  # noqa: E402


def photos(sizes):
    from PIL import Image
    from sklearn.datasets import load_sample_images

    for k, base in enumerate(load_sample_images().images):
        h, w = base.shape[:2]
        for c, (x0, y0) in enumerate([(0, 0), (w // 8, h // 8), (w // 5, 0)]):
            region = Image.fromarray(base[y0:, x0:])
            for size in sizes:
                yield f"{k}-{c}-{size[0]}x{size[1]}", region.resize(size, Image.Resampling.BICUBIC)


def encoded(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["500x375", "640x427", "1024x768", "4000x3000"])
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    import timm
    from timm.data import create_transform, resolve_data_config

    torch.set_num_threads(1)
    model = timm.create_model("convnext_tiny", pretrained=False).eval()
    data = resolve_data_config(model=model)
    reference = create_transform(**data)
    mean, std = torch.tensor(data["mean"])[:, None, None], torch.tensor(data["std"])[:, None, None]
    spec = ImageSpec(235, 224, "bicubic")

    def tensor(pixels):
        return (torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - mean) / std

    def compare(a, b):
        d = np.abs(a.astype(np.int16) - b.astype(np.int16))
        with torch.no_grad():
            fa, fb = model(torch.stack([tensor(a), tensor(b)]))
        return d.mean(), (d > 8).mean(), torch.nn.functional.cosine_similarity(fa, fb, dim=0).item()

    rows = {"png": [], "draft": []}
    times = {True: [], False: []}
    for _name, img in photos(sizes):
        ours, _, _ = decode_image(encoded(img, "PNG"), spec)
        want = reference(img.convert("RGB"))
        want = (want * std + mean).mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        rows["png"].append(compare(ours, want))
        jpeg = encoded(img, "JPEG")
        out = {}
        for draft in (True, False):
            t = time.perf_counter()
            for _ in range(3):
                out[draft], _, _ = decode_image(jpeg, ImageSpec(235, 224, "bicubic", jpeg_draft=draft))
            times[draft].append((time.perf_counter() - t) / 3 * 1000)
        rows["draft"].append(compare(out[True], out[False]) + (img.size,))
    png = np.array(rows["png"])
    print(f"PNG, ours vs timm's create_transform (convnext_tiny), {len(png)} photos: mean |diff| "
          f"{png[:, 0].mean():.3f} (max {png[:, 0].max():.3f}), > 8 levels {png[:, 1].max():.4f} at most, "
          f"cosine min {png[:, 2].min():.6f}")
    print("| size | photos | draft vs full: mean abs diff | > 8 levels | ConvNeXt-T cosine (min) "
          "| ms draft | ms full |")
    print("|---|---|---|---|---|---|---|")
    for size in sizes:
        sel = [i for i, r in enumerate(rows["draft"]) if r[3] == size]
        d = np.array([rows["draft"][i][:3] for i in sel])
        print(f"| {size[0]}x{size[1]} | {len(sel)} | {d[:, 0].mean():.2f} | {d[:, 1].mean():.4f} | "
              f"{d[:, 2].min():.4f} | {np.mean([times[True][i] for i in sel]):.1f} | "
              f"{np.mean([times[False][i] for i in sel]):.1f} |")


if __name__ == "__main__":
    main()
