"""Search queries embedded in a table's own space (pipeline/index/query.py): an image file that is in a
table lands on its own row, a video file on its first window's row (both tables made by extraction's
stage functions in this process, with the provenance a run writes: no Ray); a text query on an
open_clip table equals open_clip's encode_text; everything else is refused on one line, with no secret
in it.

The open_clip weights are a random-init model saved to a file here; nothing is downloaded.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import open_clip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import TemporalConfig, parse_job, to_dict
from pipeline.errors import Refused
from pipeline.extract.decode import decode_image
from pipeline.extract.prepare import prepare
from pipeline.extract.video import decode_video_batch
from pipeline.index.query import query_vector
from pipeline.models.actor import Embedder, EmbedSpec
from pipeline.models.base import resolve
from pipeline.models.temporal import TemporalEmbedder, resolve_heads
from pipeline.samples import encode, encode_video, photo

from conftest import S3_BUCKET, job_dict, read_features
from tables import write_table

CLIP = "ViT-S-32-alt"  # the smallest plain open_clip model: 256-d embedding, a 10-layer 256-wide text tower


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def rows(out) -> dict:
    return {r["sample_id"]: r for r in read_features(str(out)).to_pylist()}


@pytest.fixture(scope="module")
def image_table(tmp_path_factory):
    """4 JPEGs of several shapes in two label folders and their table (resnet18, 56 px), its rows made
    as a run's model actor makes them (decode_image, the Embedder; float16 as the sink stores them)."""
    base = tmp_path_factory.mktemp("query-images")
    ids, pixels = [], []
    job = job_dict(str(base / "src"), str(base / "out"), name="query-images")
    job["model"]["device"] = "cpu"
    prepared = prepare(parse_job(job))
    for i, (w, h) in enumerate([(120, 90), (80, 110), (96, 96), (150, 70)]):
        ids.append(f"{'cat' if i % 2 else 'dog'}/img{i}.jpg")
        (base / "src" / ids[-1]).parent.mkdir(parents=True, exist_ok=True)
        (base / "src" / ids[-1]).write_bytes(encode(photo(w, h, seed=i), quality=90))
        pixels.append(decode_image((base / "src" / ids[-1]).read_bytes(), prepared.image)[0])
    embed = Embedder(EmbedSpec(model=prepared.job.model, weights=prepared.weights, crop=prepared.image.crop,
                               dim=prepared.dim, mean=prepared.mean, std=prepared.std,
                               torch_threads=torch.get_num_threads()))
    write_out(base / "out", prepared, ids, {"feature": embed.embed(np.stack(pixels))})
    return base


def test_an_image_in_the_table_lands_on_its_own_row(image_table):
    stored = rows(image_table / "out")
    for sample_id in ("cat/img1.jpg", "dog/img2.jpg"):
        path = str(image_table / "src" / sample_id)
        vector, query = query_vector(str(image_table / "out"), image=path)
        assert vector.dtype == np.float32 and vector.shape == (512,)
        assert query == {"kind": "image", "value": path, "uri": path}
        scores = {s: cosine(vector, np.array(r["feature"], np.float32)) for s, r in stored.items()}
        assert scores[sample_id] >= 0.999
        assert max(scores, key=scores.get) == sample_id


def test_image_and_video_tables_refuse_the_other_kind_wrong_columns_and_unreadable_files(
        image_table, video_table, tmp_path):
    video_table = video_table[0]
    images, videos = str(image_table / "out"), str(video_table / "out")
    cases = [
        (dict(uri=images, video=str(video_table / "v1.avi")), r"is an image table; query it with --image"),
        (dict(uri=videos, image=str(image_table / "src/cat/img1.jpg")), r"is a video table; query it with --video"),
        (dict(uri=images, column="nope", image="x.jpg"), r"--column: .* has no feature column 'nope' "
                                                         r"\(feature columns: feature \(vector\)\)"),
        (dict(uri=videos, column="nope", video="x.avi"),
         r"feature columns: clip_mean \(vector\), clip_lstm \(vector\)(, frame_features \(sequence\))?\)"),
        (dict(uri=images, image=str(tmp_path / "missing.jpg")), r"--image: .*missing.jpg not found"),
        (dict(uri=images, text="a red car"), r"--text: .* was made by torchvision resnet18, which has no text tower"),
        (dict(uri=images), r"give one query"),
        (dict(uri=images, image="a.jpg", text="b"), r"give one query"),
    ]
    (tmp_path / "notes.jpg").write_text("not an image")
    cases.append((dict(uri=images, image=str(tmp_path / "notes.jpg")), r"--image: not an image this table's decoder"))
    cases.append((dict(uri=videos, video=str(tmp_path / "notes.jpg")), r"--video: not a video this table's decoder"))
    for kwargs, message in cases:
        with pytest.raises(Refused, match=message) as info:
            query_vector(**kwargs)
        assert "\n" not in str(info.value)


