"""A search query embedded in a table's own feature space: an image or video file through the model
(and temporal head) that made the table, or a text through the CLIP text tower of an open_clip table.

Everything comes from the output contract: the job in OUT/_job.json and the Parquet `featurize.*`
provenance. The extraction's own code runs here, in this process and without Ray: prepare() resolves
the job again, decode_image / decode_video with its specs, the Embedder, the temporal head. What
prepare() resolves now must equal the provenance (the weights' sha256 above all): a weights file
changed since extraction would give vectors from another model, so the query is refused instead.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ..config import JobConfig, memory_bytes, parse_job, source_store_options
from ..errors import ConfigError, QueryError
from ..output.store import filesystem
from ..output.table import FeatureTable, open_table
from ..redact import redact_text
from .batches import choose_column

Options = Optional[Dict[str, Any]]
# Provenance keys prepare() must give again for a query to land in the table's space.
SAME = ("featurize.model_family", "featurize.model", "featurize.layer", "featurize.pool", "featurize.preprocess",
        "featurize.dim", "featurize.video_sampling", "featurize.temporal")


def query_vector(uri: str, storage_options: Options = None, column: Optional[str] = None,
                 image: Optional[str] = None, video: Optional[str] = None,
                 text: Optional[str] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """(float32 (D,) vector in `column`'s space, {"kind", "value", "uri"}) for one image file, video
    file (path or URI; `storage_options` serve a file on an object store) or text. column None:
    `feature` if the table has it, else its first vector column (a video table's first clip_<head>)."""
    kind, value = _one_query(image, video, text)
    table = open_table(uri, storage_options, key="search")
    meta = table.metadata()
    _refuse_applied(table, meta, kind)
    column, _ = choose_column(table, column)
    job = _job(table, meta, storage_options)
    if kind == "text":
        vector = _text_vector(table, job, meta, column, value)
    else:
        media = "video" if job.is_video else "image"
        if kind != media:
            raise QueryError(f"--{kind}: {redact_text(table.uri)} is {'a video' if job.is_video else 'an image'} "
                             f"table; query it with --{media} or --id")
        vector = _media_vector(table, job, meta, column, kind, read_query_file(value, storage_options, kind, job))
    shown = redact_text(value)
    return vector.astype(np.float32), {"kind": kind, "value": shown, "uri": None if kind == "text" else shown}


def _one_query(image: Optional[str], video: Optional[str], text: Optional[str]) -> Tuple[str, str]:
    given = [(k, v) for k, v in (("image", image), ("video", video), ("text", text)) if v is not None]
    if len(given) != 1:
        raise QueryError("search: give one query: an image file, a video file or a text")
    kind, value = given[0]
    if not str(value).strip():
        raise QueryError(f"--{kind}: empty")
    return kind, str(value)


def _refuse_applied(table: FeatureTable, meta: Dict[str, str], kind: str) -> None:
    """A table `featurize apply` made holds a head's outputs: its source model and head are not chained here."""
    if table.record.get("kind") != "apply" and meta.get("featurize.kind") != "apply":
        return
    source = (table.record.get("input") or {}).get("uri") or json.loads(meta.get("featurize.source", "{}")).get("uri")
    raise QueryError(f"--{kind}: {redact_text(table.uri)} was made by featurize apply (a head's outputs, not a "
                     f"model's features); search it by --id, or query its source table {source or '(unknown)'}")


def _job(table: FeatureTable, meta: Dict[str, str], storage_options: Options) -> JobConfig:
    """The extraction job, its secrets (redacted in _job.json) replaced by the options given now."""
    where = redact_text(table.uri)
    if not isinstance(table.record.get("config"), dict) or "featurize.model" not in meta:
        raise QueryError(f"search: {where} has no _job.json job or no model provenance, so the model that made "
                         "it is unknown; search it by --id")
    try:
        job = parse_job(table.record["config"])
    except ConfigError as e:
        raise QueryError(f"search: {where}/_job.json: the job cannot be read back ({e})") from None
    # Weights and head checkpoints on the table's store get the options given, as the table does.
    source = dataclasses.replace(job.source, uri=table.uri, storage_options=dict(storage_options or {}))
    return dataclasses.replace(job, source=source, model=dataclasses.replace(job.model, device=_device(job, table)))


def _device(job: JobConfig, table: FeatureTable) -> str:
    """The kind of device extraction ran on (a GPU computes in bfloat16), when this machine has one; else CPU."""
    on_gpu = job.model.device == "cuda" or (job.model.device == "auto" and
                                            (table.record.get("layout") or {}).get("gpus_per_actor", 0) > 0)
    return "cuda" if on_gpu and torch.cuda.is_available() else "cpu"


def read_query_file(path: str, storage_options: Options, kind: str, job: JobConfig) -> bytes:
    """The file's bytes, at most the job's source.max_sample_bytes; a local path takes no options."""
    local = "://" not in path or path.startswith("file://")
    limit = memory_bytes(job.source.max_sample_bytes, "source.max_sample_bytes")
    try:
        fs, where = filesystem(path, {} if local else dict(storage_options or {}))
        with fs.open(where, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise QueryError(f"--{kind}: {path} not found") from None
    except Exception as e:  # denied, no endpoint, a folder
        raise QueryError(f"--{kind}: cannot read {path} ({_first_line(e)})") from None
    if len(data) > limit:
        raise QueryError(f"--{kind}: {path} is larger than the table's source.max_sample_bytes ({limit} bytes)")
    return data


def _first_line(e: BaseException) -> str:
    from ..models.base import first_line

    return first_line(e)


def check_provenance(now: Dict[str, str], meta: Dict[str, str], where: str) -> None:
    """Refuse when what resolves now is not what made the table: other weights, preprocessing, heads."""
    old_id, new_id = meta.get("featurize.weights_id", ""), now.get("featurize.weights_id", "")
    old_sha, new_sha = meta.get("featurize.weights_sha256", ""), now.get("featurize.weights_sha256", "")
    if (old_id, old_sha) != (new_id, new_sha):
        raise QueryError(f"search: the weights changed since {where} was extracted ({old_id} sha256 "
                         f"{old_sha[:12] or '-'} then, {new_id} sha256 {new_sha[:12] or '-'} now); a query would "
                         "come from another model: restore those weights or extract the table again")
    for key in SAME:
        if key in meta and key in now and _value(meta[key]) != _value(now[key]):
            raise QueryError(f"search: {key} of {where} was {meta[key]}, the job resolves to {now[key]} now; "
                             "a query would land in another space: extract the table again")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _media_vector(table: FeatureTable, job: JobConfig, meta: Dict[str, str], column: str, kind: str,
                  data: bytes) -> np.ndarray:
    from ..extract.decode import decode_image
    from ..extract.prepare import prepare
    from ..models.actor import Embedder, EmbedSpec

    prepared = prepare(job)
    check_provenance(prepared.provenance(), meta, redact_text(table.uri))
    threads = torch.get_num_threads()  # the Embedder sets torch's threads: keep this process's
    embedder = Embedder(EmbedSpec(model=job.model, weights=prepared.weights, crop=prepared.image.crop,
                                  dim=prepared.dim, mean=prepared.mean, std=prepared.std, dtype=job.output.dtype,
                                  torch_threads=threads, storage_options=prepared.model_options))
    if kind == "image":
        pixels = _decoded(lambda: decode_image(data, prepared.image)[0], kind)
        return embedder.embed(pixels[None].copy())[0]  # a writable batch of one, as decode_rows gives
    return _clip_vector(prepared, embedder, column, data, threads)


def _clip_vector(prepared, embedder, column: str, data: bytes, threads: int) -> np.ndarray:
    """The first window's frames, embedded, then the column's temporal head, as extraction runs them."""
    from ..extract.video import decode_video
    from ..models.temporal import TemporalEmbedder

    heads = [h for h in prepared.heads if h.column == column]
    if not heads:
        raise QueryError(f"--column: {column} is no temporal head's column of this table "
                         f"({', '.join(h.column for h in prepared.heads)})")
    clips = _decoded(lambda: decode_video(data, prepared.frames, prepared.job.video), "video")
    frames = embedder.embed(clips[0].pixels)
    temporal = TemporalEmbedder(heads, storage_options=prepared.job.source.storage_options,
                                dtype=prepared.job.output.dtype, torch_threads=threads)
    return temporal.clip_features(frames[None], np.array([len(frames)]))[column][0]


def _decoded(decode, kind: str):
    try:
        return decode()
    except Exception as e:  # not an image (or video) the table's decoder reads
        raise QueryError(f"--{kind}: not a{'n' if kind == 'image' else ''} {kind} this table's decoder can read "
                         f"({_first_line(e)})") from None


def _text_vector(table: FeatureTable, job: JobConfig, meta: Dict[str, str], column: str, text: str) -> np.ndarray:
    """open_clip's text tower, from the table's model config and weights; only for the image embedding."""
    from ..models.base import resolve

    where, model = redact_text(table.uri), job.model
    if model.family != "open_clip":
        raise QueryError(f"--text: {where} was made by {model.family} {model.arch}, which has no text tower; "
                         "text search needs an open_clip table")
    layer = meta.get("featurize.layer")
    if layer != "embedding":
        raise QueryError(f"--text: {where} holds layer {layer!r} of {model.arch}, not its image embedding; "
                         "text search needs model.layer null (the embedding)")
    if job.is_video and _head_kind(meta, column) not in ("mean", "max", "attention"):
        raise QueryError(f"--text: {column} of {where} comes from a {_head_kind(meta, column)} head, which leaves "
                         "CLIP's embedding space; use a mean, max or attention head's column")
    from ..models.families.open_clip import text_encoder, tokenize

    options = source_store_options(job, model.weights)
    weights = resolve(model, options)
    check_provenance({"featurize.weights_id": redact_text(weights.id), "featurize.weights_sha256": weights.sha256},
                     meta, where)
    encoder = text_encoder(model, weights, options)
    with torch.inference_mode():
        vector = encoder(tokenize(model.arch, [text]))[0].float().numpy()
    dim = table.shape(column)[1]
    if len(vector) != dim:
        raise QueryError(f"--text: {model.arch}'s text embedding has {len(vector)} values, {column} has {dim}")
    return vector


def _head_kind(meta: Dict[str, str], column: str) -> str:
    heads = json.loads(meta.get("featurize.temporal", "[]"))
    return next((h.get("kind", "") for h in heads if f"clip_{h.get('name')}" == column), "unknown")
