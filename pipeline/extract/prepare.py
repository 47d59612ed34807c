"""Everything about the model and its input resolved on the driver before any work starts.

A job that cannot run (unknown model or layer, missing weights, bad temporal heads) is refused
here, with the key or path in the message; the source and the output root are output/root.py's.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .. import __version__
from ..config import (
    DEFAULT_CROP,
    DEFAULT_NUM_FRAMES,
    DEFAULT_RESIZE,
    JobConfig,
    file_bytes,
    output_storage_options,
    source_store_options,
)
from ..errors import ConfigError
from ..models.base import check_arch, family, feature_dim, preprocess_defaults, resolve
from ..models.temporal import HeadInfo, resolve_heads
from ..models.weights import Weights
from ..redact import redact_text
from .decode import ImageSpec
from .video import FrameSpec

if TYPE_CHECKING:
    from ..output.sink import SinkSpec

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

@dataclass
class Prepared:
    job: JobConfig
    weights: Weights
    image: ImageSpec
    mean: list
    std: list
    dim: int
    out_options: Dict[str, Any]
    heads: List[HeadInfo] = field(default_factory=list)  # videos: the temporal heads
    model_options: Dict[str, Any] = field(default_factory=dict)  # fsspec options for model.weights
    frame_size: Optional[Tuple[int, int]] = None  # clip models: the weights' exact (H, W) for every frame

    @property
    def frames(self) -> FrameSpec:
        return FrameSpec(resize=self.job.video.size or self.image.resize, crop=self.image.crop,
                         squash=self.image.squash, size=self.frame_size)

    def sink_spec(self, rows: int = 0) -> SinkSpec:
        """The features table's writer for a run of `rows` samples (or clips) to do."""
        from ..output.sink import SinkSpec, image_columns, target_bytes, video_columns  # Ray's: the runner's

        dtype = self.job.output.dtype
        if self.job.clips:  # one feature per clip, beside the clip's timing
            columns = video_columns(dtype, [("feature", self.dim)], None)
        elif self.job.is_video:
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
            file_bytes=target_bytes(file_bytes(self.job.output.file_size, "output.file_size"), rows, columns,
                                    self.job.video.num_frames or 1),
        )

    def provenance(self) -> Dict[str, str]:
        """The features' Parquet metadata; URIs in it (weights, checkpoints) without credentials."""
        return {k: redact_text(v) for k, v in self._provenance().items()}

    def _provenance(self) -> Dict[str, str]:
        m = self.job.model
        return {
            "featurize.version": __version__,
            "featurize.job": self.job.name,
            "featurize.model": m.arch,
            "featurize.model_family": m.family,
            "featurize.weights_id": self.weights.id,
            "featurize.weights_sha256": self.weights.sha256,
            "featurize.layer": m.layer or family(m.family).default_layer,
            "featurize.pool": m.pool,
            "featurize.preprocess": json.dumps(
                {"resize": self.image.resize, "crop": self.image.crop, "mean": self.mean, "std": self.std,
                 "interpolation": self.image.interpolation, "color": "RGB",
                 **({"frame_size": list(self.frame_size)} if self.frame_size else {})}
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
    model_options = source_store_options(job, job.model.weights)
    weights = resolve(job.model, model_options)
    defaults = preprocess_defaults(job.model, weights)
    # video.num_frames unset: a clip model's clip length; resolved here so the output records the number
    frames = job.video.num_frames or defaults.get("num_frames", DEFAULT_NUM_FRAMES)
    job = dataclasses.replace(job, video=dataclasses.replace(job.video, num_frames=frames))
    image = _resolve_image(job, defaults)
    dim = feature_dim(job.model, image.crop, weights, model_options, frames=frames)  # layer and fit too
    heads = resolve_heads(job.temporal, dim, job.source.storage_options) if job.is_video and not job.clips else []
    return Prepared(
        job=job,
        weights=weights,
        image=image,
        mean=job.preprocess.mean or defaults.get("mean", IMAGENET_MEAN),
        std=job.preprocess.std or defaults.get("std", IMAGENET_STD),
        dim=dim,
        out_options=output_storage_options(job),
        heads=heads,
        model_options=model_options,
        frame_size=_frame_size(job, defaults),
    )


def _frame_size(job: JobConfig, defaults: Dict[str, Any]) -> Optional[Tuple[int, int]]:
    """The weights' exact frame size (r2plus1d_18's 128x171), unless the job sizes frames itself."""
    pre = job.preprocess
    if pre.resize or pre.resize_mode or job.video.size or not defaults.get("frame_size"):
        return None
    return tuple(defaults["frame_size"])


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
    resize_mode = pre.resize_mode or defaults.get("resize_mode", "shorter")
    if resize_mode not in ("shorter", "squash"):  # timm's `border`, open_clip's `longest`: pad, not crop
        raise ConfigError(f"preprocess.resize_mode: the weights' transforms resize the {resize_mode} way "
                          "(then pad), which featurize does not reproduce; set preprocess.resize_mode "
                          "shorter or squash to choose an approximation")
    if interpolation not in ("bilinear", "bicubic", "nearest"):
        interpolation = "bilinear"  # torchvision modes Pillow lacks (none among its weights today)
    return ImageSpec(resize=resize, crop=crop, interpolation=interpolation, jpeg_draft=pre.jpeg_draft,
                     squash=resize_mode == "squash")
