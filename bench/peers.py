"""This project against its peers, side by side, on the same JPEGs and the same model.

    .venv/bin/python bench/peers.py [--images 2000] [--models resnet18:112 resnet18:224 resnet50:224]
    .venv/bin/python bench/peers.py --models timm/convnext_tiny:224 open_clip/ViT-B-32:224 resnet50:224

A model is `[family/]arch:crop` (family: torchvision, the default, timm or open_clip); the peers
use the family's own library for the model and its preprocessing (timm's create_transform,
open_clip's transforms), featurize the family's defaults at that crop.

For each model it runs, each in a fresh process whose whole process tree's memory is sampled
(Ray's raylet and workers included; they descend from the driver of an embedded Ray):

- model alone: the ceiling, `Embedder.embed` on uint8 batches already in memory, all cores;
- featurize: this project's pipeline, JPEG files to committed Parquet on an embedded local Ray;
- dataloader: a plain PyTorch loop, `DataLoader(num_workers=cores)` decoding with PIL and
  torchvision transforms, the model in the main process;
- ray data example: Ray Data's documented batch inference (`read_images`, a preprocessing
  `map_batches`, a model class on an actor pool, `write_parquet`);
- one at a time: open, transform and embed each image in turn.

Then the same for videos (`--clips`, default 120; 0 skips them): decoding alone (a process per
core), the models alone (ResNet-18 + LSTM on decoded clips), featurize, a DataLoader loop over the
same decoder, and one clip at a time; the ratio is to the slower of decoding alone and the models.

Throughput counts from the first image read to the last feature (written, for the Ray ones);
process start, imports, `ray.init` and model construction are reported apart as start-up. Prints
images/s, the ratio to the model alone (run again between the contenders; each one's ratio is to
the runs just before and after it), start-up and peak RSS of all the run's processes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("model alone", "featurize", "dataloader", "ray data example", "one at a time")
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FEATURIZE_SET: list = []  # --set overrides for featurize's job, e.g. resources.decode_on=actor on a GPU


# --- the contenders, each run in its own process ------------------------------------------------

def _model(arch: str):
    import torch
    import torchvision
    from images import family_arch

    torch.set_num_threads(os.cpu_count() or 1)
    family, name = family_arch(arch)
    if family == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0).eval()  # pooled pre-logits
    if family == "open_clip":
        import open_clip

        return _clip_image(open_clip.create_model(name, pretrained=None).visual).eval()
    model = torchvision.models.get_model(name, weights=None)
    model.fc = torch.nn.Identity()  # penultimate features, as featurize's default layer
    return model.eval()


def _clip_image(visual):
    import torch

    class ClipImage(torch.nn.Module):  # encode_image(normalize=True) of the image tower
        def __init__(self):
            super().__init__()
            self.visual = visual

        def forward(self, x):
            return torch.nn.functional.normalize(self.visual(x), dim=-1)
    return ClipImage()


def _transform(crop: int, arch: str = "resnet18"):
    from images import family_arch
    from torchvision import transforms

    family, name = family_arch(arch)
    if family == "timm":
        import timm
        from timm.data import create_transform, resolve_data_config

        data = resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
        return create_transform(**{**data, "input_size": (3, crop, crop)})
    if family == "open_clip":
        import open_clip

        return open_clip.create_model_and_transforms(name, pretrained=None)[2]
    return transforms.Compose([transforms.Resize(int(crop * 256 / 224)), transforms.CenterCrop(crop),
                               transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def run_model_alone(arch, crop, paths, batch):
    from images import model_alone

    t = time.perf_counter()
    rate = model_alone(arch, crop, paths, batch)
    return {"rate": rate, "startup_s": 0.0, "wall_s": time.perf_counter() - t}


def run_featurize(arch, crop, paths, batch):
    from images import pipeline

    run = pipeline(arch, crop, os.path.dirname(os.path.dirname(paths[0])), len(paths), batch, FEATURIZE_SET)
    return {"rate": run["execution"], "steady": run["steady"], "startup_s": run["startup_s"]}


def run_dataloader(arch, crop, paths, batch):
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    model, tf = _model(arch), _transform(crop, arch)

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(Image.open(paths[i]).convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=os.cpu_count() or 1)
    t1, n = time.perf_counter(), 0
    with torch.inference_mode():
        for x in loader:
            n += len(model(x))
    return {"rate": n / (time.perf_counter() - t1), "startup_s": t1 - t0}


def run_one_at_a_time(arch, crop, paths, batch):
    import torch
    from PIL import Image

    t0 = time.perf_counter()
    model, tf = _model(arch), _transform(crop, arch)
    t1 = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            model(tf(Image.open(p).convert("RGB")).unsqueeze(0))
    return {"rate": len(paths) / (time.perf_counter() - t1), "startup_s": t1 - t0}


def run_ray_data_example(arch, crop, paths, batch):
    """Ray Data's batch inference example (docs: "Image Classification Batch Inference with PyTorch")."""
    import numpy as np
    import ray
    import torch

    t0 = time.perf_counter()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    tf = _transform(crop, arch)

    def preprocess(row):
        from PIL import Image

        row["transformed"] = tf(Image.fromarray(row["image"])).numpy()
        return {"transformed": row["transformed"]}

    class ResnetModel:
        def __init__(self):
            self.model = _model(arch)

        def __call__(self, batch):
            with torch.inference_mode():
                out = self.model(torch.as_tensor(np.stack(batch["transformed"])))
            return {"feature": out.numpy()}

    out = os.path.join(HERE, "out", "peer-ray-data")
    shutil.rmtree(out, ignore_errors=True)
    t1 = time.perf_counter()
    ds = ray.data.read_images(os.path.dirname(os.path.dirname(paths[0])), mode="RGB")
    ds = ds.map(preprocess).map_batches(ResnetModel, compute=ray.data.ActorPoolStrategy(size=1),
                                        batch_size=batch)
    ds.write_parquet(out)
    rate = len(paths) / (time.perf_counter() - t1)
    ray.shutdown()
    return {"rate": rate, "startup_s": t1 - t0}


