"""The GPU check: the model actor's path measured on one bare GPU machine, without Ray.

    python bench/gpu.py --out "$OUT"            # a GPU machine: sized for < 8 minutes on an H200
    python bench/gpu.py --quick                 # a short rerun
    python bench/gpu.py --device cpu --quick    # the CPU smoke run (tests/test_gpu_bench.py)

Needs only this repository and torch, torchvision, numpy, pyarrow, fsspec, pillow, pyyaml (timm
when present): no Ray, no install. It generates ImageNet-like JPEGs (~500x375, quality 90) on the
machine's cores, lists them with the project's planner and reads them with the read stage's own
`read_batch`, so each batch is what the read stage hands the model actor under
`resources.decode_on: actor` (encoded bytes in `data`). Then, each as images/s with warm-up
excluded and the GPU synchronised:

- model alone: `Embedder.embed` on a uint8 batch already on the device (normalise, bf16
  autocast, channels_last, pool, features back to the host), for the job's arch, ResNet-18 and
  timm's ConvNeXt-T; and the clip models r2plus1d_18 and s3d (model.family torchvision_video) on
  uint8 clips (B, T, H, W, 3), as clips/s, at their documented input (16x112 and 128x224;
  `--clip-input smallest`, the CPU default, takes the smallest each accepts);
- decode alone: torchvision's batched `decode_jpeg(device=...)` (nvJPEG), and the project's whole
  device decode (`device_decode.decode_on_device`: headers, decode, resize, crop);
- the actor: `Embedder` (the one actor of every model family) built from an EmbedSpec as runner.py builds
  it and called on the read batches, decoding on the GPU; then with its decode switched to the CPU
  path (`decode.decode_batch`) on N threads;
- optional rows: cudnn.benchmark, torch.compile of the backbone, two batches in flight.

And two checks: features from GPU-decoded against CPU-decoded JPEGs (cosine), bf16 against float32
features (cosine). Weights are random (nothing can be downloaded there): the figures are
throughput, which does not depend on the weights. Results: one printed table, and gpu.json and
gpu.md in --out (default: $OUT when set, else bench/out/gpu).
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # a bare checkout: the package is not installed there

from pipeline.config import ModelConfig, SourceConfig  # noqa: E402
from pipeline.extract.decode import ImageSpec, decode_batch  # noqa: E402
from pipeline.extract.device_decode import _decode_jpegs, decode_on_device  # noqa: E402
from pipeline.extract.plan import plan_source  # noqa: E402
from pipeline.extract.read import read_batch  # noqa: E402
from pipeline.models.actor import Embedder, EmbedSpec  # noqa: E402
from pipeline.models.base import feature_dim, resolve  # noqa: E402
from pipeline.models.families.torchvision_video import input_defaults, weights_entry  # noqa: E402
from pipeline.samples import photo  # noqa: E402

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # prepare.py's ImageNet defaults
GPU_SIZES = [(500, 375), (375, 500), (500, 333), (640, 480), (500, 400)]  # ImageNet-like
CPU_SIZES = [(96, 72), (72, 96)]
TARGETS = {"actor_over_model": 0.8, "actor_images_per_s": 10000.0, "cosine": 0.99}
CLIP_MODELS = {"r2plus1d_18": 32, "s3d": 8}  # the clip models' rows, clips per batch on a GPU
SMALLEST_CLIPS = {"r2plus1d_18": (4, 32), "s3d": (16, 224)}  # (frames, crop): s3d's last pooling is 2x7x7
KINETICS_MEAN, KINETICS_STD = [0.43216, 0.394666, 0.37645], [0.22803, 0.22145, 0.216989]


# ---------------------------------------------------------------- settings

def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(HERE, "out", "gpu"))
    p.add_argument("--quick", action="store_true", help="fewer images, shorter rows")
    p.add_argument("--images", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--arch")
    p.add_argument("--crop", type=int)
    p.add_argument("--seconds", type=float, help="measured seconds per row (after warm-up)")
    p.add_argument("--threads", help="CPU decode thread counts, comma-separated")
    p.add_argument("--budget", type=float, help="seconds after which the optional rows are skipped")
    p.add_argument("--no-optional", action="store_true", help="skip cudnn.benchmark, compile, in-flight rows")
    p.add_argument("--clip-input", choices=("documented", "smallest"),
                   help="the clip models' input: their documented one (a GPU's default), or the smallest they take")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu, quick = args.device == "cuda", args.quick
    cores = os.cpu_count() or 1
    defaults = {
        "images": (1024 if quick else 4096) if gpu else 16,
        "batch": 256 if gpu else 4,
        "arch": "resnet50" if gpu else "resnet18",
        "crop": 224 if gpu else 64,
        "seconds": (3.0 if quick else 8.0) if gpu else (0.2 if quick else 1.0),
        "budget": (150.0 if quick else 330.0) if gpu else 60.0,
        "clip_input": "documented" if gpu else "smallest",
        "threads": ",".join(str(n) for n in sorted({n for n in (1, 4, 16, cores) if n <= cores}))
        if gpu else ",".join(str(n) for n in sorted({1, min(2, cores)})),
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.threads = [int(n) for n in str(args.threads).split(",") if n.strip()]
    args.resize = round(args.crop * 256 / 224)
    args.sizes = GPU_SIZES if gpu else CPU_SIZES
    return args


# ---------------------------------------------------------------- data

def _write_jpeg(job) -> None:
    path, width, height, seed = job
    photo(width, height, seed=seed).save(path, quality=90)


def make_jpegs(root: str, n: int, sizes) -> float:
    """n JPEGs in class folders under root, on every core; returns the seconds taken."""
    t = time.perf_counter()
    jobs = []
    for i in range(n):
        folder = os.path.join(root, f"c{i % 10}")
        os.makedirs(folder, exist_ok=True)
        jobs.append((os.path.join(folder, f"{i:06d}.jpg"), *sizes[i % len(sizes)], i))
    if n < 64:
        list(map(_write_jpeg, jobs))
    else:  # fork before CUDA is initialised: the children never touch it
        with multiprocessing.get_context("fork").Pool(os.cpu_count()) as workers:
            workers.map(_write_jpeg, jobs, chunksize=16)
    return time.perf_counter() - t


def read_batches(root: str, batch: int) -> List[Dict[str, np.ndarray]]:
    """The read stage's output for the folder: plan_source, then read_batch, as runner.py chains them
    (Ray Data hands plan blocks to read_batch as numpy columns). Only full batches are kept."""
    plan = plan_source(SourceConfig(uri=root, format="image_folder"))
    columns = {k: np.array(v, dtype=object) for k, v in plan.to_pydict().items()}
    out = list(read_batch(columns, {}, rows_per_batch=batch, media="image"))
    return [b for b in out if len(b["data"]) == batch]


# ---------------------------------------------------------------- measuring

class Skip(Exception):
    """A row that cannot be measured for a reason other than a failure."""


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.gpu = self.device.type == "cuda"
        self.rows: List[Dict[str, Any]] = []
        self.t0 = time.perf_counter()

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def rate(self, fn: Callable[[Any], Any], items: List[Any], per_item: int, warmup: int = 2,
             min_items: int = 2) -> Dict[str, float]:
        """images/s of fn over items (cycled) for ~args.seconds after `warmup` calls."""
        for k in range(warmup):
            fn(items[k % len(items)])
        self.sync()
        done, t = 0, time.perf_counter()
        while done < min_items or time.perf_counter() - t < self.args.seconds:
            fn(items[done % len(items)])
            done += 1
            self.sync()
        seconds = time.perf_counter() - t
        return {"images_per_s": done * per_item / seconds, "batches": done, "seconds": round(seconds, 3),
                "ms_per_batch": round(1000 * seconds / done, 2)}

    def row(self, key: str, what: str, fn: Callable[[], Dict[str, Any]], gpu_only: bool = False,
            optional: bool = False, reserve: float = 0.0) -> Dict[str, Any]:
        """One row of the table; an optional row is skipped once the time budget less `reserve`
        (what it may need on its own, torch.compile's compile time) is spent."""
        row: Dict[str, Any] = {"key": key, "what": what}
        if gpu_only and not self.gpu:
            row.update(status="skipped", note="GPU only")
        elif optional and self.args.no_optional:
            row.update(status="skipped", note="--no-optional")
        elif optional and time.perf_counter() - self.t0 > self.args.budget - reserve:
            less = f", less {reserve:.0f} s for this row" if reserve else ""
            row.update(status="skipped", note=f"time budget ({self.args.budget:.0f} s{less}) spent")
        else:
            try:
                row.update(status="ok", **fn())
            except Skip as e:
                row.update(status="skipped", note=str(e))
            except Exception as e:  # one row failing leaves the others standing
                row.update(status="skipped", note=f"failed: {type(e).__name__}: {str(e)[:200]}")
        if "images_per_s" in row:
            row["images_per_s"] = round(row["images_per_s"], 1)
        else:
            row["images_per_s"] = None
        self.rows.append(row)
        shown = f"{row['images_per_s']:.1f} images/s" if row["images_per_s"] is not None else row["status"]
        print(f"  {key}: {shown} {row.get('note', '')}", flush=True)
        return row


def embed_spec(args: argparse.Namespace, threads: int, arch: Optional[str] = None) -> EmbedSpec:
    """The EmbedSpec runner._embed_spec builds for `decode_on: actor` (prepare.py's values, weights none)."""
    cfg = ModelConfig(arch=arch or args.arch, weights="none", device=args.device)
    image = ImageSpec(resize=args.resize, crop=args.crop)
    weights = resolve(cfg)
    return EmbedSpec(model=cfg, weights=weights, crop=args.crop, dim=feature_dim(cfg, args.crop, weights),
                     mean=MEAN, std=STD, dtype="float16", torch_threads=threads, image=image)


def actor(args: argparse.Namespace, threads: int, cpu_decode: bool = False, arch: Optional[str] = None):
    """The model stage's actor class, built and called as Ray Data would, without Ray."""
    a = Embedder(embed_spec(args, threads, arch))
    if cpu_decode:  # on a GPU it decodes on the device; the CPU path is the one for other formats
        a.decode = decode_batch
    return a


def features(a, batch: Dict[str, np.ndarray]) -> np.ndarray:
    out = a(dict(batch))
    assert (out["error_stage"] == "").all(), set(out["error_message"])
    return out["feature"].astype(np.float32)


def embed_fp32(a, pixels) -> np.ndarray:
    """Embedder.embed without autocast (and without TF32): the float32 reference."""
    x = torch.as_tensor(pixels).to(a.device).permute(0, 3, 1, 2)
    x = (x.float() - a.mean) / a.std
    if a.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.inference_mode():
            return a.module(x).float().cpu().numpy()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def embed_bf16_cpu(a, pixels) -> np.ndarray:
    """On a CPU the actor runs float32; the bf16 it would get with CPU autocast, for the check."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return a.embed(pixels)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def compare(test: np.ndarray, ref: np.ndarray, what: str, **extra) -> Dict[str, Any]:
    """Row-wise cosine of test against ref; `centered` removes the mean feature over the rows, and
    `other_images` is the cosine between different images' features: with random weights the
    features share a large common part, and these show how much of the raw figure that is."""
    c = cosines(test, ref)
    mean = ref.mean(0, keepdims=True)
    centered = cosines(test - mean, ref - mean)
    other = cosines(ref, np.roll(ref, 1, axis=0))
    return {"what": what, "rows": int(len(c)), "min": round(float(c.min()), 6), "mean": round(float(c.mean()), 6),
            "centered_min": round(float(centered.min()), 6), "other_images_mean": round(float(other.mean()), 6),
            "target": TARGETS["cosine"], "pass": bool(c.min() >= TARGETS["cosine"]), **extra}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    b = Bench(args)
    gpu, dev = b.gpu, b.device
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as root:
        gen_s = make_jpegs(root, args.images, args.sizes)
        batches = read_batches(root, args.batch)
        sizes = [len(d) for x in batches for d in x["data"]]
    if not batches:
        raise SystemExit(f"--images {args.images} makes no full batch of {args.batch}")
    print(f"{args.images} JPEGs in {gen_s:.1f} s (mean {np.mean(sizes) / 1024:.0f} KiB), "
          f"{len(batches)} batches of {args.batch}, on {args.device}", flush=True)
    images = args.batch

    main = actor(args, threads=max(args.threads))
    pixels = decode_batch(dict(batches[0]), main.spec.image)["pixels"]
    on_device = torch.from_numpy(pixels).to(dev)

    # 1. the models alone, on device tensors
    name = f"{args.arch}@{args.crop}"
    b.row("model_alone", f"{name} embed() alone, uint8 on the device", lambda: b.rate(main.embed, [on_device], images))
    if args.arch != "resnet18":
        def resnet18():
            return b.rate(actor(args, max(args.threads), arch="resnet18").embed, [on_device], images)
        b.row("model_alone_resnet18", f"resnet18@{args.crop} embed() alone", resnet18)

    def convnext():
        import timm

        a = actor(args, max(args.threads), arch="resnet18")  # its embed(), with timm's backbone in place of the model
        a.module = timm.create_model("convnext_tiny", pretrained=False, num_classes=0).eval().to(dev)
        if gpu:
            a.module = a.module.to(memory_format=torch.channels_last)
        return b.rate(a.embed, [on_device], images)
    b.row("model_alone_convnext_tiny", f"timm convnext_tiny@{args.crop} embed() alone (random init)", convnext)

    for arch in CLIP_MODELS:
        frames, crop = clip_input(args, arch)
        b.row(f"model_alone_{arch}", f"{arch} {frames}x{crop} embed() alone, uint8 clips on the device; "
              "images/s are frames/s", lambda arch=arch: clip_rate(b, args, arch))

    # 2. decoding alone, on the device
    b.row("decode_jpeg_alone", "torchvision decode_jpeg(batch, device=cuda) alone (nvJPEG), full size",
          lambda: b.rate(lambda x: _decode_jpegs(list(x["data"]), dev), batches, images), gpu_only=True)
    b.row("device_decode_alone", "device_decode.decode_on_device: headers + nvJPEG + resize + crop",
          lambda: b.rate(lambda x: decode_on_device(dict(x), main.spec.image, dev), batches, images), gpu_only=True)

    # 3. the actor, JPEG bytes in, features out, decoding on the device
    actor_row = b.row("actor_gpu_decode", f"the actor ({name}), JPEG bytes -> nvJPEG -> features",
                      lambda: b.rate(main, [dict(x) for x in batches], images), gpu_only=True)

    # 4. the actor decoding on N CPU threads
    for n in args.threads:
        def cpu_decode(n=n):
            return b.rate(actor(args, n, cpu_decode=True), batches, images, warmup=1)
        b.row(f"actor_cpu_decode_t{n}", f"the actor ({name}), JPEG bytes -> Pillow on {n} threads -> features",
              cpu_decode)

    checks = correctness(args, main, batches)

    # 5. optional rows
    def cudnn_benchmark():
        torch.backends.cudnn.benchmark = True
        try:
            return b.rate(main, batches, images, warmup=3)
        finally:
            torch.backends.cudnn.benchmark = False
    b.row("actor_gpu_decode_cudnn_benchmark", "the actor, GPU decode, torch.backends.cudnn.benchmark on",
          cudnn_benchmark, gpu_only=True, optional=True)
    b.row("actor_two_in_flight",
          "the actor, GPU decode, 2 threads x 2 CUDA streams (copy/compute overlap); ms per pair",
          lambda: in_flight(b, main, batches), gpu_only=True, optional=True)
    compiled = actor(args, max(args.threads))
    b.row("model_alone_compiled", f"{name} embed() alone, torch.compile(backbone)",
          lambda: compile_rate(b, compiled, [on_device], images), gpu_only=True, optional=True, reserve=150.0)

    def actor_compiled():
        if not hasattr(compiled.module, "_orig_mod"):
            raise Skip("as model_alone_compiled (the backbone is not compiled)")
        return b.rate(compiled, batches, images)
    b.row("actor_gpu_decode_compiled", "the actor, GPU decode, torch.compile(backbone)",
          actor_compiled, gpu_only=True, optional=True)
    return report(args, b, checks, gen_s, float(np.mean(sizes)), actor_row)


def clip_input(args: argparse.Namespace, arch: str) -> tuple:
    """(frames, crop) of the clip model's rows: its weights' clip length and crop, or the smallest it takes."""
    if args.clip_input == "smallest":
        return SMALLEST_CLIPS[arch]
    defaults = input_defaults(weights_entry(arch))
    return defaults["num_frames"], defaults["crop"]


def clip_rate(b: Bench, args: argparse.Namespace, arch: str) -> Dict[str, Any]:
    """A clip model's embed() (model.family torchvision_video, the Embedder of every family) on uint8
    clips (B, T, H, W, 3) already on the device: clips/s, and frames/s as images_per_s."""
    frames, crop = clip_input(args, arch)
    batch = CLIP_MODELS[arch] if b.gpu else 1
    cfg = ModelConfig(arch=arch, family="torchvision_video", weights="none", device=args.device)
    weights = resolve(cfg)
    a = Embedder(EmbedSpec(model=cfg, weights=weights, crop=crop, dim=feature_dim(cfg, crop, weights, frames=frames),
                           mean=KINETICS_MEAN, std=KINETICS_STD, torch_threads=max(args.threads), clips=True))
    clips = torch.randint(0, 256, (batch, frames, crop, crop, 3), dtype=torch.uint8).to(b.device)
    r = b.rate(a.embed, [clips], batch, warmup=1, min_items=1)
    return {**r, "clips_per_s": round(r["images_per_s"], 2), "images_per_s": r["images_per_s"] * frames,
            "clip": f"{batch}x{frames}x{crop}"}


def compile_rate(b: Bench, a, items, images) -> Dict[str, Any]:
    t = time.perf_counter()
    a.module = torch.compile(a.module)
    a.embed(items[0])
    b.sync()
    compile_s = time.perf_counter() - t
    return {**b.rate(a.embed, items, images), "compile_s": round(compile_s, 1)}


def in_flight(b: Bench, a, batches) -> Dict[str, Any]:
    """Two threads, each on its own CUDA stream, each calling the actor on every other batch
    (as an actor with max_concurrency=2 would); its features checked against one at a time."""
    streams = [torch.cuda.Stream() for _ in range(2)]
    local, lock = threading.local(), threading.Lock()

    def call(batch):
        if not hasattr(local, "stream"):
            with lock:  # each thread its own stream
                local.stream = streams.pop()
        with torch.cuda.stream(local.stream):
            return a(dict(batch))["feature"]

    pairs = [batches[i:i + 2] for i in range(0, len(batches) - 1, 2)]
    with ThreadPoolExecutor(2) as threads:
        def both(pair):
            return list(threads.map(call, pair))
        result = b.rate(both, pairs, 2 * len(batches[0]["data"]))
        got = both(pairs[0])
    ref = [features(a, x) for x in pairs[0]]
    c = cosines(np.concatenate(got).astype(np.float32), np.concatenate(ref))
    return {**result, "cosine_vs_sequential_min": round(float(c.min()), 6)}


def correctness(args: argparse.Namespace, main, batches) -> Dict[str, Any]:
    """GPU-decoded against CPU-decoded features of the same files; bf16 against float32 features."""
    dev = main.device
    sample = batches[: max(1, 512 // args.batch)]
    checks: Dict[str, Any] = {}
    try:
        # On a CPU the same device path runs with torchvision's decode_jpeg on the CPU (libjpeg-turbo).
        main.decode = lambda batch, spec, **kw: decode_on_device(batch, spec, dev, **kw)
        on_dev = np.concatenate([features(main, x) for x in sample])
        main.decode = decode_batch
        on_cpu = np.concatenate([features(main, x) for x in sample])
        checks["decode_cosine"] = compare(on_dev, on_cpu, "features of JPEGs decoded by decode_on_device against "
                                          "Pillow (decode_batch)", device_decode_on=dev.type)
    except Exception as e:
        checks["decode_cosine"] = {"status": "failed", "note": f"{type(e).__name__}: {str(e)[:200]}"}
    finally:
        main.decode = _actor_decode(main)
    try:
        pixels = np.concatenate([decode_batch(dict(x), main.spec.image)["pixels"] for x in sample])
        chunks = np.array_split(pixels, max(1, len(pixels) // args.batch))
        if dev.type == "cuda":
            low = np.concatenate([main.embed(p) for p in chunks])
        else:
            low = np.concatenate([embed_bf16_cpu(main, p) for p in chunks])
        full = np.concatenate([embed_fp32(main, p) for p in chunks])
        checks["bf16_cosine"] = compare(low, full, "bf16 autocast features against float32 (no TF32), same pixels",
                                        autocast_on=dev.type)
    except Exception as e:
        checks["bf16_cosine"] = {"status": "failed", "note": f"{type(e).__name__}: {str(e)[:200]}"}
    return checks


def _actor_decode(a):
    """The decode function Embedder.__init__ chose for its device."""
    from functools import partial

    return partial(decode_on_device, device=a.device) if a.device.type == "cuda" else decode_batch


# ---------------------------------------------------------------- reporting

def machine(args: argparse.Namespace) -> Dict[str, Any]:
    import torchvision

    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else None
    return {"device": args.device, "gpu": gpu, "cpus": os.cpu_count(), "host": platform.node(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "timm": timm_version}


def report(args, b: Bench, checks, gen_s: float, mean_bytes: float, actor_row) -> Dict[str, Any]:
    rows = {r["key"]: r for r in b.rows}
    model = rows["model_alone"]["images_per_s"]
    best = max((r for r in b.rows if r["key"].startswith("actor_") and r["images_per_s"]),
               key=lambda r: r["images_per_s"], default=None)
    ratio = actor_row["images_per_s"] / model if actor_row["images_per_s"] and model else None
    targets = {
        "actor_over_model": {"value": None if ratio is None else round(ratio, 3), "target": TARGETS["actor_over_model"],
                             "pass": None if ratio is None else ratio >= TARGETS["actor_over_model"],
                             "what": "actor_gpu_decode / model_alone"},
        "actor_images_per_s": {"value": best and best["images_per_s"], "row": best and best["key"],
                               "target": TARGETS["actor_images_per_s"],
                               "pass": (None if not (best and b.gpu)
                                        else best["images_per_s"] >= TARGETS["actor_images_per_s"]),
                               "what": "the best actor row, images/s on this one device"},
    }
    settings = {k: getattr(args, k) for k in ("device", "images", "batch", "arch", "crop", "resize", "seconds",
                                              "threads", "budget", "quick", "clip_input")}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(args), "settings": settings, "weights": "random init (none): throughput only",
        "jpegs": {"count": args.images, "mean_bytes": round(mean_bytes), "generate_s": round(gen_s, 2),
                  "sizes": [f"{w}x{h}" for w, h in args.sizes], "quality": 90},
        "rows": b.rows, "checks": checks, "targets": targets,
        "ray_imported": "ray" in sys.modules, "wall_s": round(time.perf_counter() - b.t0, 1),
    }


def markdown(result: Dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"GPU check, {result['date']}: {m['gpu'] or 'CPU (smoke run, not a GPU figure)'}, {m['cpus']} CPUs, "
             f"torch {m['torch']}, torchvision {m['torchvision']}; {s['images']} JPEGs, batch {s['batch']}, "
             f"{s['arch']}@{s['crop']}, random weights; Ray imported: {result['ray_imported']}; {result['wall_s']} s",
             "", "| row | images/s | ms/batch | what |", "|---|---|---|---|"]
    for r in result["rows"]:
        rate = f"{r['images_per_s']:,.1f}" if r["images_per_s"] is not None else f"skipped ({r.get('note', '')})"
        extra = "".join(f"; {k} {r[k]}" for k in ("compile_s", "cosine_vs_sequential_min", "clips_per_s", "clip")
                        if k in r)
        lines.append(f"| {r['key']} | {rate} | {r.get('ms_per_batch', '')} | {r['what']}{extra} |")
    lines += ["", "| check | min cosine | mean | centered min | other images | target | pass |",
              "|---|---|---|---|---|---|---|"]
    for key, c in result["checks"].items():
        if "min" in c:
            lines.append(f"| {key} ({c.get('device_decode_on') or c.get('autocast_on')}) | {c['min']} | {c['mean']} | "
                         f"{c['centered_min']} | {c['other_images_mean']} | {c['target']} | {c['pass']} |")
        else:
            lines.append(f"| {key} | {c.get('status')}: {c.get('note')} | | | | | |")
    lines += ["", "| target | value | target | pass |", "|---|---|---|---|"]
    for key, t in result["targets"].items():
        lines.append(f"| {key} ({t['what']}) | {t['value']} | {t['target']} | {t['pass']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = parse(argv)
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    text = markdown(result)
    print("\n" + text, flush=True)
    with open(os.path.join(args.out, "gpu.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "gpu.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(args.out, 'gpu.json')} and gpu.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
