"""Job configuration: dataclasses, YAML loading, `--set` overrides and validation.

Defaults live here and only here. Validation runs before any work starts and every
message names the offending key (`model.pool`, `resources.batch_size`, ...).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

from . import safe_yaml
from .errors import ConfigError, did_you_mean
from .names import plain_name
from .redact import redact

Auto = Literal["auto"]


@dataclass
class SourceConfig:
    uri: str
    format: Literal["image_folder", "video_folder", "webdataset", "manifest"] = "image_folder"
    storage_options: Dict[str, Any] = field(default_factory=dict)
    split: Optional[str] = None  # fixed split; None: the manifest's `split` column, else "all"
    split_files: Dict[str, str] = field(default_factory=dict)  # split -> list of relative paths (UCF101's)
    media: Literal["auto", "image", "video"] = "auto"  # auto: video_folder, or shards/manifest with temporal:
    read_timeout_s: float = 120.0  # a read (file, or a shard's next sample) taking longer: an error row (timeout)
    max_sample_bytes: Union[int, str] = "256MiB"  # a larger file or tar member: an error row, never read
    allow_uris: List[str] = field(default_factory=list)  # manifest URIs may also lie under these prefixes
    follow_symlinks: bool = False  # folders: read symlinks whose target leaves source.uri


DEFAULT_RESIZE, DEFAULT_CROP = 256, 224  # without the key and without weights' transforms


@dataclass
class PreprocessConfig:
    resize: Optional[int] = None  # shorter side; None: from the weights' transforms, else 256
    crop: Optional[int] = None  # center crop; None: from the weights' transforms, else 224
    mean: Optional[List[float]] = None  # None: from the weights, else ImageNet's
    std: Optional[List[float]] = None
    interpolation: Optional[Literal["bilinear", "bicubic", "nearest"]] = None  # None: the weights', else bilinear
    jpeg_draft: bool = True  # JPEGs decoded by libjpeg at 1/2..1/8 scale where that covers resize (faster)
    resize_mode: Optional[Literal["shorter", "squash"]] = None  # None: the weights', else shorter


@dataclass
class ModelConfig:
    arch: str = "resnet50"  # a model name of the family (featurize models --family F lists them)
    family: str = "torchvision"  # torchvision | timm | open_clip | torchvision_video: pipeline/models/families
    weights: str = "DEFAULT"  # the family's weights name or tag | path or URI of a state dict | none
    weights_sha256: Optional[str] = None  # refuse a weights file whose hash differs
    layer: Optional[str] = None  # node or module name; None: penultimate (open_clip: the image embedding)
    pool: Literal["avg", "max", "none"] = "avg"
    seed: int = 0  # for weights: none
    device: Literal["auto", "cpu", "cuda"] = "auto"


DEFAULT_FILE_SIZE = "auto"  # output.file_size, and apply's: see file_bytes and sink.target_bytes
MAX_FILE_BYTES = 1 << 30


@dataclass
class OutputConfig:
    uri: str
    partition_by: List[str] = field(default_factory=lambda: ["split"])
    dtype: Literal["float16", "float32"] = "float16"
    storage_options: Optional[Dict[str, Any]] = None  # None: the source's when on the same store
    frame_features: bool = False  # videos: also write the per-frame features
    file_size: Union[int, str] = DEFAULT_FILE_SIZE  # each committed file holds about this much (row groups inside)


DEFAULT_NUM_FRAMES = 16  # video.num_frames for a per-frame model, and for a clip model without a documented length


@dataclass
class VideoConfig:
    sampling: Literal["uniform", "fps", "every", "all"] = "uniform"
    # for uniform: frames spread over the clip (or window); None: a clip model's clip length, else 16
    num_frames: Optional[int] = None
    fps: Optional[float] = None  # for fps: frames per second of video
    every: Optional[int] = None  # for every: every k-th frame
    window_s: Optional[float] = None  # split long videos into windows of this many seconds ...
    stride_s: Optional[float] = None  # ... starting this far apart (default: window_s)
    max_frames: int = 512  # memory bound: frames decoded per clip or window, at most
    # The windows in frames, as video researchers give them (v-iashin/video_features' stack and step at
    # an extraction fps): clips of stack_frames frames at extraction_fps, one every step_frames frames.
    # parse_job turns them into window_s, stride_s and num_frames; the rest of the path reads those.
    extraction_fps: Optional[float] = None
    stack_frames: Optional[int] = None
    step_frames: Optional[int] = None  # default: stack_frames (clips side by side)
    size: Optional[int] = None  # frames are decoded at this shorter side; None: preprocess.resize
    decode_timeout_s: float = 60.0  # a decode that takes longer becomes an error row


@dataclass
class TemporalConfig:
    kind: Literal["mean", "max", "lstm", "attention"]
    name: str  # the output column is clip_<name>
    checkpoint: Optional[str] = None  # safetensors file, with its JSON config beside it
    allow_random_init: bool = False  # lstm/attention without a checkpoint: tests and demos only
    hidden_size: Optional[int] = None  # random init only; a checkpoint's config wins
    num_layers: int = 1  # random init only
    bidirectional: bool = False  # random init only
    seed: int = 0


@dataclass
class ResourcesConfig:
    batch_size: Union[int, Auto] = "auto"  # model batch
    actors: Union[int, Auto] = "auto"  # model actors; auto: from 1 up to max_actors as the load asks
    max_actors: Optional[int] = None  # for actors: auto; None: the GPUs at the start x actors_per_gpu (or 1
    #                                   CPU actor). Set it when an autoscaler adds GPU nodes during the job.
    actors_per_gpu: int = 1  # model actors sharing one GPU (each claims 1/actors_per_gpu of it)
    decode_batch_size: int = 32
    decode_cpus: float = 0.5  # logical CPUs claimed by each read+decode task
    max_decode_cpus: Optional[float] = None  # cap on the CPUs all decode tasks claim at once; None: no cap
    # auto: images for a CPU model decode in the model actor; else CPU-only nodes when the cluster has both kinds
    decode_on: Literal["auto", "actor", "cpu_nodes", "any"] = "auto"
    task_memory: Union[int, str, None] = None  # memory reserved per read+decode task: bytes or "2GiB"
    actor_memory: Union[int, str, None] = None  # memory reserved per model actor
    torch_threads: Union[int, Auto] = "auto"  # CPU actor (and decode) threads; auto: node cores / actors
    read_block_size: int = 256  # at most this many planned rows (files or shards) per read task


@dataclass
class JobConfig:
    name: str
    source: SourceConfig
    output: OutputConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    temporal: List[TemporalConfig] = field(default_factory=list)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    @property
    def is_video(self) -> bool:
        if self.source.media != "auto":
            return self.source.media == "video"
        return self.source.format == "video_folder" or bool(self.temporal) or self.clips

    @property
    def clips(self) -> bool:
        """The model embeds clips (N, 3, T, H, W): one feature per window, no temporal heads."""
        return is_clip_family(self.model.family)


PARTITION_COLUMNS = ("split", "label")


def absolute_local(uri: str) -> str:
    """`uri` as it is, unless a relative local path: then absolute against this process's folder,
    which is what the user meant; Ray's workers run in another folder, or on another node."""
    return os.path.abspath(uri) if uri and "://" not in uri and not os.path.isabs(uri) else uri


