"""pipeline.train.loader: FeatureDataset and ray_dataset over tiny hand-built features tables."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torch.utils.data import DataLoader

from pipeline.errors import TableError
from pipeline.train.loader import FeatureDataset, ray_dataset

from conftest import S3_BUCKET

D = 4
SPLITS = {"train": ["cat", "dog"], "val": ["cat", "dog"]}
PER_FILE, FILES, GROUP = 7, 2, 3  # 7 rows a file in row groups of 3, 3 and 1


def _vectors(values: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(np.float16).ravel()), D)


def _rows(numbers, split: str, label: str) -> pa.Table:
    """Row n: feature [n, 0.25, -0.5, 1/3]; frame_features 1 + n % 3 frames, frame t = [n, t, 0, 0]."""
    n = np.asarray(numbers, dtype=np.float32)
    feature = np.stack([n, np.full_like(n, 0.25), np.full_like(n, -0.5), np.full_like(n, 1 / 3)], axis=1)
    lengths = 1 + np.asarray(numbers) % 3
    frames = np.concatenate([[[i, t, 0, 0] for t in range(k)] for i, k in zip(numbers, lengths)])
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table({
        "sample_id": [f"{split}/{label}/{i:04d}.jpg" for i in numbers],
        "uri": [f"file:///src/{split}/{label}/{i:04d}.jpg" for i in numbers],
        "label": [label] * len(n), "split": [split] * len(n),
        "feature": _vectors(feature),
        "frame_features": pa.ListArray.from_arrays(offsets, _vectors(np.asarray(frames, np.float32))),
    })


def write_table(out: str, fs=None) -> int:
    """A run's layout: OUT/features/split_dir=<s>/label_dir=<l>/part-<k>.parquet; returns the rows."""
    n = 0
    for split, labels in SPLITS.items():
        for label in labels:
            for k in range(FILES):
                path = f"{out}/features/split_dir={split}/label_dir={label}/part-{k}.parquet"
                table = _rows(range(n, n + PER_FILE), split, label)
                n += PER_FILE
                if fs is None:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    pq.write_table(table, path, row_group_size=GROUP, compression="zstd")
                else:
                    with fs.open(path, "wb") as f:
                        pq.write_table(table, f, row_group_size=GROUP, compression="zstd")
    return n


@pytest.fixture
def out(tmp_path) -> str:
    write_table(str(tmp_path))
    return str(tmp_path)


def _number(sample_id: str) -> int:
    return int(sample_id.rsplit("/", 1)[1].split(".")[0])


def _read(ds, workers: int = 0):
    return list(DataLoader(ds, batch_size=None, num_workers=workers))


def _ids(batches):
    return [i for b in batches for i in b["sample_id"]]


def test_each_row_once_across_workers_and_ranks(out):
    seen = []
    for rank in range(2):
        ds = FeatureDataset(out, "feature", batch_size=4, rank=rank, world_size=2, ids=True)
        batches = _read(ds, workers=2)
        for b in batches:
            assert b["x"].shape[1:] == (D,) and len(b["x"]) == len(b["y"]) == len(b["sample_id"]) <= 4
            assert [int(v) for v in b["x"][:, 0]] == [_number(i) for i in b["sample_id"]]  # x is that row's
        seen += _ids(batches)
    total = len(SPLITS) * 2 * FILES * PER_FILE
    assert sorted(_number(i) for i in seen) == list(range(total))


