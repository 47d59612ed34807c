"""`head.normalize` (models/normalize.py, train/moments.py): the statistics are the training rows'
(never the validation rows'), saved in the weights, and applied the same by training, `apply` and an
extraction job's `temporal:` entry; checkpoints written before it load as `none`; `l2`; refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.config import ConfigError, TemporalConfig
from pipeline.models.normalize import Normalize
from pipeline.models.temporal import TemporalEmbedder, TemporalError, build_head, resolve_head
from pipeline.output.tensors import sequences, vectors
from pipeline.train import checkpoint as ckpt
from pipeline.train.apply import apply_head
from pipeline.train.loop import train
from pipeline.train.models import KINDS, TEMPORAL, build, normalizer, supervised
from pipeline.train.moments import batch_moments, merge
from pipeline.train.train_plan import held_out
from pipeline.train.trainfile import parse_training

from conftest import read_features
from tables import order_sequences, write_table
from train_here import in_process

D, T = 8, 6
SHIFT = 5.0  # the validation rows' offset: statistics that took them in would show it


def real_frames(x: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The frames of each clip before its length, as stored (float16), float64."""
    return np.concatenate([x[i, :k] for i, k in enumerate(lengths)]).astype(np.float16).astype(np.float64)


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """48 training clips of 2..6 frames, 16 test clips shifted by SHIFT; dimension 7 never changes."""
    x, labels = order_sequences(64, frames=T, dim=D)
    x[:, :, 7] = 0.5
    lengths = np.array([2 + i % (T - 1) for i in range(64)])
    split = ["train" if i < 48 else "test" for i in range(64)]
    x[48:] += SHIFT
    x[48:, :, 7] = 0.5
    uri = write_table(str(tmp_path_factory.mktemp("shifted")), split, labels, frames=x, lengths=lengths)
    return uri, x, lengths


@pytest.fixture(scope="module")
def trained_lstm(shifted, tmp_path_factory, ray_session):
    uri = shifted[0]
    out = str(tmp_path_factory.mktemp("heads") / "lstm")
    data = {"name": "norm-lstm", "data": {"uri": uri, "column": "frame_features", "val_split": "test"},
            "head": {"kind": "lstm", "hidden": 8}, "train": {"epochs": 2, "batch_size": 16, "lr": 0.01},
            "output": {"uri": out}}
    with in_process():  # what is checked is the driver's statistics and the head's weights (train_here.py)
        train(parse_training(data), say=lambda line: None)
    return out


def test_the_statistics_are_the_training_rows_real_frames_and_survive_a_reload(shifted, trained_lstm):
    _, x, lengths = shifted
    train_frames, every_frame = real_frames(x[:48], lengths[:48]), real_frames(x, lengths)
    want_mean, want_std = train_frames.mean(axis=0), train_frames.std(axis=0)
    want_std[7] = 1.0  # a dimension that never changes is left unscaled
    loaded = ckpt.load(trained_lstm)
    assert loaded.normalize == "standard" and loaded.config["normalize"] == "standard"
    norm = normalizer(loaded.model)
    np.testing.assert_allclose(norm.mean.numpy(), want_mean, atol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), want_std, atol=1e-5)
    assert np.abs(norm.mean.numpy()[:7] - every_frame.mean(axis=0)[:7]).min() > 1  # the test rows left out
    # the temporal entry's format holds them too
    assert json.loads(open(f"{trained_lstm}/{ckpt.HEAD_JSON}").read())["normalize"] == "standard"
    head = build_head(resolve_head(TemporalConfig(kind="lstm", name="lstm", checkpoint=trained_lstm), input_dim=D))
    np.testing.assert_array_equal(head.norm.mean.numpy(), norm.mean.numpy())
    np.testing.assert_array_equal(head.norm.std.numpy(), norm.std.numpy())