def test_a_secret_in_the_query_uri_never_shows(image_table):
    url = "https://user:hunter2-secret@127.0.0.1:9/cat.jpg?X-Amz-Signature=sig-secret"
    with pytest.raises(Refused, match=r"--image: .*https://user:\*\*\*@127.0.0.1:9/cat.jpg") as info:
        query_vector(str(image_table / "out"), image=url)
    assert "hunter2" not in str(info.value) and "sig-secret" not in str(info.value)


def test_a_table_and_a_query_file_on_an_object_store_take_the_options_given(image_table, s3):
    fs, options = s3
    fs.put(str(image_table / "out"), f"{S3_BUCKET}/out", recursive=True)
    fs.put(str(image_table / "src" / "cat" / "img1.jpg"), f"{S3_BUCKET}/queries/img1.jpg")
    local = str(image_table / "src" / "cat" / "img1.jpg")
    stored = np.array(rows(image_table / "out")["cat/img1.jpg"]["feature"], np.float32)
    for path in (local, f"s3://{S3_BUCKET}/queries/img1.jpg"):  # a local path takes no options
        vector, _ = query_vector(f"s3://{S3_BUCKET}/out", storage_options=options, image=path)
        assert cosine(vector, stored) >= 0.999
    with pytest.raises(Refused, match=r"--image: .*nothing.jpg not found"):
        query_vector(f"s3://{S3_BUCKET}/out", storage_options=options, image=f"s3://{S3_BUCKET}/nothing.jpg")


# --- tables written directly (no Ray), their provenance from prepare() as extraction writes it -------------

def with_weights(prepared, weights: str):
    """`prepared` for the same model with other weights of the same shape, as prepare() would give it."""
    job = dataclasses.replace(prepared.job, model=dataclasses.replace(prepared.job.model, weights=weights))
    return dataclasses.replace(prepared, job=job, weights=resolve(job.model))


def write_out(out, prepared, ids: list, columns: dict, meta: dict | None = None) -> str:
    """OUT/features/split=all/part-0.parquet with `columns` (float16, as the sink writes them) and the
    prepared job's provenance; OUT/_job.json with its config."""
    table = pa.table({"sample_id": ids, "uri": [f"/{i}" for i in ids], "label": ["x"] * len(ids),
                      "split": ["all"] * len(ids),
                      **{name: pa.FixedSizeListArray.from_arrays(pa.array(v.astype(np.float16).ravel()), v.shape[1])
                         for name, v in columns.items()}})
    (out / "features" / "split=all").mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({**prepared.provenance(), **(meta or {})}),
                   out / "features" / "split=all" / "part-0.parquet")
    record = {"name": prepared.job.name, "status": "complete", "config": to_dict(prepared.job)}
    (out / "_job.json").write_text(json.dumps(record))
    return str(out)


