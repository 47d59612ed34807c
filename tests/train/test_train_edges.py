"""`featurize train` under attack: a planted pickle in an epoch state, bad values, NaN, a table
rebuilt under a checkpoint, validation rows, --overwrite (issue 23). Tiny tables written here."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import featurize
from pipeline.cli import main
from pipeline.errors import ConfigError, OutputExists, StateError, TrainError
from pipeline.train import checkpoint as ckpt
from pipeline.train import state as epoch_state
from pipeline.train.loop import plan_training, train
from pipeline.train.recipe import lr_factor
from pipeline.train.trainfile import parse_training

from conftest import WORKER_DIES_AFTER_EPOCH_2
from tables import write_table
from train_here import in_process


def vectors_table(root, n_train=48, n_test=16, dim=6, seed=0, model=None, random_labels=False):
    """Rows whose class shows in dimension 0 (or random labels); feature[1] holds the row's index."""
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labels = rng.choice(["a", "b"], n).tolist() if random_labels else ["a" if i % 2 else "b" for i in range(n)]
    x = rng.normal(0, 0.3, (n, dim)).astype(np.float32)
    x[:, 0] += np.where(np.asarray(labels) == "a", 1.0, -1.0)
    x[:, 1] = np.arange(n)
    write_table(str(root), ["train"] * n_train + ["test"] * n_test, labels, feature=x)
    if model:  # the provenance a run writes into every file
        for path in sorted(root.rglob("*.parquet")):
            t = pq.read_table(path)
            pq.write_table(t.replace_schema_metadata({"featurize.model": model, "featurize.dim": str(dim)}), path)
    return str(root)


def linear(uri, out, **sections):
    data = {"name": "edge", "data": {"uri": uri, "column": "feature", "val_split": "test"},
            "head": {"kind": "linear"}, "train": {"epochs": 2, "batch_size": 16, "lr": 0.01}, "output": {"uri": out}}
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return data


# ---------------------------------------------------------------- before any work