def test_apply_and_the_temporal_entry_give_the_same_clip_and_apply_adds_pred_and_probs(shifted, trained_lstm,
                                                                                      tmp_path):
    uri = shifted[0]
    out2 = tmp_path / "applied"
    apply_head(trained_lstm, uri, str(out2), name="lstm")
    got = read_features(str(out2)).sort_by("sample_id")
    rows = read_features(uri, columns=["sample_id", "frame_features"]).sort_by("sample_id")
    assert got["sample_id"].to_pylist() == rows["sample_id"].to_pylist()
    x, lengths = sequences(rows["frame_features"], T)
    info = resolve_head(TemporalConfig(kind="lstm", name="lstm", checkpoint=trained_lstm), input_dim=D)
    job_side = TemporalEmbedder([info]).clip_features(x, lengths)["clip_lstm"]  # what an extraction's actor runs
    applied = vectors(got["clip_lstm"])
    cosine = (applied * job_side).sum(1) / np.linalg.norm(applied, axis=1) / np.linalg.norm(job_side, axis=1)
    assert cosine.min() >= 0.9999, cosine.min()

    probs = vectors(got["probs"])
    classes = ckpt.load(trained_lstm).classes
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert [classes[i] for i in probs.argmax(axis=1)] == got["pred"].to_pylist()
    with torch.no_grad():  # the trained classifier on the job's clip features
        logits = ckpt.load(trained_lstm).model.classifier(torch.from_numpy(job_side)).numpy()
    np.testing.assert_allclose(probs, torch.softmax(torch.from_numpy(logits), 1).numpy(), atol=1e-4)