RUNNERS = {"model alone": run_model_alone, "featurize": run_featurize, "dataloader": run_dataloader,
           "ray data example": run_ray_data_example, "one at a time": run_one_at_a_time}


# --- videos: UCF101-like clips, 16 frames at 112, ResNet-18 + LSTM (bench/video.py's data and models) ---

def _video_models():
    """clips (N, T, H, W, 3) uint8 -> clip features, as the pipeline's CNN and LSTM compute them."""
    import numpy as np
    from video import LSTM, SPEC

    from pipeline.config import ModelConfig, TemporalConfig
    from pipeline.models.actor import Embedder, EmbedSpec
    from pipeline.models.base import feature_dim, resolve
    from pipeline.models.temporal import TemporalEmbedder, resolve_heads

    cfg, cores = ModelConfig(arch="resnet18", weights="none"), os.cpu_count() or 1
    dim = feature_dim(cfg, SPEC.crop)
    cnn = Embedder(EmbedSpec(cfg, resolve(cfg), SPEC.crop, dim, MEAN, STD, torch_threads=cores))
    heads = TemporalEmbedder(resolve_heads([TemporalConfig(**LSTM)], dim), dtype="float16", torch_threads=cores)

    def embed(clips):
        feats = cnn.embed(clips.reshape(-1, *clips.shape[2:])).reshape(len(clips), clips.shape[1], -1)
        return heads.clip_features(feats, np.full(len(clips), clips.shape[1]))
    return embed


def run_video_decode_alone(paths, frames):
    from video import decode_alone

    return {"rate": decode_alone(paths, frames)[0], "startup_s": 0.0}