@pytest.mark.parametrize("section, values, message", [
    ("train", {"lr": float("inf")}, "train.lr: must be a finite number, got inf"),
    ("train", {"lr": float("nan")}, "train.lr: must be a finite number, got nan"),
    ("train", {"weight_decay": -1}, "train.weight_decay: must be 0 or more, got -1.0"),
    ("train", {"weight_decay": float("inf")}, "train.weight_decay: must be a finite number"),
    ("train", {"cpus_per_worker": -1}, "train.cpus_per_worker: must be positive, got -1.0"),
    ("train", {"cpus_per_worker": float("nan")}, "train.cpus_per_worker: must be a finite number"),
    ("train", {"epochs": 0}, "train.epochs: must be a positive integer, got 0"),
    ("train", {"batch_size": 0}, "train.batch_size: must be a positive integer"),
    ("train", {"workers": 0}, "train.workers: must be a positive integer"),
    ("train", {"seed": -1}, "train.seed: must be an integer in [0, 2**32)"),
    ("train", {"seed": 1.5}, "train.seed: expected int"),
    ("head", {"kind": "mlp", "hidden": 0}, "head.hidden: must be a positive integer, got 0"),
    ("head", {"kind": "mlp", "dropout": float("nan")}, "head.dropout: must lie in [0, 1)"),
    ("head", {"kind": "mlp", "dropout": 1.0}, "head.dropout: must lie in [0, 1)"),
    ("data", {"frames": 0}, "data.frames: must be a positive integer, got 0"),
    ("data", {"val_split": None, "val_fraction": 1.0}, "data.val_fraction: must lie in [0, 1)"),
    ("data", {"val_split": None, "val_fraction": float("nan")}, "data.val_fraction: must lie in [0, 1)"),
])
def test_every_training_value_is_checked_naming_the_key(section, values, message):
    with pytest.raises(ConfigError) as e:
        parse_training(linear("t", "h", **{section: values}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_values_that_reached_ray_are_refused_on_one_line(tmp_path, capsys):
    for values in ({"weight_decay": -1}, {"cpus_per_worker": -1}, {"lr": float("inf")}):
        path = tmp_path / "t.yaml"
        path.write_text(json.dumps(linear("t", str(tmp_path / "h"), train=values)).replace("Infinity", ".inf"))
        assert main(["train", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"featurize: train.{next(iter(values))}: ") and "\n" not in err
    assert not (tmp_path / "h").exists()


def test_a_fraction_that_leaves_no_training_rows_says_so(tmp_path):
    uri = vectors_table(tmp_path / "t", n_train=200, n_test=0)
    cfg = parse_training(linear(uri, "h", data={"val_split": None, "val_fraction": 0.999}))
    with pytest.raises(TrainError) as e:
        plan_training(cfg)
    assert "data.val_fraction: 0.999 of the 200 training rows left none to train on" in str(e.value)
    assert "no rows of split" not in str(e.value)


def test_validation_rows_never_train_when_train_split_is_null(tmp_path):
    """train_split null, val_split test: every other split trains, the test rows only validate."""
    uri = vectors_table(tmp_path / "t", n_train=200, n_test=200, random_labels=True)
    lines = []
    table, plan = plan_training(parse_training(linear(uri, "h", data={"train_split": None})), note=lines.append)
    assert (plan.train_rows, plan.val_rows) == (200, 200)
    assert lines == ["featurize: data.train_split is null: every split trains except data.val_split 'test', "
                     "whose 200 rows only validate"]


@pytest.mark.usefixtures("ray_session")
def test_the_training_dataset_holds_no_validation_row(tmp_path, capsys):
    from pipeline.train.loop import _datasets

    uri = vectors_table(tmp_path / "t", n_train=40, n_test=24, random_labels=True)
    cfg = parse_training(linear(uri, str(tmp_path / "h"), data={"train_split": None}))
    _, plan = plan_training(cfg)
    for here in (True, False):  # read in the driver (a small table), or by Ray Data's tasks
        sets = {name: sorted(int(v) for b in ds.iter_batches(batch_size=None) for v in b["x"][:, 1])
                for name, ds in _datasets(cfg, plan, here=here).items()}
        assert sets == {"train": list(range(40)), "val": list(range(40, 64))}
    assert "every split trains except data.val_split 'test', whose 24 rows only validate" in capsys.readouterr().err


# ---------------------------------------------------------------- a planted pickle, a garbage file

class Payload:
    """What a planted state.pt would run if it were unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _states(out):
    return sorted(p for p in (out / "_train").glob("*/checkpoint_*") if p.is_dir())


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_killed_training_refuses_a_planted_pickle_then_resumes_along_its_learning_rate_curve(tmp_path, faults,
                                                                                              capsys):
    """A worker dies after epoch 2 of 4. Its epoch states are safetensors and JSON only; a pickle
    planted among them, or in place of their JSON, is refused on one line and never loaded; the
    same command then resumes where the killed run stopped, the learning rate going on along the
    same warm-up and cosine curve (the scheduler's state was saved with the epoch)."""
    uri = vectors_table(tmp_path / "t")  # 48 training rows: 6 steps of 8 an epoch
    out = tmp_path / "head"
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(linear(uri, str(out), train={"epochs": 4, "batch_size": 8, "warmup": 0.3})))
    faults("epoch", *WORKER_DIES_AFTER_EPOCH_2)
    assert main(["train", str(path)]) == 1
    assert not (out / ckpt.CONFIG).exists()  # no finished checkpoint yet
    states = _states(out)
    names = set(os.listdir(states[-1])) if states else set()  # safetensors and JSON only (best: select best only)
    assert {epoch_state.WEIGHTS, epoch_state.OPTIMIZER, epoch_state.STATE} <= names <= set(epoch_state.FILES)
    marker = tmp_path / "pwned"
    planted = states[-1] / "state.pt"
    planted.write_bytes(pickle.dumps(Payload(str(marker))))
    capsys.readouterr()
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{planted.name}: not part of a featurize training's epoch state" in err
    assert f"{states[-1].name}/state.pt" in err and "--overwrite" in err
    assert not marker.exists()

    planted.unlink()  # the same folder with a garbage state.json: refused too, naming it
    kept = (states[-1] / epoch_state.STATE).read_bytes()
    (states[-1] / epoch_state.STATE).write_bytes(pickle.dumps(Payload(str(marker))))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{states[-1].name}/{epoch_state.STATE}: not valid JSON" in err and "\n" not in err
    assert not marker.exists()

    (states[-1] / epoch_state.STATE).write_bytes(kept)  # as the killed run left it: resumed
    result = train(parse_training(json.loads(path.read_text())), say=None)
    # Epoch 1 was registered (its worker waited for that); epoch 2's report may not have reached
    # Ray Train's controller before its worker died (it polls its workers), and then epoch 2 is done again.
    assert result.resumed_from in (1, 2)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    steps, total = 6, 24
    expected = [0.01 * lr_factor(e * steps, total, round(0.3 * total), "cosine") for e in range(4)]
    assert [m["lr"] for m in result.metrics] == pytest.approx(expected, abs=1e-8)
    assert ckpt.load(str(out)).kind == "linear" and not marker.exists()


def test_the_state_reader_refuses_what_it_does_not_know(tmp_path):
    import torch

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    epoch_state.save(str(tmp_path), model.state_dict(), opt.state_dict(), [{"epoch": 1}], 0)
    state = epoch_state.load_folder(str(tmp_path))
    again = torch.optim.Adam(model.parameters(), lr=0.1)
    again.load_state_dict(state["optimizer"])  # Adam's state round-trips: betas, step, moments
    assert again.state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    (tmp_path / epoch_state.WEIGHTS).write_bytes(b"\x80\x04garbage")
    with pytest.raises(StateError, match="model.safetensors: not a safetensors file"):
        epoch_state.load_folder(str(tmp_path))


# ---------------------------------------------------------------- NaN, --overwrite, a changed table

@pytest.mark.usefixtures("ray_session")
def test_a_non_finite_loss_stops_the_training_overwrite_trains_anew_and_a_rebuilt_table_is_refused(tmp_path, capsys):
    """A NaN loss leaves no checkpoint; --overwrite trains anew there (balanced class weights, no
    validation rows: `best` falls back to the last epoch and says so); the same command again has
    nothing to do; the table rebuilt by another model (same rows, same dimension) is refused, not done.
    The epochs run in this process (train_here.py): what is checked is the loop's and the driver's."""
    bad = tmp_path / "bad"
    vectors_table(bad)
    path = sorted((bad / "features" / "split_dir=train").rglob("*.parquet"))[0]  # an inf in a training row
    t = pq.read_table(path)
    rows = t["feature"].to_pylist()
    rows[0] = [float("inf")] * len(rows[0])
    pq.write_table(t.set_column(t.schema.get_field_index("feature"), "feature",
                                pa.array(rows, t.schema.field("feature").type)), path)
    out = tmp_path / "head"
    with pytest.raises(TrainError) as e, in_process():
        train(parse_training(linear(str(bad), str(out), data={"val_split": None, "train_split": "train"})))
    assert "stopped at epoch 1: the train loss is not finite" in str(e.value) and "\n" not in str(e.value)
    assert not (out / ckpt.CONFIG).exists() and not (out / ckpt.MODEL).exists() and not _states(out)

    table = tmp_path / "good"
    file = tmp_path / "t.yaml"
    file.write_text(json.dumps(linear(vectors_table(table, model="resnet18"), str(out),
                                      data={"val_split": None, "val_fraction": 0},
                                      train={"class_weights": "balanced"})))
    fixed = parse_training(json.loads(file.read_text()))
    with pytest.raises(OutputExists, match=r"another training .*run with --overwrite"):
        train(fixed)
    with in_process():
        result = train(fixed, overwrite=True)
    assert [m["epoch"] for m in result.metrics] == [1, 2] and ckpt.load(str(out)).kind == "linear"
    assert result.selected_by.startswith("last: no validation rows to choose the best epoch by")
    config = json.loads((out / ckpt.CONFIG).read_text())
    assert config["epoch"] == 2 and config["source"]["lineage"]["files"] == len(list(table.rglob("*.parquet")))
    assert config["source"]["lineage"]["provenance"]["model"] == "resnet18"

    capsys.readouterr()
    assert main(["train", str(file)]) == 0 and "nothing to do" in capsys.readouterr().out
    import shutil

    shutil.rmtree(table)
    vectors_table(table, model="resnet34", seed=1)
    assert main(["train", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"data.uri {table} changed since the checkpoint in output.uri {out} was trained" in err and 'model "resnet18" -> "resnet34"' in err
    assert "--overwrite" in err and "\n" not in err


def test_overwrite_while_another_training_holds_the_directory_removes_nothing(tmp_path, capsys):
    """A concurrent second run with --overwrite: refused by the lease before anything is removed."""
    import fsspec

    from pipeline.output.lease import Lease

    uri = vectors_table(tmp_path / "t")
    out = tmp_path / "head"
    (out / "_train").mkdir(parents=True)
    (out / "_train" / "plan.json").write_text(json.dumps({"fingerprint": "0" * 16, "settings": {}}))
    (out / ckpt.CONFIG).write_text("{}")
    held = Lease(fsspec.filesystem("file"), str(out), str(out), "other-run").acquire()
    try:
        path = tmp_path / "t.yaml"
        path.write_text(json.dumps(linear(uri, str(out))))
        assert main(["train", str(path), "--overwrite"]) == 2
        assert "is in use by run other-run" in capsys.readouterr().err
    finally:
        held.release()
    assert (out / ckpt.CONFIG).exists() and (out / "_train" / "plan.json").exists()


def test_overwrite_never_removes_what_no_training_wrote(tmp_path):
    uri = vectors_table(tmp_path / "t")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExists, match="holds files that no training of this file wrote"):
        train(parse_training(linear(uri, str(out))), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- the API's arguments

@pytest.mark.parametrize("call, message", [
    (lambda p: featurize.train(42), "training: expected a training file's path or its mapping"),
    (lambda p: featurize.train(p, overrides=5), "overrides: expected a mapping or a list"),
    (lambda p: featurize.train(p, overrides=["train.epochs"]), "overrides: expected 'key=value' items"),
    (lambda p: featurize.train(p, overrides={"train.lr": object()}), "overrides['train.lr']: expected a YAML value"),
    (lambda p: featurize.train(p, overwrite="yes"), "overwrite: expected True or False"),
    (lambda p: featurize.train(p, say=3), "say: expected a function"),
    (lambda p: featurize.train(p, address=6379), "address: expected a Ray address"),
    (lambda p: featurize.train(p, {"train.lr": float("inf")}), "train.lr: must be a finite number, got inf"),
    (lambda p: featurize.train(p, {"train.lr": float("nan")}), "train.lr: must be a finite number, got nan"),
    (lambda p: featurize.train({**json.load(open(p)), "train": {"lr": float("inf")}}), "train.lr: must be a finite"),
])
def test_the_api_refuses_bad_arguments_before_torch_or_ray(tmp_path, call, message):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(linear(str(tmp_path / "t"), str(tmp_path / "h"))))
    with pytest.raises(featurize.Refused, match=message.replace("[", r"\[").replace("(", r"\(")):
        call(str(path))
    assert not (tmp_path / "h").exists()


@pytest.mark.parametrize("snapshot, message", [
    (b"\x80\x04garbage", "not valid JSON"),
    (json.dumps({"checkpoint_results": [{"checkpoint_dir_name": "../../elsewhere"}]}).encode(), "outside the run's"),
    (json.dumps({"validated_checkpoint_dir_names": ["/etc"]}).encode(), "outside the run's"),
    (json.dumps([1]).encode(), "not Ray Train's record"),
])
def test_ray_trains_record_of_the_states_is_checked_too(tmp_path, snapshot, message):
    """A planted checkpoint_manager_snapshot.json would have Ray Train hand the workers a folder
    elsewhere (which they would refuse to unpickle anyway): refused before any work, naming it."""
    import fsspec

    from pipeline.train import outdir

    class Run:
        fingerprint = "0123456789abcdef"

    run = tmp_path / "_train" / Run.fingerprint
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (run / outdir.SNAPSHOT).write_bytes(snapshot)
    with pytest.raises(TrainError) as e:
        outdir.check_states(fsspec.filesystem("file"), str(tmp_path), Run(), "OUT")
    assert f"OUT/_train/{Run.fingerprint}/{outdir.SNAPSHOT}: " in str(e.value) and message in str(e.value)