def load_job(path: str, overrides: Optional[List[str]] = None) -> JobConfig:
    return parse_job(read_job_file(path), overrides)


def read_job_file(path: str, what: str = "job file") -> Any:
    """The YAML mapping in `path`; a binary file, TOML or any text that is not a mapping is refused."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path}: not a text file; a {what} is YAML") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from None
    data = load_yaml(text, f"{what} {path}")
    if data is not None and not isinstance(data, dict):
        kind = "TOML, which is not read" if path.lower().endswith(".toml") else f"a YAML {type(data).__name__}"
        sections = "data:, head:, output: ..." if what == "training file" else "source:, model:, output: ..."
        raise ConfigError(f"{what} {path}: expected a YAML mapping ({sections}), found {kind}")
    return data


def parse_job(data: Any, overrides: Optional[List[str]] = None) -> JobConfig:
    job = build_config(JobConfig, data, overrides)
    job = dataclasses.replace(job, video=frame_windows(job.video))
    _check(job)
    return job


FRAME_WINDOW_KEYS = ("extraction_fps", "stack_frames", "step_frames")


def frame_windows(v: VideoConfig) -> VideoConfig:
    """The windows in frames as the windows in seconds: window_s = stack_frames / extraction_fps,
    stride_s = step_frames / extraction_fps, and num_frames = stack_frames, whose uniform sampling
    (the centres of stack_frames equal parts of the window) takes one frame every 1 / extraction_fps
    seconds. Keys of both forms must agree, so a job read back from its record parses the same."""
    given = {k: getattr(v, k) for k in FRAME_WINDOW_KEYS if getattr(v, k) is not None}
    if not given:
        return v
    if v.stack_frames is None:
        keys = " and ".join(f"video.{k}" for k in given)
        raise ConfigError(f"{keys}: {'need' if len(given) > 1 else 'needs'} video.stack_frames (the clip length in "
                          "frames)")
    for key in ("stack_frames", "step_frames"):
        if key in given and not (isinstance(given[key], int) and given[key] >= 1):
            raise ConfigError(f"video.{key}: must be a whole number of frames, at least 1, got {given[key]}")
    if not (v.extraction_fps or 0) > 0:
        raise ConfigError("video.extraction_fps: required (and positive) with video.stack_frames: the rate the "
                          "clip's frames are taken at")
    if v.sampling != "uniform":
        raise ConfigError(f"video.sampling: {v.sampling}, but video.stack_frames takes its frames at "
                          "video.extraction_fps; use sampling: uniform (the default)")
    fps = float(v.extraction_fps)
    derived = {"window_s": v.stack_frames / fps, "stride_s": (v.step_frames or v.stack_frames) / fps,
               "num_frames": v.stack_frames}
    for key, value in derived.items():
        if getattr(v, key) is not None and not math.isclose(getattr(v, key), value, rel_tol=1e-9):
            raise ConfigError(f"video.{key}: {getattr(v, key)}, but video.stack_frames {v.stack_frames} and "
                              f"step_frames {v.step_frames or v.stack_frames} at extraction_fps {fps:g} make it "
                              f"{value:g}; give the windows in frames or in seconds, not both")
    return dataclasses.replace(v, **derived)


def build_config(cls, data: Any, overrides: Optional[List[str]] = None):
    """A config dataclass (a job, a training) from a file's mapping and `--set` overrides; unknown
    keys and wrong types refused, naming the key."""
    data = copy.deepcopy(data) if data is not None else {}
    for item in overrides or []:
        apply_override(data, item)
    return _build(cls, data, "")


def apply_override(data: Dict[str, Any], item: str) -> None:
    """Apply one `a.b=c` override; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.arch=resnet18")
    if not isinstance(data, dict):
        raise ConfigError(f"--set {key}: the job is not a mapping")
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
    node[leaf] = load_yaml(raw, f"--set {key}") if raw else ""