def run_video_models_alone(paths, frames):
    from video import decode_alone, models_alone

    return {"rate": models_alone(decode_alone(paths, frames)[1], batch_clips=max(1, 32 // frames)), "startup_s": 0.0}


def run_video_featurize(paths, frames):
    from video import pipeline

    run = pipeline(os.path.dirname(os.path.dirname(paths[0])), len(paths), frames)
    return {"rate": run["execution"], "steady": run["steady"], "startup_s": run["startup"]}


def run_video_dataloader(paths, frames):
    import numpy as np
    import torch
    from video import _decode

    t0 = time.perf_counter()
    embed = _video_models()

    class Clips(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return _decode((paths[i], frames))

    loader = torch.utils.data.DataLoader(Clips(), batch_size=max(1, 32 // frames), collate_fn=np.stack,
                                         num_workers=os.cpu_count() or 1)
    t1 = time.perf_counter()
    for clips in loader:
        embed(clips)
    return {"rate": len(paths) / (time.perf_counter() - t1), "startup_s": t1 - t0}


def run_video_one_at_a_time(paths, frames):
    from video import _decode

    t0 = time.perf_counter()
    embed = _video_models()
    t1 = time.perf_counter()
    for p in paths:
        embed(_decode((p, frames))[None])
    return {"rate": len(paths) / (time.perf_counter() - t1), "startup_s": t1 - t0}


VIDEO_RUNNERS = {"decode alone": run_video_decode_alone, "models alone": run_video_models_alone,
                 "featurize": run_video_featurize, "dataloader": run_video_dataloader,
                 "one at a time": run_video_one_at_a_time}


# --- the harness --------------------------------------------------------------------------------

def descendants(root: int) -> list:
    """A process and all its descendants, from /proc (an embedded Ray's processes descend from its driver)."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    return total


def contend(name: str, arch: str, crop: int, images: int, batch: int, clips: int = 0) -> dict:
    """Run one contender in a fresh process; its result and the peak RSS of its process tree."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", name, "--images", str(images),
           "--models", f"{arch}:{crop}", "--batch", str(batch)] + (["--clips", str(clips)] if clips else [])
    cmd += [arg for kv in FEATURIZE_SET for arg in ("--set", kv)]
    env = {**os.environ, "PYTHONPATH": HERE, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                            start_new_session=True)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    out, _ = proc.communicate()
    done.set()
    result = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {"rate": float("nan")}
    return {**result, "peak_rss": peak[0], "ok": proc.returncode == 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--models", nargs="+", default=["resnet18:112", "resnet18:224", "resnet50:224"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--clips", type=int, default=120, help="then the video contenders on this many clips (0: none)")
    parser.add_argument("--one", choices=sorted(set(CONTENDERS) | set(VIDEO_RUNNERS)),
                        help=argparse.SUPPRESS)  # internal: run one contender
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of featurize's job (e.g. resources.decode_on=actor)")
    args = parser.parse_args()
    FEATURIZE_SET.extend(args.set)
    from images import make_jpegs

    if args.one and "--clips" in sys.argv:  # internal: one video contender
        from video import make_clips

        clips = make_clips(os.path.join(HERE, "out", f"clips-{args.clips}"), args.clips)
        print(json.dumps(VIDEO_RUNNERS[args.one](clips, 16)), flush=True)
        return
    paths = make_jpegs(os.path.join(HERE, "out", f"jpegs-{args.images}"), args.images)
    if args.one:
        arch, crop = args.models[0].split(":")
        print(json.dumps(RUNNERS[args.one](arch, int(crop), paths, args.batch)), flush=True)
        return
    print(f"{os.cpu_count()} cores, {args.images} JPEGs 500x375, batch {args.batch}, random-init weights")
    print(f"{'model':<24} {'contender':<17} {'images/s':>9} {'ceiling':>8} {'ratio':>6} "
          f"{'start-up':>9} {'peak RSS':>9}")
    for model in args.models:
        arch, crop = model.split(":")
        for name, r in bracketed(args.only, arch, int(crop), args.images, args.batch).items():
            rate = f"{r['rate']:>9.1f}" if r["ok"] else f"{'failed':>9}"
            ceiling = r.get("ceiling", float("nan"))
            steady = f"  (steady {r['steady']:.1f}/s, {r['steady'] / ceiling:.2f})" if r.get("steady") else ""
            print(f"{model:<24} {name:<17} {rate} {ceiling:>8.1f} {r['rate'] / ceiling:>6.2f} "
                  f"{r.get('startup_s', 0):>8.1f}s {r['peak_rss'] / 2**30:>7.2f} GB{steady}", flush=True)
    if args.clips:
        videos(args.clips)


def bracketed(names, arch: str, crop: int, images: int, batch: int) -> dict:
    """Each contender between two runs of the model alone; its ratio is to their mean. This host's
    speed drifts by a third within minutes, so one ceiling for the whole table would not do."""
    if "model alone" not in names:
        return {name: contend(name, arch, crop, images, batch) for name in names}
    ceilings = [contend("model alone", arch, crop, images, batch)]
    results = {}
    for name in [n for n in names if n != "model alone"]:
        results[name] = contend(name, arch, crop, images, batch)
        ceilings.append(contend("model alone", arch, crop, images, batch))
        results[name]["ceiling"] = (ceilings[-2]["rate"] + ceilings[-1]["rate"]) / 2
    rates = [c["rate"] for c in ceilings]
    alone = {**ceilings[0], "rate": sum(rates) / len(rates), "ceiling": sum(rates) / len(rates)}
    print(f"{arch}:{crop} model alone, before and after each contender: "
          + ", ".join(f"{r:.1f}" for r in rates), flush=True)
    return {"model alone": alone, **results}


def videos(clips: int) -> None:
    """The video contenders; the ratio is to the slower of decoding alone and the models alone."""
    print(f"\n{clips} UCF101-like clips (320x240, 25 fps, 7 s, MPEG-4 in AVI), 16 frames at 112, ResNet-18 + LSTM")
    print(f"{'contender':<17} {'clips/s':>9} {'ratio':>6} {'start-up':>9} {'peak RSS':>9}")
    results = {name: contend(name, "resnet18", 112, 0, 32, clips=clips) for name in VIDEO_RUNNERS}
    ceiling = min(results["decode alone"]["rate"], results["models alone"]["rate"])
    for name, r in results.items():
        steady = f"  (steady {r['steady']:.1f}/s, {r['steady'] / ceiling:.2f})" if r.get("steady") else ""
        print(f"{name:<17} {r['rate']:>9.1f} {r['rate'] / ceiling:>6.2f} {r.get('startup_s', 0):>8.1f}s "
              f"{r['peak_rss'] / 2**30:>7.2f} GB{steady}", flush=True)


if __name__ == "__main__":
    main()