def test_a_val_fraction_leaves_its_rows_out_of_the_statistics(tmp_path, ray_session):
    rng = np.random.default_rng(1)
    n = 60
    ids = [f"s{i:05d}" for i in range(n)]  # the ids write_table gives
    val = held_out(ids, 0.3, 3)
    feature = rng.normal(size=(n, D)).astype(np.float32) + np.where(val, SHIFT, 0.0)[:, None]
    uri = write_table(str(tmp_path / "t"), ["train"] * n, ["a", "b"] * (n // 2), feature=feature)
    # cache 0: the table is streamed (not held in the object store), so the statistics are a Ray Data map
    data = {"name": "norm-linear", "data": {"uri": uri, "val_fraction": 0.3, "seed": 3, "cache": 0},
            "head": {"kind": "linear"},
            "train": {"epochs": 1, "batch_size": 16}, "output": {"uri": str(tmp_path / "h")}}
    train(parse_training(data), say=lambda line: None)
    norm = normalizer(ckpt.load(str(tmp_path / "h")).model)
    rows = feature[~val].astype(np.float16).astype(np.float64)
    np.testing.assert_allclose(norm.mean.numpy(), rows.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), rows.std(axis=0), atol=1e-5)


def test_moments_merge_batches_as_numpy_and_skip_the_padding():
    rng = np.random.default_rng(0)
    x = rng.normal(3, 2, size=(10, 5, 4))
    lengths = rng.integers(1, 6, size=10)
    x[np.arange(5)[None, :] >= lengths[:, None]] = 1e6  # padding that must not count
    parts = [batch_moments({"x": x[i:i + 3], "lengths": lengths[i:i + 3]}) for i in range(0, 10, 3)]
    parts.append(batch_moments({"x": x[:0], "lengths": lengths[:0]}))  # a batch the filters emptied
    n, mean, m2 = merge(parts)
    frames = np.concatenate([x[i, :k] for i, k in enumerate(lengths)])
    assert n == lengths.sum()
    np.testing.assert_allclose(mean, frames.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.sqrt(m2 / n), frames.std(axis=0), rtol=1e-10)


HEAD = {"hidden": 6, "layers": 1, "bidirectional": False, "dropout": 0.0, "code_dim": 3}


def _inputs(kind: str, n: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind in TEMPORAL:
        return rng.normal(2, 3, size=(n, T, D)).astype(np.float32), np.array([6, 3, 1, 6, 2][:n])
    return rng.normal(2, 3, size=(n, D)).astype(np.float32), None


def _drop(path, prefix_free=lambda k: "norm." not in k) -> None:
    save_file({k: v for k, v in load_file(path).items() if prefix_free(k)}, path)


def _json(path, edit) -> None:
    data = json.loads(open(path).read())
    edit(data)
    open(path, "w").write(json.dumps(data))


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_written_before_normalize_loads_as_none_with_the_same_outputs(tmp_path, kind):
    """The old format: no `normalize` key, no buffers. It loads as `none` and gives what the head gave."""
    model = build(kind, D, 3, {**HEAD, "normalize": "standard"}, seed=2).eval()
    normalizer(model).set_statistics(np.arange(D), np.full(D, 2.0))
    config = {"kind": kind, "input": {"column": "c", "dim": D, "frames": T}, "head": {**HEAD, "normalize": "standard"},
              "classes": ["a", "b", "c"] if supervised(kind) else [], "normalize": "standard"}
    folder = tmp_path / "h"
    ckpt.save(str(folder), {}, model, config, [])
    x, lengths = _inputs(kind)
    before = ckpt.load(str(folder)).outputs(x, lengths, "n")
    normalizer(model).set_statistics(np.zeros(D), np.ones(D))  # the same weights, inputs as they are
    x_t, n_t = torch.from_numpy(x), None if lengths is None else torch.from_numpy(lengths)
    with torch.no_grad():
        old = model.embed(x_t, n_t).numpy()

    _drop(str(folder / ckpt.MODEL))
    _json(folder / ckpt.CONFIG, lambda c: (c.pop("normalize"), c["head"].pop("normalize")))
    if kind in TEMPORAL:
        _drop(str(folder / ckpt.HEAD))
        _json(folder / ckpt.HEAD_JSON, lambda c: c.pop("normalize"))
    loaded = ckpt.load(str(folder))
    assert loaded.normalize == "none"
    got = loaded.outputs(x, lengths, "n")
    column = {"lstm": "clip_n", "attention": "clip_n", "autoencoder": "code"}.get(kind, "probs")
    np.testing.assert_allclose(got[column], old, atol=1e-6)
    assert not np.allclose(got[column], before[column], atol=1e-3)  # the statistics did change the outputs
    if kind in TEMPORAL:
        head = build_head(resolve_head(TemporalConfig(kind=kind, name="n", checkpoint=str(folder)), input_dim=D))
        with torch.no_grad():
            np.testing.assert_allclose(head(x_t, n_t).numpy(), old, atol=1e-6)

    # strict otherwise: a config that says standard without the buffers, or another key missing
    _json(folder / ckpt.CONFIG, lambda c: c["head"].update(normalize="standard"))
    with pytest.raises(ckpt.CheckpointError, match="does not fit config.json .*norm.mean"):
        ckpt.load(str(folder))
    _json(folder / ckpt.CONFIG, lambda c: c["head"].pop("normalize"))
    first = sorted(load_file(str(folder / ckpt.MODEL)))[0]
    _drop(str(folder / ckpt.MODEL), lambda k: k != first)
    with pytest.raises(ckpt.CheckpointError, match="does not fit config.json"):
        ckpt.load(str(folder))
    if kind in TEMPORAL:
        _json(folder / ckpt.HEAD_JSON, lambda c: c.update(normalize="standard"))
        with pytest.raises(TemporalError, match=r"weights do not fit the JSON config .*norm\.mean"):
            resolve_head(TemporalConfig(kind=kind, name="n", checkpoint=str(folder)), input_dim=D)


def test_l2_gives_unit_frames_and_zero_padding_stays_zero():
    norm = Normalize(D, "l2")
    x = torch.from_numpy(_inputs("lstm")[0])
    x[2, 1:] = 0.0  # a clip of one frame, padded with zeros
    out = norm(x)
    np.testing.assert_allclose(out[:, :1].norm(dim=-1).numpy(), 1.0, atol=1e-6)
    assert torch.isfinite(out).all() and (out[2, 1:] == 0).all()
    for kind in ("lstm", "attention", "linear"):  # a head that normalises by L2 ignores each vector's scale
        model = build(kind, D, 3, {**HEAD, "normalize": "l2"}).eval()
        x, lengths = _inputs(kind)
        scale = np.random.default_rng(3).uniform(0.5, 4, size=x.shape[:-1] + (1,)).astype(np.float32)
        n = None if lengths is None else torch.from_numpy(lengths)
        with torch.no_grad():
            a, b = model.embed(torch.from_numpy(x), n), model.embed(torch.from_numpy(x * scale), n)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


def test_a_dimension_that_never_changes_keeps_std_1():
    norm = Normalize(3, "standard")
    norm.set_statistics([1.0, 2.0, 3.0], [0.5, 0.0, 1e-9])
    assert norm.std.tolist() == [0.5, 1.0, 1.0]
    assert torch.isfinite(norm(torch.ones(2, 3))).all()


def test_an_unknown_normalisation_is_refused_naming_the_key(tmp_path, capsys):
    data = {"name": "x", "data": {"uri": "out"}, "head": {"kind": "linear", "normalize": "zscore"},
            "output": {"uri": "h"}}
    with pytest.raises(ConfigError, match=r"^head\.normalize: 'zscore' is not one of standard, l2, none$"):
        parse_training(data)
    from pipeline.cli import main

    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(data))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "featurize: head.normalize: 'zscore' is not one of standard, l2, none"
    with pytest.raises(ValueError, match="normalize: 'zscore' is not one of"):
        Normalize(4, "zscore")