@pytest.fixture(scope="module")
def video_table(tmp_path_factory):
    """One 1.6 s video cut into 0.8 s windows, through extraction's own stage functions in this process
    (decode_video_batch, the Embedder, the TemporalEmbedder with a mean and an LSTM head): OUT's rows
    are what a run writes. Returns (folder with v1.avi and OUT, {sample_id: {column: vector}})."""
    base = tmp_path_factory.mktemp("query-video")
    data = encode_video(40, width=160, height=120)
    (base / "v1.avi").write_bytes(data)
    job = job_dict(str(base / "src"), str(base / "out"), name="query-video", source={"format": "video_folder"})
    job["model"]["device"] = "cpu"
    job["video"] = {"num_frames": 4, "window_s": 0.8}
    job["temporal"] = [{"kind": "mean", "name": "mean"},
                       {"kind": "lstm", "name": "lstm", "allow_random_init": True, "hidden_size": 8, "seed": 3}]
    prepared = prepare(parse_job(job))
    batch = {"sample_id": ["run/v1.avi"], "uri": ["/run/v1.avi"], "label": ["run"], "split": ["all"], "data": [data],
             "error_stage": [""], "error_type": [""], "error_message": [""]}
    (batch,) = decode_video_batch({k: np.array(v, dtype=object) for k, v in batch.items()}, prepared.frames,
                                  prepared.job.video, windowed=True)
    threads = torch.get_num_threads()
    batch = Embedder(EmbedSpec(model=prepared.job.model, weights=prepared.weights, crop=prepared.image.crop,
                               dim=prepared.dim, mean=prepared.mean, std=prepared.std, torch_threads=threads))(batch)
    batch = TemporalEmbedder(prepared.heads, torch_threads=threads)(batch)
    ids = list(batch["sample_id"])
    assert ids == ["run/v1.avi#w0", "run/v1.avi#w1"] and not any(batch["error_stage"])
    columns = {c: batch[c] for c in ("clip_mean", "clip_lstm")}
    write_out(base / "out", prepared, ids, columns)
    return base, {s: {c: v[i].astype(np.float32) for c, v in columns.items()} for i, s in enumerate(ids)}


def test_a_video_query_runs_the_columns_head_on_the_first_window(video_table):
    base, stored = video_table
    path = f"file://{base}/v1.avi"  # a URI works as a path does
    for column in ("clip_lstm", "clip_mean"):
        vector, query = query_vector(str(base / "out"), column=column, video=path)
        assert query["kind"] == "video" and vector.shape == (8 if column == "clip_lstm" else 512,)
        first, second = stored["run/v1.avi#w0"][column], stored["run/v1.avi#w1"][column]
        assert cosine(vector, first) >= 0.999
        assert cosine(vector, first) > cosine(vector, second)
    default, _ = query_vector(str(base / "out"), video=path)  # no feature column: the first clip column
    assert default.shape == (512,)


@pytest.fixture(scope="module")
def clip_prepared(tmp_path_factory):
    """The open_clip job prepared once (random init); tables with other weights reuse it (with_weights)."""
    root = tmp_path_factory.mktemp("clip-job")
    data = job_dict(str(root / "src"), str(root / "out"), name="clip")
    data["model"] = {"family": "open_clip", "arch": CLIP, "weights": "none", "device": "cpu"}
    data["preprocess"] = {}
    return prepare(parse_job(data))


def clip_video(prepared):
    """`prepared` as a video job with a mean and an LSTM head, as prepare() would give it."""
    temporal = [TemporalConfig(kind="mean", name="mean"),
                TemporalConfig(kind="lstm", name="lstm", allow_random_init=True, hidden_size=8)]
    job = dataclasses.replace(prepared.job, source=dataclasses.replace(prepared.job.source, format="video_folder"),
                              temporal=temporal)
    return dataclasses.replace(prepared, job=job, heads=resolve_heads(temporal, prepared.dim))


def clip_table(out, prepared, meta: dict | None = None) -> str:
    vectors = np.random.default_rng(0).standard_normal((3, prepared.dim))
    return write_out(out, prepared, ["a", "b", "c"], {"feature": vectors}, meta)


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory):
    torch.manual_seed(5)
    model = open_clip.create_model(CLIP, pretrained=None).eval()
    path = tmp_path_factory.mktemp("clip") / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, str(path)


