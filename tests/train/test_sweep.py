"""`featurize train --sweep` (pipeline/train/sweep.py): a grid of weight decay (and lr) through Ray
Tune, one Ray Train run per trial on the same cached rows, the best on the validation rows kept."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.train import checkpoint as ckpt
from pipeline.train.epoch_lines import TrialLines
from pipeline.train.loop import TrainError, train
from pipeline.train.sweep import SWEEP_JSON, SWEEP_PNG, Sweep, kept
from pipeline.train.sweep_args import parse_sweep
from pipeline.train.trainfile import parse_training

from tables import write_table

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def probe_table(tmp_path_factory):
    """Two classes apart along one dimension: a linear probe learns them, unless its weights are decayed away."""
    rng = np.random.default_rng(0)
    n = 96
    y = np.arange(n) % 2
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[:, 0] += 3.0 * (2 * y - 1)
    labels = ["left" if v == 0 else "right" for v in y]
    split = ["train" if i < 64 else "val" for i in range(n)]
    return write_table(str(tmp_path_factory.mktemp("probe")), split, labels, feature=x)


def probe(uri: str, out: str, **train):
    return {"name": "probe", "data": {"uri": uri, "column": "feature", "val_split": "val"},
            "head": {"kind": "linear"}, "train": {"optimizer": "adamw", "epochs": 3, "batch_size": 16, "lr": 0.1, **train},
            "output": {"uri": out}}


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_sweep_over_two_values_keeps_the_better_and_records_both(probe_table, tmp_path, capsys):
    out = tmp_path / "head"
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(probe(probe_table, str(out), cpus_per_worker=0.5)))
    # a weight decay of 1000 pulls the probe's weights to nothing (or past it): it cannot win.
    # The two trials run at once (half a CPU each, of the session's two)
    assert main(["train", str(path), "--sweep", "weight_decay=1000,0", "--sweep", "max_concurrent_trials=2"]) == 0
    printed = capsys.readouterr()
    assert "trial 1/2 (weight_decay 0, lr 0.1)  epoch   3/3" in printed.err
    assert "trial 2/2 (weight_decay 1000, lr 0.1)" in printed.err
    assert "sweep        2 trials, kept trial 1: weight_decay 0, lr 0.1" in printed.out
    assert "Configuration for experiment" not in printed.out + printed.err  # Tune's tables stay off the console

    record = json.loads((out / SWEEP_JSON).read_text())
    assert [t["weight_decay"] for t in record["trials"]] == [0.0, 1000.0]
    good, bad = record["trials"]
    assert good["best"] and not bad.get("best") and record["kept"]["weight_decay"] == 0.0
    # 3 epochs of 4 steps: the validation accuracy depends on the row order, 0.81-0.97 over 200 orders
    # (mean 0.88) in a plain loop of the same recipe, so the bar is "learned", not one draw's value
    assert good["score"] >= 0.75 and (bad["score"] is None or bad["score"] <= good["score"] - 0.2)
    assert [r["epoch"] for r in good["epochs"]] == [1, 2, 3]  # every trial's epochs recorded
    assert (out / SWEEP_PNG).read_bytes()[:8] == PNG

    config = json.loads((out / ckpt.CONFIG).read_text())
    assert config["train"]["sweep"] == {"weight_decay": [0.0, 1000.0], "lr": [0.1]}
    # the checkpoint is the kept trial's head: its validation accuracy is the kept trial's
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(good["score"])
    assert (out / "confusion.png").read_bytes()[:8] == PNG
    assert not (out / "_train" / json.loads((out / "_train/plan.json").read_text())["fingerprint"]).exists()

    # the same sweep again: nothing to do; another grid is another training
    assert main(["train", str(path), "--sweep", "weight_decay=1000,0"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(["train", str(path), "--sweep", "weight_decay=0,0.1"]) == 2
    assert "differs in: sweep.weight_decay" in capsys.readouterr().err


def test_a_sweep_needs_validation_rows(probe_table, tmp_path):
    cfg = parse_training({**probe(probe_table, str(tmp_path / "h")),
                          "data": {"uri": probe_table, "column": "feature", "val_fraction": 0}})
    with pytest.raises(TrainError, match="--sweep: the sweep chooses on the validation rows and this training has none"):
        train(cfg, sweep=parse_sweep(True))
    assert not (tmp_path / "h").exists()  # refused before anything is written


@pytest.mark.parametrize("given, message", [
    (["wd=0,1"], "--sweep wd: not a key of the sweep"),
    (["weight_decay"], "--sweep 'weight_decay': expected KEY=V1,V2"),
    (["weight_decay=0,x"], "--sweep weight_decay: 'x' is not a number"),
    (["weight_decay=-1"], "must be a finite number >= 0"),
    (["lr=0"], "--sweep lr: '0' must be a finite number > 0"),
    (["weight_decay=0.1,0.1"], "a value is given twice"),
    (["max_concurrent_trials=0"], "max_concurrent_trials: expected a positive integer"),
    ("weight_decay=0", "expected True, a mapping or 'key=v1,v2' items"),
])
def test_bad_sweep_values_are_refused_naming_them(given, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_sweep(given)


def test_the_grid_from_the_cli_and_the_api():
    assert parse_sweep(None) is None and parse_sweep(False) is None
    assert parse_sweep([""]).weight_decay is None  # a bare --sweep: the optimizer's grid (test_lbfgs.py)
    sweep = parse_sweep(["weight_decay=0.01,0", "lr=0.1,0.01", "max_concurrent_trials=2"])
    assert sweep.weight_decay == [0.0, 0.01] and sweep.lr == [0.01, 0.1] and sweep.max_concurrent_trials == 2
    assert sweep.points(0.5) == [{"lr": 0.01, "weight_decay": 0.0}, {"lr": 0.01, "weight_decay": 0.01},
                                 {"lr": 0.1, "weight_decay": 0.0}, {"lr": 0.1, "weight_decay": 0.01}]
    assert parse_sweep({"weight_decay": [0, 1e-3]}).points(0.5) == [{"lr": 0.5, "weight_decay": 0.0},
                                                                     {"lr": 0.5, "weight_decay": 0.001}]


def test_a_trials_score_is_that_of_the_epoch_its_checkpoint_holds():
    history = [{"epoch": 1, "val_acc": 0.6, "val_loss": 0.9}, {"epoch": 2, "val_acc": 0.8, "val_loss": 0.5},
               {"epoch": 3, "val_acc": 0.7, "val_loss": 0.4}]
    assert kept(history, "val_acc", "best") == (2, 0.8)
    assert kept(history, "val_acc", "last") == (3, 0.7)
    assert kept(history, "val_loss", "best") == (3, 0.4)
    assert kept([], "val_acc", "best") == (None, None)


def test_cli_refuses_a_bad_sweep_before_any_work(probe_table, tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(json.dumps(probe(probe_table, str(tmp_path / "h"))))
    assert main(["train", str(path), "--sweep", "momentum=0.9"]) == 2
    assert capsys.readouterr().err.strip() == ("featurize: --sweep momentum: not a key of the sweep (keys: "
                                               "weight_decay, lr, max_concurrent_trials)")
    assert not (tmp_path / "h").exists()


def test_the_trials_share_one_queue_and_each_line_and_stop_goes_to_its_trial():
    """What a trial's workers put is tagged with the trial (TrialLines) on the training's one queue;
    the driver's reader says each line after its trial's head and keeps a stop for that trial only."""
    class Queue(list):
        put = list.append

    queue, said = Queue(), []
    TrialLines(queue, 1).put("epoch   1/3  loss 0.5")
    TrialLines(queue, 0).put({"stopped": "epoch 2: the train loss is not finite"})
    TrialLines(queue, 1).put("epoch   2/3  loss 0.4")
    sweep = Sweep(weight_decay=[0.0, 0.1], lr=[0.01])
    show = sweep.shown(said.append)
    sweep._heads = ["trial 1/2 (weight_decay 0, lr 0.01)", "trial 2/2 (weight_decay 0.1, lr 0.01)"]
    sweep._stopped = [[], []]
    for item in queue:
        show(item)
    assert said == ["trial 2/2 (weight_decay 0.1, lr 0.01)  epoch   1/3  loss 0.5",
                    "trial 2/2 (weight_decay 0.1, lr 0.01)  epoch   2/3  loss 0.4"]
    assert sweep._stopped == [["epoch 2: the train loss is not finite"], []]