def load_yaml(text: str, what: str) -> Any:
    """Safe YAML of a bounded size (safe_yaml.py); a refusal is a ConfigError naming `what`."""
    try:
        return safe_yaml.load_yaml(text, what)
    except safe_yaml.UnsafeYAML as e:
        raise ConfigError(str(e)) from None


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'job'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where, allowed = ", ".join(_join(path, k) for k in unknown), sorted(names)
        raise ConfigError(f"unknown key {where} (allowed: {', '.join(allowed)}){did_you_mean(unknown, allowed)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = _join(path, f.name)
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {key}")
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name], key)
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        options = [str(o) for o in typing.get_args(tp)]
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(options)}{did_you_mean(str(value), options)}")
    if origin in (list, List):
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_describe(tp)}, got {value!r}")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _check(job: JobConfig) -> None:
    """Checks across keys that types alone cannot express."""
    if not job.name.strip():
        raise ConfigError("name: must not be empty")
    for key in ("source.uri", "output.uri"):
        section, attr = key.split(".")
        if not getattr(getattr(job, section), attr).strip():
            raise ConfigError(f"{key}: must not be empty")
    pre = job.preprocess
    for key in ("resize", "crop"):
        value = getattr(pre, key)
        if value is not None and value < 1:
            raise ConfigError(f"preprocess.{key}: must be a positive integer, got {value}")
    if pre.resize and pre.crop and pre.crop > pre.resize:
        raise ConfigError(f"preprocess.crop: {pre.crop} is larger than preprocess.resize {pre.resize}")
    for key in ("mean", "std"):
        value = getattr(pre, key)
        if value is not None and len(value) != 3:
            raise ConfigError(f"preprocess.{key}: expected 3 values (R, G, B), got {len(value)}")
    file_bytes(job.output.file_size, "output.file_size")
    for col in job.output.partition_by:
        if col not in PARTITION_COLUMNS:
            raise ConfigError(f"output.partition_by: {col!r} is not one of {', '.join(PARTITION_COLUMNS)}")
    res = job.resources
    for key in ("batch_size", "actors", "max_actors", "torch_threads", "decode_batch_size", "read_block_size"):
        value = getattr(res, key)
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"resources.{key}: must be at least 1, got {value}")
    if res.actors_per_gpu < 1:
        raise ConfigError(f"resources.actors_per_gpu: must be at least 1, got {res.actors_per_gpu}")
    if res.decode_cpus <= 0:
        raise ConfigError(f"resources.decode_cpus: must be positive, got {res.decode_cpus}")
    if res.max_decode_cpus is not None and res.max_decode_cpus < res.decode_cpus:
        raise ConfigError(f"resources.max_decode_cpus: {res.max_decode_cpus} leaves no room for one decode "
                          f"task of resources.decode_cpus {res.decode_cpus}")
    if res.decode_on == "actor" and job.is_video:
        raise ConfigError("resources.decode_on: actor is for images; videos decode in their own isolated tasks")
    for key in ("task_memory", "actor_memory"):
        memory_bytes(getattr(res, key), f"resources.{key}")
    _check_source(job.source)
    _check_video(job)
    families = model_families()
    if job.model.family not in families:
        raise ConfigError(f"model.family: {job.model.family!r} is not one of {', '.join(families)}")
    if job.model.weights_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", job.model.weights_sha256):
        raise ConfigError("model.weights_sha256: expected 64 hexadecimal digits")


