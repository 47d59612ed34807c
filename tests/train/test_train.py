"""`featurize train`: the training file, the refusals before any work, each head's learning, and
Ray Train end to end (checkpoint directory, temporal entry loading it, resume after a crash)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import TemporalConfig
from pipeline.errors import CheckpointError, ConfigError, TableError, TrainError
from pipeline.models.temporal import build_head, resolve_head
from pipeline.output.table import open_table
from pipeline.output.tensors import label_codes, sequences, vectors
from pipeline.train import checkpoint as ckpt
from pipeline.train.loop import plan_training, train
from pipeline.train.models import KINDS, TEMPORAL, build, supervised
from pipeline.train.trainfile import parse_training

from conftest import S3_BUCKET, S3_SECRET
from tables import order_sequences, write_table


@pytest.fixture(scope="module")
def order_table(tmp_path_factory):
    """64 clips whose class is the order of two events; 48 train, 16 test."""
    x, labels = order_sequences(64)
    split = ["train" if i < 48 else "test" for i in range(64)]
    return write_table(str(tmp_path_factory.mktemp("order")), split, labels, feature=x.mean(1), frames=x)


def training(uri: str, out: str, kind: str = "lstm", column: str = "frame_features", **sections):
    data = {"name": f"t-{kind}", "data": {"uri": uri, "column": column, "val_split": "test"},
            "head": {"kind": kind, "hidden": 16}, "train": {"epochs": 3, "batch_size": 16, "lr": 0.01},
            "output": {"uri": out}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    return data


@pytest.fixture(scope="module")
def content_table(tmp_path_factory):
    """Clips whose class also shows in every frame (an offset on one dimension): what every head,
    attention pooling and the mean included, can learn (attention pooling, like the mean, is blind
    to the order of frames)."""
    x, labels = order_sequences(64)
    x[1::2, :, 2] += 1.5
    split = ["train" if i < 48 else "test" for i in range(64)]
    return write_table(str(tmp_path_factory.mktemp("content")), split, labels, feature=x.mean(1), frames=x)


# ---------------------------------------------------------------- before any work

@pytest.mark.parametrize("change, message", [
    ({"head": {"kind": "gru"}}, "head.kind: 'gru' is not one of"),
    ({"train": {"epochs": "many"}}, "train.epochs: expected int"),
    ({"train": {"epoch": 3}}, "unknown key train.epoch"),
    ({"head": {"kind": "autoencoder"}}, "head.code_dim: an autoencoder needs"),
    ({"data": {"val_fraction": 0.2}}, "data.val_split and data.val_fraction: choose one"),
    ({"data": {"val_split": "train"}}, "is also data.train_split"),
    ({"data": {"cache": "lots"}}, "data.cache: 'lots' is not a size"),
])
def test_training_file_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_training(training("out", "head", **change))


def test_a_mistyped_training_key_or_kind_gets_what_was_meant():
    with pytest.raises(ConfigError, match=r"^unknown key train\.epoch \(allowed: .*\); did you mean epochs\?$"):
        parse_training(training("out", "head", train={"epoch": 3}))
    with pytest.raises(ConfigError, match=r"^head\.kind: 'lstn' is not one of .*; did you mean lstm\?$"):
        parse_training(training("out", "head", kind="lstn"))


def test_cli_refuses_a_bad_training_file_with_exit_2(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(training("out", "head", train={"lr": -1})))
    assert main(["train", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "featurize: train.lr: must be positive, got -1.0"


@pytest.mark.parametrize("change, message", [
    ({"data": {"column": "clip_lstm"}}, "has no column 'clip_lstm' (feature columns: feature, frame_features)"),
    ({"data": {"column": "feature"}}, "head.kind lstm trains on frame sequences"),
    ({"data": {"column": "label"}}, "column 'label' has type string: expected a fixed-size list"),
    ({"data": {"val_split": "val"}}, "data.val_split: no rows of split 'val'"),
    ({"data": {"train_split": "tr"}}, "data.train_split: no rows of split 'tr'"),
    ({"data": {"label": "uri"}, "head": {"kind": "linear"}}, None),  # every row its own class: allowed
])
def test_table_refused_before_any_work(order_table, tmp_path, change, message):
    cfg = parse_training(training(order_table, str(tmp_path / "h"), **change))
    if message is None:
        assert plan_training(parse_training(training(order_table, "h", kind="linear", column="feature",
                                                     data={"label": "uri"})))[1].classes
        return
    with pytest.raises((TrainError, TableError), match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_training(cfg)
    assert not (tmp_path / "h").exists()  # refused before anything is written


def test_one_class_and_an_empty_fraction_refused(tmp_path):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    uri = write_table(str(tmp_path / "t"), ["train"] * 6, ["cat"] * 6, feature=x)
    with pytest.raises(TrainError, match="data.label: column 'label' has one class \\('cat'\\)"):
        plan_training(parse_training(training(uri, "h", kind="linear", column="feature", data={"val_split": None})))
    with pytest.raises(TrainError, match="data.val_fraction: 0.01 of 6 rows is none"):
        plan_training(parse_training({**training(uri, "h", kind="autoencoder", column="feature"),
                                      "data": {"uri": uri, "column": "feature", "val_fraction": 0.01},
                                      "head": {"kind": "autoencoder", "code_dim": 2}}))


def test_val_fraction_takes_the_same_rows_every_time(order_table):
    cfg = parse_training({**training(order_table, "h", kind="linear", column="feature"),
                          "data": {"uri": order_table, "column": "feature", "val_fraction": 0.25, "seed": 3}})
    a, b = plan_training(cfg)[1], plan_training(cfg)[1]
    assert a.train_rows + a.val_rows == 48 and 4 <= a.val_rows <= 20
    assert (a.train_rows, a.val_rows) == (b.train_rows, b.val_rows)


# ---------------------------------------------------------------- each head learns

@pytest.mark.parametrize("kind", KINDS)
def test_each_heads_loss_falls_on_a_tiny_table(content_table, kind):
    """A few optimizer steps on the table's own rows (read through tensors.py) lower the loss."""
    table = open_table(content_table)
    t = table.dataset().to_table()
    if kind in TEMPORAL:
        x, lengths = sequences(t["frame_features"])
        x, lengths = torch.from_numpy(x), torch.from_numpy(lengths)
    else:
        x, lengths = torch.from_numpy(vectors(t["feature"])), None
    y = torch.from_numpy(label_codes(t["label"], ["a_then_b", "b_then_a"]))
    model = build(kind, x.shape[-1], 2, {"hidden": 16, "layers": 1, "bidirectional": False, "dropout": 0.0,
                                         "code_dim": 3})
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def loss():
        out = model(x, lengths)
        return torch.nn.functional.cross_entropy(out, y) if supervised(kind) else torch.nn.functional.mse_loss(out, x)

    first = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    assert loss().item() < 0.8 * first, (kind, first, loss().item())