def test_rank_defaults_from_the_environment(out, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ds = FeatureDataset(out, "feature")
    assert (ds.rank, ds.world_size) == (1, 3)
    with pytest.raises(TableError, match="rank"):
        FeatureDataset(out, "feature", rank=3, world_size=3)


def test_batches_span_reads_and_drop_last(out):
    total = len(SPLITS) * 2 * FILES * PER_FILE  # 56 rows in row groups of 3, 3 and 1
    sizes = [len(b["y"]) for b in _read(FeatureDataset(out, "feature", batch_size=5))]
    assert sizes == [5] * (total // 5) + [total % 5]
    sizes = [len(b["y"]) for b in _read(FeatureDataset(out, "feature", batch_size=5, drop_last=True))]
    assert sizes == [5] * (total // 5)


def test_split_and_label_filters(out):
    ds = FeatureDataset(out, "feature", split="val", ids=True)
    assert ds.classes == ["cat", "dog"]  # the whole table's labels, whatever the split
    batches = _read(ds)
    ids = _ids(batches)
    assert len(ids) == 2 * FILES * PER_FILE and all(i.startswith("val/") for i in ids)
    y = np.concatenate([b["y"].numpy() for b in batches])
    assert list(y) == [ds.classes.index(i.split("/")[1]) for i in ids]

    ds = FeatureDataset(out, "feature", split="val", labels=["dog"], ids=True)
    assert ds.classes == ["dog"]
    assert {p.split("/features/")[1].rsplit("/", 1)[0] for p, _ in ds.pieces} == {"split_dir=val/label_dir=dog"}
    batches = _read(ds)
    assert {i.rsplit("/", 1)[0] for i in _ids(batches)} == {"val/dog"}
    assert len(_ids(batches)) == FILES * PER_FILE and all((b["y"] == 0).all() for b in batches)

    batches = _read(FeatureDataset(out, "feature", label=None, split="train"))
    assert "y" not in batches[0] and sum(len(b["x"]) for b in batches) == 2 * FILES * PER_FILE
    with pytest.raises(TableError, match="split: 'test'"):
        FeatureDataset(out, "feature", split="test")
    with pytest.raises(TableError, match="'cat'.*not among the classes"):
        _read(FeatureDataset(out, "feature", classes=["dog"]))


def test_shuffle_changes_the_order_not_the_set(out):
    ds = FeatureDataset(out, "feature", batch_size=8, shuffle=True, shuffle_buffer=10, seed=1, ids=True)
    first = _ids(_read(ds))
    again = _ids(_read(ds))
    ds.set_epoch(1)
    second = _ids(_read(ds))
    plain = _ids(_read(FeatureDataset(out, "feature", batch_size=8, ids=True)))
    assert first == again  # the same epoch, the same order
    assert first != second and first != plain
    assert sorted(first) == sorted(second) == sorted(plain)
    assert plain == sorted(plain)  # unshuffled: the files' order


def test_float16_stored_float32_out(out):
    b = _read(FeatureDataset(out, "feature", batch_size=100))[0]
    assert b["x"].dtype.__str__() == "torch.float32" and b["y"].dtype.__str__() == "torch.int64"
    expected = np.array([0.25, -0.5, 1 / 3], dtype=np.float16).astype(np.float32)
    assert (b["x"][:, 1:].numpy() == expected).all()
    assert (b["x"][:, 0].numpy() == np.arange(len(b["x"]))).all()


def test_sequences_padded_with_lengths(out):
    ds = FeatureDataset(out, "frame_features", batch_size=6, ids=True)
    assert ds.frames == 3  # the longest clip (no _job.json saying uniform sampling)
    for b in _read(ds):
        numbers = np.array([_number(i) for i in b["sample_id"]])
        assert b["x"].shape == (len(numbers), 3, D)
        assert (b["lengths"].numpy() == 1 + numbers % 3).all()
        for row, n, k in zip(b["x"].numpy(), numbers, b["lengths"].numpy()):
            assert (row[:k, 0] == n).all() and (row[:k, 1] == np.arange(k)).all()
            assert (row[k:] == 0).all()  # padding
    cut = _read(FeatureDataset(out, "frame_features", batch_size=6, frames=2))[0]
    assert cut["x"].shape == (6, 2, D) and cut["lengths"].max() == 2


def test_missing_or_wrong_column_refused(out):
    with pytest.raises(TableError, match="column: .* no column 'clip_lstm'"):
        FeatureDataset(out, "clip_lstm")
    with pytest.raises(TableError, match="column 'uri' has type string"):
        FeatureDataset(out, "uri")
    with pytest.raises(TableError, match="no column 'class'"):
        FeatureDataset(out, "feature", label="class")


def test_object_store(s3):
    fs, options = s3
    total = write_table(f"{S3_BUCKET}/out", fs)
    ds = FeatureDataset(f"s3://{S3_BUCKET}/out", "feature", split="train", storage_options=options,
                        batch_size=4, ids=True)
    ids = _ids(_read(ds, workers=2))
    assert len(ids) == len(set(ids)) == total // 2 and all(i.startswith("train/") for i in ids)


@pytest.mark.usefixtures("ray_session")
def test_ray_dataset_vectors(out):
    ds = ray_dataset(out, "feature", split="train")
    batches = list(ds.iter_torch_batches(batch_size=8))
    rows = sum(len(b["x"]) for b in batches)
    assert rows == 2 * FILES * PER_FILE and set(batches[0]) == {"x", "y"}
    assert str(batches[0]["x"].dtype) == "torch.float32" and batches[0]["x"].shape[1:] == (D,)
    assert Counter(int(y) for b in batches for y in b["y"]) == {0: FILES * PER_FILE, 1: FILES * PER_FILE}


@pytest.mark.usefixtures("ray_session")
def test_ray_dataset_sequences_and_keep(out):
    import pyarrow.compute as pc
    tens = ray_dataset(out, "frame_features", label=None, keep=lambda t: pc.ends_with(t.column("sample_id"), "0.jpg"))
    batches = list(tens.iter_torch_batches(batch_size=5))
    assert set(batches[0]) == {"x", "lengths"} and batches[0]["x"].shape[1:] == (3, D)
    numbers = sorted(int(n) for b in batches for n in b["x"][:, 0, 0])
    assert numbers == list(range(0, len(SPLITS) * 2 * FILES * PER_FILE, 10))
    ds = ray_dataset(out, "frame_features", label=None, frames=3)
    batches = list(ds.iter_torch_batches(batch_size=5))
    numbers = np.concatenate([b["x"][:, 0, 0].numpy() for b in batches]).astype(int)
    lengths = np.concatenate([b["lengths"].numpy() for b in batches])
    assert sorted(numbers) == list(range(len(SPLITS) * 2 * FILES * PER_FILE))
    assert (lengths == 1 + numbers % 3).all()


@pytest.mark.usefixtures("ray_session")
def test_ray_dataset_object_store(s3):
    fs, options = s3
    total = write_table(f"{S3_BUCKET}/out", fs)
    ds = ray_dataset(f"s3://{S3_BUCKET}/out", "feature", split="val", storage_options=options)
    ys = [int(y) for b in ds.iter_torch_batches(batch_size=16) for y in b["y"]]
    assert Counter(ys) == {0: total // 4, 1: total // 4}


def test_a_null_vector_or_clip_is_one_refusal_naming_the_table(tmp_path):
    """Not a raw ColumnError from inside a DataLoader or a Ray map: a TableError (featurize.Refused)."""
    t = _rows(range(6), "train", "cat")
    feature = pa.array([None if i == 2 else [float(i), 0.0, 0.0, 0.0] for i in range(6)], pa.list_(pa.float16(), D))
    frames = t.column("frame_features").combine_chunks()
    nulls = pa.ListArray.from_arrays(frames.offsets, frames.values, mask=pa.array([i in (1, 4) for i in range(6)]))
    t = t.set_column(t.schema.get_field_index("feature"), "feature", feature)
    t = t.set_column(t.schema.get_field_index("frame_features"), "frame_features", nulls)
    (tmp_path / "features").mkdir()
    pq.write_table(t, tmp_path / "features/part-0.parquet")
    out = str(tmp_path)
    with pytest.raises(TableError, match=f"column 'feature' of {out} .*part-0.parquet.: 1 rows have no vector"):
        list(FeatureDataset(out, "feature", batch_size=4))
    with pytest.raises(TableError, match="column 'frame_features' .*: 2 rows have no frames"):
        list(FeatureDataset(out, "frame_features", batch_size=4))
    with pytest.raises(TableError, match=f"column 'feature' of {out} .a Ray block.: 1 rows have no vector"):
        ray_dataset(out, "feature", here=True)  # converted in this process, before any Ray work