def test_text_on_an_open_clip_table_equals_encode_text_and_changed_weights_are_refused(
        clip_prepared, clip_weights, tmp_path):
    model, path = clip_weights
    out = clip_table(tmp_path / "out", with_weights(clip_prepared, path))
    vector, query = query_vector(out, text="a red car")
    assert query == {"kind": "text", "value": "a red car", "uri": None}
    assert vector.dtype == np.float32 and vector.shape == (256,)
    assert abs(np.linalg.norm(vector) - 1.0) < 1e-5
    with torch.no_grad():
        own = model.encode_text(open_clip.get_tokenizer(CLIP)(["a red car"]), normalize=True)[0].numpy()
    np.testing.assert_allclose(vector, own, atol=1e-5)
    # A video table of the same model: a mean head's column stays in CLIP's space, an LSTM's leaves it.
    videos = clip_video(with_weights(clip_prepared, path))
    out_video = write_out(tmp_path / "video", videos, ["v#w0"], {c: np.ones((1, d)) for c, d in
                                                                 (("clip_mean", 256), ("clip_lstm", 8))})
    np.testing.assert_allclose(query_vector(out_video, column="clip_mean", text="a red car")[0], own, atol=1e-5)
    with pytest.raises(Refused, match=r"--text: clip_lstm of .* comes from a lstm head, which leaves CLIP's"):
        query_vector(out_video, column="clip_lstm", text="a red car")
    # The weights file changes after extraction: both kinds of query refuse rather than use other weights.
    state = {k: v.contiguous() + 0.01 for k, v in model.state_dict().items()}
    save_file(state, path)
    for kwargs in (dict(text="a red car"), dict(image=str(tmp_path / "x.jpg"))):
        (tmp_path / "x.jpg").write_bytes(encode(photo(64, 48, seed=1)))
        with pytest.raises(Refused, match=r"the weights changed since .* was extracted .*sha256"):
            query_vector(out, **kwargs)


def test_text_refuses_another_layer_image_tower_weights_and_random_init(clip_prepared, clip_weights, tmp_path):
    model, _ = clip_weights
    out = clip_table(tmp_path / "layer", clip_prepared, meta={"featurize.layer": "transformer.resblocks.3"})
    with pytest.raises(Refused, match=r"--text: .* holds layer 'transformer.resblocks.3' of ViT-S-32-alt, not its "):
        query_vector(out, text="a dog")
    out = clip_table(tmp_path / "none", clip_prepared)
    with pytest.raises(Refused, match=r"model.weights: none \(random init\) of ViT-S-32-alt has no text tower"):
        query_vector(out, text="a dog")
    tower = str(tmp_path / "visual.safetensors")
    save_file({k: v.contiguous() for k, v in model.visual.state_dict().items()}, tower)
    out = clip_table(tmp_path / "tower", with_weights(clip_prepared, tower))
    with pytest.raises(Refused, match=r"holds an image tower only; text search needs the whole CLIP model"):
        query_vector(out, text="a dog")


def test_a_table_whose_provenance_the_job_no_longer_resolves_to_is_refused(tmp_path):
    """As when a library's preprocessing defaults changed since extraction: queries would land elsewhere."""
    data = job_dict(str(tmp_path / "src"), str(tmp_path / "out"), name="old")
    data["model"]["device"] = "cpu"
    prepared = prepare(parse_job(data))
    old = json.dumps({**json.loads(prepared.provenance()["featurize.preprocess"]), "crop": 48})
    out = write_out(tmp_path / "out", prepared, ["a"], {"feature": np.ones((1, prepared.dim))},
                    meta={"featurize.preprocess": old})
    (tmp_path / "x.jpg").write_bytes(encode(photo(64, 48, seed=1)))
    with pytest.raises(Refused, match=r"featurize.preprocess of .* was \{.*\"crop\": 48.*, the job resolves to "
                                      r"\{.*\"crop\": 56.*extract the table again"):
        query_vector(out, image=str(tmp_path / "x.jpg"))


def test_tables_without_a_job_or_made_by_apply_refuse(tmp_path):
    bare = write_table(str(tmp_path / "bare"), ["all"] * 2, ["x", "y"], np.ones((2, 4), np.float32))
    with pytest.raises(Refused, match=r"has no _job.json job or no model provenance.*search it by --id"):
        query_vector(bare, image="x.jpg")
    applied = write_table(str(tmp_path / "applied"), ["all"] * 2, ["x", "y"], np.ones((2, 4), np.float32))
    (tmp_path / "applied" / "_job.json").write_text(json.dumps({"name": "a", "kind": "apply",
                                                               "input": {"uri": "/tables/source"}}))
    for kwargs in (dict(image="x.jpg"), dict(video="x.avi"), dict(text="a cat")):
        with pytest.raises(Refused, match=r"was made by featurize apply .* search it by --id, or query its source "
                                          r"table /tables/source"):
            query_vector(applied, **kwargs)