# ---------------------------------------------------------------- end to end, on Ray Train

@pytest.mark.usefixtures("ray_session")
def test_train_lstm_writes_a_checkpoint_a_job_loads(order_table, tmp_path, capsys):
    out = str(tmp_path / "head")
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(training(order_table, out)))
    assert main(["train", str(path), "--set", "train.epochs=4"]) == 0
    printed = capsys.readouterr()
    # the epoch lines are the training's progress: on stderr; the summary on stdout
    assert "epoch   4/4  train loss" in printed.err and "val loss" in printed.err and "ETA 0:00" in printed.err
    assert f"checkpoint   {out}" in printed.out
    assert "ray logs     /" in printed.out  # Ray's own lines stay off the console; the summary says where

    metrics = json.loads(open(f"{out}/{ckpt.METRICS}").read())
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert metrics[-1]["val_acc"] >= 0.9  # the order is learnable
    assert open(f"{out}/{ckpt.CURVES}", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    loaded = ckpt.load(out)
    assert loaded.config["input"] == {"column": "frame_features", "dim": 8, "frames": 6}
    assert loaded.classes == ["a_then_b", "b_then_a"]
    assert loaded.config["source"]["uri"] == order_table and loaded.config["rows"] == {"train": 48, "val": 16}
    # the head is evaluated on its validation rows at the end (evaluate.py): the kept epoch's accuracy
    evaluation = json.loads(open(f"{out}/eval.json").read())
    assert evaluation["rows"] == 16 and evaluation["rows_are"] == "validation rows: split test"
    assert evaluation["accuracy"] == pytest.approx(loaded.config["metrics"]["val_acc"])
    assert open(f"{out}/confusion.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "evaluation   validation rows: split test: accuracy " in printed.out

    # An extraction job's temporal entry loads the directory: the same clip features as apply's.
    info = resolve_head(TemporalConfig(kind="lstm", name="lstm", checkpoint=out), input_dim=8)
    head = build_head(info)
    x, _ = order_sequences(4, seed=5)
    lengths = np.full(4, 6)
    with torch.no_grad():
        job_side = head(torch.from_numpy(x), torch.from_numpy(lengths)).numpy()
    assert np.allclose(job_side, loaded.outputs(x, lengths, "lstm")["clip_lstm"], atol=1e-6)

    # The same training again: nothing to do; another training into the same folder: refused.
    assert main(["train", str(path), "--set", "train.epochs=4"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", str(path), "--set", "head.hidden=8"]) == 2  # and the file says 3 epochs
    assert "holds the checkpoint of another training (differs in: head.hidden 16 -> 8, train.epochs 4 -> 3)" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_autoencoder_on_an_object_store_keeps_the_secret_out(s3, tmp_path):
    fs, options = s3
    local = write_table(str(tmp_path / "t"), ["train"] * 40, ["x"] * 40,
                        feature=np.random.default_rng(1).normal(size=(40, 12)).astype(np.float32))
    fs.put(local, f"{S3_BUCKET}/table", recursive=True)
    data = {"name": "ae", "data": {"uri": f"s3://{S3_BUCKET}/table", "column": "feature", "val_fraction": 0.25,
                                   "storage_options": options},
            "head": {"kind": "autoencoder", "code_dim": 4}, "train": {"epochs": 2, "batch_size": 8, "lr": 0.01},
            "output": {"uri": f"s3://{S3_BUCKET}/heads/ae"}}
    result = train(parse_training(data))
    assert result.metrics[-1]["val_loss"] is not None and "val_acc" not in result.metrics[-1]
    files = {p.rsplit("/", 1)[-1] for p in fs.find(f"{S3_BUCKET}/heads/ae")}
    assert {ckpt.CONFIG, ckpt.MODEL, ckpt.METRICS, ckpt.CURVES} <= files and ckpt.HEAD not in files
    for name in (ckpt.CONFIG, ckpt.METRICS, "plan.json"):
        text = fs.cat_file(next(p for p in fs.find(f"{S3_BUCKET}/heads/ae") if p.endswith(name))).decode()
        assert S3_SECRET not in text
    loaded = ckpt.load(f"s3://{S3_BUCKET}/heads/ae", options)
    assert loaded.columns("ae")[0][0] == "code" and loaded.model.out_dim == 4


def test_a_second_training_into_the_same_directory_is_refused(order_table, tmp_path, capsys):
    """One writer per checkpoint directory: the lease a running training holds (here taken by hand,
    as a live process would hold it) refuses another before any work."""
    import fsspec

    from pipeline.output.lease import Lease

    out = tmp_path / "head"
    held = Lease(fsspec.filesystem("file"), str(out), str(out), "other-run").acquire()
    try:
        path = tmp_path / "t.yaml"
        path.write_text(json.dumps(training(order_table, str(out))))
        assert main(["train", str(path)]) == 2
        assert "is in use by run other-run" in capsys.readouterr().err
    finally:
        held.release()
    assert not (out / ckpt.CONFIG).exists() and not (out / "_train").exists()  # refused before its plan


@pytest.mark.parametrize("kind", KINDS)
def test_a_checkpoint_round_trips(tmp_path, kind):
    """save, load: the same outputs, the same columns, and config.json says what it was trained on."""
    head = {"hidden": 8, "layers": 2, "bidirectional": True, "dropout": 0.1, "code_dim": 3}
    model = build(kind, 6, 4, head, seed=7).eval()
    config = {"kind": kind, "input": {"column": "c", "dim": 6, "frames": 5}, "head": head,
              "classes": list("abcd") if supervised(kind) else [], "source": {"uri": "s3://u:pw@b/t"}}
    ckpt.save(str(tmp_path / "h"), {}, model, config, [{"epoch": 1, "train_loss": 1.0}], curves=b"png")
    loaded = ckpt.load(str(tmp_path / "h"))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 6) if kind in TEMPORAL else (3, 6)).astype(np.float32)
    lengths = np.array([5, 2, 1]) if kind in TEMPORAL else None
    with torch.no_grad():
        expected = model.embed(torch.from_numpy(x), None if lengths is None else torch.from_numpy(lengths)).numpy()
    got = loaded.outputs(x, lengths, "n")
    column = {"lstm": "clip_n", "attention": "clip_n", "autoencoder": "code"}.get(kind, "probs")
    assert np.allclose(got[column], expected, atol=1e-6)
    if supervised(kind) and kind not in TEMPORAL:
        assert list(got["pred"]) == [list("abcd")[i] for i in expected.argmax(axis=1)]
    assert "pw" not in (tmp_path / "h" / ckpt.CONFIG).read_text()  # credentials masked in the record
    (tmp_path / "h" / ckpt.MODEL).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors does not fit config.json"):
        ckpt.load(str(tmp_path / "h"))


def test_submit_sends_a_training_file_to_featurize_train(tmp_path, monkeypatch, capsys):
    """`featurize submit` checks a training file here and has the cluster run `featurize train` on it,
    with its local paths made absolute (the driver runs elsewhere)."""
    import ray.job_submission
    import yaml

    sent = {}

    class Client:
        def __init__(self, address):
            pass

        def submit_job(self, entrypoint, runtime_env, **kwargs):
            sent["entrypoint"] = entrypoint
            sent["file"] = yaml.safe_load(open(os.path.join(runtime_env["working_dir"], "job.yaml")))
            return kwargs["submission_id"]

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.yaml").write_text(json.dumps(training("out/table", "heads/h")))
    assert main(["submit", "t.yaml", "--address", "http://127.0.0.1:8265", "--set", "train.epochs=2"]) == 0
    assert sent["entrypoint"] == "python -m pipeline.cli train job.yaml --address auto"
    assert sent["file"]["data"]["uri"] == str(tmp_path / "out/table")
    assert sent["file"]["output"]["uri"] == str(tmp_path / "heads/h") and sent["file"]["train"]["epochs"] == 2
    (tmp_path / "bad.yaml").write_text(json.dumps(training("t", "h", head={"kind": "rnn"})))
    assert main(["submit", "bad.yaml", "--address", "http://127.0.0.1:8265"]) == 2
    assert "head.kind: 'rnn' is not one of" in capsys.readouterr().err


@pytest.mark.usefixtures("ray_session")
def test_a_training_the_local_ray_cannot_hold_is_refused(order_table, tmp_path):
    """Asked for a GPU or more CPUs than an embedded Ray has, Ray Train would wait forever."""
    for change, message in (({"use_gpu": True}, "train.use_gpu: 1 worker"),
                            ({"workers": 3}, "train.workers x train.cpus_per_worker: 3 CPUs asked"),
                            ({"workers": 2, "data": {"cache": 0}}, "larger than data.cache, is read by Ray Data")):
        data = change.pop("data", {})
        with pytest.raises(TrainError, match=message):
            train(parse_training(training(order_table, str(tmp_path / "h"), train=change, data=data)))


@pytest.mark.usefixtures("ray_session")
def test_two_workers_share_the_epochs_of_a_cached_table(order_table, tmp_path):
    """Every CPU of the session's Ray held by a worker: a cached table needs no read task. Each
    worker takes half the rows (loop._split), and the metrics are summed across them."""
    result = train(parse_training(training(order_table, str(tmp_path / "h"), train={"workers": 2, "epochs": 2})))
    assert [m["epoch"] for m in result.metrics] == [1, 2]
    # rows = samples/s x seconds: 48, both halves counted once (the whole table on each worker: 96)
    assert all(abs(m["samples_per_s"] * m["seconds"] - 48) <= 1 for m in result.metrics), result.metrics
    assert ckpt.load(str(tmp_path / "h")).config["rows"] == {"train": 48, "val": 16}


def test_run_given_a_training_file_points_to_train(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(training("out", "head")))
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"featurize: {path} is a training file (it has head:, no source:): run it with featurize train"