def is_clip_family(name: str) -> bool:
    """Whether model.family `name` embeds clips: its module's name ends in _video (base.Family.clips)."""
    return name.endswith("_video")


def model_families() -> List[str]:
    """The values model.family takes: the modules in pipeline/models/families (found without importing them)."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "families")
    names = [n[:-3] for n in os.listdir(folder) if n.endswith(".py") and not n.startswith("_")]
    return sorted(names, key=lambda n: (n != "torchvision", n))  # the default first


def _check_source(src: SourceConfig) -> None:
    if src.read_timeout_s <= 0:
        raise ConfigError(f"source.read_timeout_s: must be positive, got {src.read_timeout_s}")
    memory_bytes(src.max_sample_bytes, "source.max_sample_bytes")
    if src.split_files and src.format != "video_folder":  # the other listers never read them
        raise ConfigError(f"source.split_files: only for source.format video_folder (the lists name videos by "
                          f"their path under source.uri), not {src.format}")
    for i, prefix in enumerate(src.allow_uris):
        if not prefix.strip():
            raise ConfigError(f"source.allow_uris[{i}]: must not be empty")


def _check_video(job: JobConfig) -> None:
    v = job.video
    needs = {"fps": v.fps, "every": v.every}
    if v.sampling in needs and not (needs[v.sampling] or 0) > 0:  # a negative fps sampled no frame at all
        raise ConfigError(f"video.{v.sampling}: required (and positive) when video.sampling is {v.sampling}")
    for key in ("num_frames", "max_frames"):
        if getattr(v, key) is not None and getattr(v, key) < 1:
            raise ConfigError(f"video.{key}: must be at least 1, got {getattr(v, key)}")
    for key in ("window_s", "stride_s", "decode_timeout_s"):
        value = getattr(v, key)
        if value is not None and value <= 0:
            raise ConfigError(f"video.{key}: must be positive, got {value}")
    if v.stride_s and not v.window_s:
        raise ConfigError("video.stride_s: needs video.window_s")
    reads_images = job.source.media == "image" or (job.source.media == "auto" and job.source.format == "image_folder")
    images_key = ("source.media: image" if job.source.media == "image" else "source.format: image_folder"
                  ) if reads_images else ""
    if job.temporal and images_key:  # each image would become a one-frame video, silently
        raise ConfigError(f"temporal: heads over frames need videos, but {images_key} reads images (one frame each); "
                          "for a folder of videos use source.format: video_folder, for images remove temporal:")
    names = [t.name for t in job.temporal]
    for i, t in enumerate(job.temporal):
        plain_name(t.name, f"temporal[{i}].name")  # it becomes the column clip_<name>, a part of paths
        if not re.fullmatch(r"[A-Za-z0-9_]+", t.name) or names.count(t.name) > 1:
            raise ConfigError(f"temporal[{i}].name: {t.name!r} must be unique and made of letters, digits, _")
    if job.clips:
        _check_clips(job, images_key)
    elif job.is_video and not job.temporal:
        raise ConfigError("temporal: a video job needs at least one head, e.g. [{kind: mean, name: mean}]")


def _check_clips(job: JobConfig, images_key: str) -> None:
    """A clip model gives each window its feature itself: no heads, no per-frame features, a fixed T."""
    family = f"model.family {job.model.family} embeds each clip whole (one `feature` per window)"
    if job.temporal:
        raise ConfigError(f"temporal: heads pool per-frame features, but {family}; remove temporal:, or use an "
                          "image family (torchvision, timm, open_clip) for per-frame features and heads")
    if job.output.frame_features:
        raise ConfigError(f"output.frame_features: {family}, so there are no per-frame features to write")
    if job.video.sampling != "uniform":
        raise ConfigError(f"video.sampling: {family} from video.num_frames frames; use sampling: uniform")
    if images_key:
        raise ConfigError(f"{images_key} reads images, but {family} of a video; for a folder of videos use "
                          "source.format: video_folder")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_bytes(value: Union[int, str, None], key: str) -> Optional[int]:
    """Bytes from 2147483648, "2GiB" or "512 MB"; None stays None."""
    if value is None:
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"{key}: {value!r} is not a size (bytes, or a number with KB, MB, GB, KiB, MiB, GiB ...)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def file_bytes(value: Union[int, str], key: str) -> Optional[int]:
    """A committed file's target size in bytes, from 67108864 or "64MiB" (None for "auto", sized
    by the job's output: output/sink.py target_bytes): a write task gathers
    blocks until they hold this much, then writes them as one file per partition. Larger files
    read faster (fewer opens and footers; object stores charge per request) but a killed run
    redoes the files it had in flight, and the write task holds its file in memory (on an object
    store its bytes also travel to the committer): at most MAX_FILE_BYTES."""
    if value == "auto":
        return None
    size = memory_bytes(value, key) or 0
    if not 1 <= size <= MAX_FILE_BYTES:
        raise ConfigError(f"{key}: {value!r} is not between 1 byte and 1GiB (a write task holds its file in memory)")
    return size


def output_storage_options(job: JobConfig) -> Dict[str, Any]:
    """The output's fsspec options: its own, or the source's when both are on one store."""
    if job.output.storage_options is not None:
        return job.output.storage_options
    same_store = _protocol(job.output.uri) == _protocol(job.source.uri)
    return job.source.storage_options if same_store else {}


def source_store_options(job: JobConfig, uri: str) -> Dict[str, Any]:
    """Options for a URI other than the source's (weights): the source's when on the same store,
    else none (an S3 key must never go to an HTTP server, whose client refuses unknown options)."""
    return job.source.storage_options if _protocol(uri) == _protocol(job.source.uri) else {}


def _protocol(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def same_store(uri: str, other: str) -> bool:
    """Whether two URIs are on one kind of store, so one set of storage options serves both."""
    return _protocol(uri) == _protocol(other)


def to_dict(job: JobConfig) -> Dict[str, Any]:
    return redact(dataclasses.asdict(job))
