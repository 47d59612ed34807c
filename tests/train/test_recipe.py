"""The training's recipe: AdamW with a warm-up and a cosine schedule (its state survives a resume),
the best epoch kept (`train.select`), early stopping (`train.patience`), balanced class weights,
and the refusals of bad values."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.train import checkpoint as ckpt
from pipeline.train import state as epoch_state
from pipeline.train.loop import plan_training, train
from pipeline.train.recipe import class_weights, clip_norm, lr_factor, optimizer_and_schedule
from pipeline.train.selection import MIN_VAL_ROWS, Selection, effective
from pipeline.train.trainfile import TrainSettings, parse_training

from tables import write_table
from train_here import in_process


def vectors_file(uri: str, out: str, **train):
    return {"name": "recipe", "data": {"uri": uri, "column": "feature", "val_split": "val"},
            "head": {"kind": "linear"}, "train": {"batch_size": 8, **train}, "output": {"uri": out}}


@pytest.fixture(scope="module")
def reversed_val(tmp_path_factory):
    """48 training rows whose class shows in dimension 0, and 32 validation rows (MIN_VAL_ROWS or more:
    enough for `best`) whose labels are the other way round: the better the head learns, the worse it
    validates (the best epoch is the first)."""
    rng = np.random.default_rng(0)
    labels = ["a" if i % 2 == 0 else "b" for i in range(80)]
    x = rng.normal(0, 0.3, (80, 4)).astype(np.float32)
    x[:, 0] += np.where(np.asarray(labels) == "a", 2.0, -2.0)
    split = ["train"] * 48 + ["val"] * 32
    shown = labels[:48] + ["b" if v == "a" else "a" for v in labels[48:]]
    return write_table(str(tmp_path_factory.mktemp("rev")), split, shown, feature=x)


# ---------------------------------------------------------------- before any work

@pytest.mark.parametrize("change, message", [
    ({"patience": -1}, "train.patience: must be a positive number of epochs (null: no early stop), got -1"),
    ({"patience": 0}, "train.patience: must be a positive number of epochs"),
    ({"select": "worst"}, "train.select: 'worst' is not one of best, last"),
    ({"class_weights": "inverse"}, "train.class_weights: 'inverse' is not one of balanced, none"),
    ({"schedule": "step"}, "train.schedule: 'step' is not one of cosine, constant"),
    ({"warmup": 1.5}, "train.warmup: must lie in [0, 1), got 1.5"),
    ({"clip_grad": -1}, "train.clip_grad: must be 0 (no clipping) or more, got -1.0"),
])
def test_bad_values_are_refused_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        parse_training(vectors_file("t", "h", **change))


def test_the_cli_refuses_a_negative_patience_on_one_line(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(vectors_file("t", "h", patience=-2)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("featurize: train.patience:")


def test_a_file_with_data_head_and_output_only_gets_the_recipe():
    cfg = parse_training({"name": "n", "data": {"uri": "t"}, "head": {"kind": "lstm"}, "output": {"uri": "h"}})
    assert (cfg.train.schedule, cfg.train.select, cfg.train.class_weights) == ("cosine", "best", "none")
    assert cfg.train.patience is None and cfg.train == TrainSettings()
    assert clip_norm("lstm", None) == clip_norm("attention", None) == 1.0 and clip_norm("linear", None) is None
    assert clip_norm("lstm", 0) is None and clip_norm("linear", 2.5) == 2.5


# ---------------------------------------------------------------- the row order

def test_each_seed_and_epoch_shuffles_the_rows_its_own_way():
    """The seed the training's shard is shuffled with: a stream per (train.seed, epoch), never
    seed + epoch (train.seed 1 would replay train.seed 0's row orders one epoch on)."""
    from types import SimpleNamespace

    from pipeline.train.epochs import _pass

    class Shard:  # records what the epoch asks of Ray Data; no rows
        def iter_torch_batches(self, **kw):
            asked.append(kw.get("local_shuffle_seed"))
            return iter(())

    plan = SimpleNamespace(kind="attention")
    steps = {"optimizer": object(), "scheduler": None, "clip": None}
    seen = {}
    for seed in range(3):
        for epoch in range(20):
            asked = []
            _pass(torch.nn.Identity(), Shard(), plan, "cpu",
                  {"batch_size": 8, "seed": seed}, steps, epoch, "train")
            seen[seed, epoch] = asked[0]
    assert len(set(seen.values())) == len(seen)  # 60 different orders, seed 1 epoch 0 not seed 0 epoch 1
    asked = []
    _pass(torch.nn.Identity(), Shard(), plan, "cpu", {"batch_size": 8, "seed": 1}, steps, 0, "train")
    assert asked == [seen[1, 0]]  # the same again: a resumed training replays its epochs' orders
    _pass(torch.nn.Identity(), Shard(), plan, "cpu", {"batch_size": 8, "seed": 1}, None, 0, "val")
    assert asked[-1] is None  # validation is not shuffled


# ---------------------------------------------------------------- the schedule

def test_warm_up_then_cosine_or_constant():
    total, warmup = 100, 5
    assert [lr_factor(s, total, warmup, "cosine") for s in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert lr_factor(5, total, warmup, "cosine") == 1.0
    assert lr_factor(5 + 95 // 2, total, warmup, "cosine") == pytest.approx(0.5, abs=0.02)
    assert lr_factor(100, total, warmup, "cosine") == pytest.approx(0.0)
    assert lr_factor(50, total, warmup, "constant") == 1.0 and lr_factor(0, total, 0, "cosine") == 1.0


def test_the_schedule_and_optimizer_state_go_on_after_a_save_and_load(tmp_path):
    """state.py keeps the scheduler's state in state.json (plain numbers): a state saved after 7
    steps and loaded into a new optimizer goes on with the same learning rates as one never stopped."""
    config = {"lr": 0.01, "weight_decay": 0.0, "epochs": 4, "steps_per_epoch": 5, "warmup": 0.2, "schedule": "cosine"}

    def fresh():
        model = torch.nn.Linear(3, 2)
        return model, *optimizer_and_schedule(model, config)

    def step(model, opt, sched):
        opt.zero_grad()
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        return sched.get_last_lr()[0]

    model, opt, sched = fresh()
    through = [step(model, opt, sched) for _ in range(20)]
    model, opt, sched = fresh()
    [step(model, opt, sched) for _ in range(7)]
    epoch_state.save(str(tmp_path), model.state_dict(), opt.state_dict(), [], 0, sched.state_dict())
    assert json.loads((tmp_path / epoch_state.STATE).read_text())["scheduler"]["last_epoch"] == 7
    state = epoch_state.load_folder(str(tmp_path))
    model2, opt2, sched2 = fresh()
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert [step(model2, opt2, sched2) for _ in range(13)] == pytest.approx(through[7:])
    assert through[3] == pytest.approx(0.01) and through[-1] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- class weights

def test_balanced_weights_are_scikit_learns():
    """n_samples / (n_classes * count) per class, as sklearn.utils.class_weight.compute_class_weight
    ("balanced") documents it; a class only the validation rows hold gets 1."""
    counts = Counter({"cat": 6, "dog": 3, "eel": 1})
    weights = class_weights(["cat", "dog", "eel", "fox"], counts, "balanced")
    assert weights == pytest.approx([10 / 18, 10 / 9, 10 / 3, 1.0])
    assert class_weights(["cat", "dog"], counts, "none") is None


def test_balanced_weights_equal_compute_class_weight_where_scikit_learn_is_installed():
    sklearn = pytest.importorskip("sklearn.utils.class_weight")
    y = np.array(["cat"] * 6 + ["dog"] * 3 + ["eel"])
    expected = sklearn.compute_class_weight("balanced", classes=np.array(["cat", "dog", "eel"]), y=y)
    assert class_weights(["cat", "dog", "eel"], Counter(y.tolist()), "balanced") == pytest.approx(expected.tolist())


def test_the_plan_weighs_the_training_rows_labels(tmp_path):
    x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    labels = ["a"] * 6 + ["b"] * 2 + ["a", "b", "b", "b"]
    uri = write_table(str(tmp_path / "t"), ["train"] * 8 + ["val"] * 4, labels, feature=x)
    plan = plan_training(parse_training(vectors_file(uri, "h", class_weights="balanced")))[1]
    assert plan.classes == ["a", "b"] and plan.class_weights == pytest.approx([8 / 12, 8 / 4])  # train: 6 a, 2 b
    assert plan_training(parse_training(vectors_file(uri, "h")))[1].class_weights is None


def test_best_on_too_few_validation_rows_keeps_the_last_epoch_and_says_why():
    """On 8 validation rows an epoch's accuracy moves 1/8 a row: `best` would keep the luckiest."""
    assert effective("best", 8) == "last" and effective("best", MIN_VAL_ROWS) == "best"
    assert effective("best", 0) == "best" and effective("last", 100) == "last"  # 0: no validation rows at all
    few = Selection(True, "best", None, val_rows=8)
    rows = [{"epoch": 1, "val_acc": 0.875, "val_loss": 0.3}, {"epoch": 2, "val_acc": 0.75, "val_loss": 0.6}]
    for row in rows:
        few.update(row, {"w": torch.zeros(1)})
    assert few.weights is None  # no best epoch's weights kept: the checkpoint holds the last
    assert few.selected_by(2) == (2, "last: 8 validation rows are too few to choose the best epoch by "
                                     f"(best needs {MIN_VAL_ROWS}; epoch 2 of 2)")
    enough = Selection(True, "best", None, val_rows=MIN_VAL_ROWS)
    for row in rows:
        enough.update(row, {"w": torch.zeros(1)})
    assert enough.selected_by(2) == (1, "best val_acc 0.8750 at epoch 1 of 2") and enough.weights is not None


# ---------------------------------------------------------------- the epochs' loop

@pytest.mark.usefixtures("ray_session")
def test_select_best_keeps_the_best_epochs_weights_and_patience_stops(reversed_val, tmp_path, capsys):
    """The best validation accuracy is at epoch 1 here; with patience 2 the training stops after
    epoch 3 and says so, and the checkpoint holds epoch 1's weights: those of the same training
    run for one epoch only (a constant learning rate without warm-up: the same steps)."""
    same = {"schedule": "constant", "warmup": 0, "lr": 0.05}
    best = str(tmp_path / "best")
    with in_process():  # the epochs' logic: train_here.py (Ray Train's own path: test_train.py, test_train_edges.py)
        result = train(parse_training(vectors_file(reversed_val, best, epochs=8, patience=2, **same)), say=print)
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3]
    assert "stopped early after epoch 3: val_acc not better for 2 epochs (train.patience)" in capsys.readouterr().out
    config = json.loads(open(f"{best}/{ckpt.CONFIG}").read())
    assert config["epoch"] == 1 and config["metrics"]["epoch"] == 1
    assert config["selected_by"].startswith("best val_acc ") and config["selected_by"].endswith(
        "at epoch 1 of 3 (stopped early, train.patience)")
    one = str(tmp_path / "one")
    with in_process():
        last = train(parse_training(vectors_file(reversed_val, one, epochs=1, select="last", **same)), say=None)
    assert last.selected_by == "last" and json.loads(open(f"{one}/{ckpt.CONFIG}").read())["epoch"] == 1
    kept, first = ckpt.load(best).model.state_dict(), ckpt.load(one).model.state_dict()
    assert all(torch.equal(kept[k], first[k]) for k in kept)
