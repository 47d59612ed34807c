"""Everything resolved on the driver before any work starts.

A job that cannot run (unknown model or layer, missing weights, unreachable source, an output
root that already holds a job) is refused here, with the key or path in the message.
"""
from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .config import ConfigError, JobConfig, output_storage_options
from .decode import ImageSpec
from .models import check_arch, feature_dim
from .models.temporal import HeadInfo, resolve_heads
from .models.weights import Weights, resolve
from .report import JOB_FILE
from .sinks import SinkSpec, image_columns, video_columns
from .sources import filesystem, plan_source
from .video import FrameSpec

DEFAULT_RESIZE, DEFAULT_CROP = 256, 224
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
PLAN_FILE = "_plan.parquet"


class OutputExists(RuntimeError):
    """The output root already holds a job's output."""


@dataclass
class Prepared:
    job: JobConfig
    weights: Weights
    image: ImageSpec
    mean: list
    std: list
    dim: int
    plan: pa.Table
    out_options: Dict[str, Any]
    heads: List[HeadInfo] = field(default_factory=list)  # videos: the temporal heads

    @property
    def frames(self) -> FrameSpec:
        return FrameSpec(resize=self.job.video.size or self.image.resize, crop=self.image.crop)

    def sink_spec(self) -> SinkSpec:
        dtype = self.job.output.dtype
        if self.job.is_video:
            heads = [(h.column, h.out_dim) for h in self.heads]
            columns = video_columns(dtype, heads, self.dim if self.job.output.frame_features else None)
        else:
            columns = image_columns(dtype, self.dim)
        return SinkSpec(
            out_uri=self.job.output.uri,
            storage_options=self.out_options,
            partition_by=self.job.output.partition_by,
            columns=columns,
            metadata=self.provenance(),
        )

    def provenance(self) -> Dict[str, str]:
        m = self.job.model
        return {
            "featurize.version": __version__,
            "featurize.job": self.job.name,
            "featurize.model": m.arch,
            "featurize.weights_id": self.weights.id,
            "featurize.weights_sha256": self.weights.sha256,
            "featurize.layer": m.layer or "penultimate",
            "featurize.pool": m.pool,
            "featurize.preprocess": json.dumps(
                {"resize": self.image.resize, "crop": self.image.crop, "mean": self.mean, "std": self.std,
                 "interpolation": self.image.interpolation, "color": "RGB"}
            ),
            "featurize.dtype": self.job.output.dtype,
            "featurize.dim": str(self.dim),
            **(self._video_provenance() if self.job.is_video else {}),
        }

    def _video_provenance(self) -> Dict[str, str]:
        sampling = dataclasses.asdict(self.job.video)
        sampling["size"] = self.frames.resize
        return {
            "featurize.video_sampling": json.dumps(sampling),
            "featurize.temporal": json.dumps([h.provenance() for h in self.heads]),
        }


def prepare(job: JobConfig) -> Prepared:
    check_arch(job.model)  # before fetching weights for a model that does not exist
    weights = resolve(job.model, job.source.storage_options)
    image = _resolve_image(job, weights.transforms)
    dim = feature_dim(job.model, image.crop, weights, job.source.storage_options)  # layer and fit too
    heads = resolve_heads(job.temporal, dim, job.source.storage_options) if job.is_video else []
    out_options = output_storage_options(job)
    _refuse_existing_output(job.output.uri, out_options)
    plan = plan_source(job.source)
    return Prepared(
        job=job,
        weights=weights,
        image=image,
        mean=job.preprocess.mean or weights.transforms.get("mean", IMAGENET_MEAN),
        std=job.preprocess.std or weights.transforms.get("std", IMAGENET_STD),
        dim=dim,
        plan=plan,
        out_options=out_options,
        heads=heads,
    )


def _resolve_image(job: JobConfig, defaults: Dict[str, Any]) -> ImageSpec:
    pre = job.preprocess
    resize = pre.resize or defaults.get("resize", DEFAULT_RESIZE)
    crop = pre.crop or defaults.get("crop", DEFAULT_CROP)
    if crop > resize:
        if pre.resize is None:  # the weights' resize is below the crop the job asks for
            resize = crop
        else:
            raise ConfigError(f"preprocess.crop: {crop} is larger than preprocess.resize {resize}")
    interpolation = pre.interpolation or defaults.get("interpolation", "bilinear")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"  # torchvision modes Pillow lacks (none among its weights today)
    return ImageSpec(resize=resize, crop=crop, interpolation=interpolation)


def _refuse_existing_output(uri: str, options: Dict[str, Any]) -> None:
    try:
        fs, root = filesystem(uri, options)
        taken = [name for name in (JOB_FILE, "features", "errors") if fs.exists(f"{root.rstrip('/')}/{name}")]
    except Exception as e:
        raise OutputExists(f"output.uri {uri}: cannot be reached ({type(e).__name__}: {e})") from None
    if taken:
        raise OutputExists(
            f"output.uri {uri} already holds a job's output ({', '.join(taken)}); "
            "choose another output.uri or remove it first"
        )


def save_plan(prepared: Prepared) -> None:
    fs, root = filesystem(prepared.job.output.uri, prepared.out_options)
    buf = io.BytesIO()
    pq.write_table(prepared.plan, buf)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root.rstrip('/')}/{PLAN_FILE}", buf.getvalue())
