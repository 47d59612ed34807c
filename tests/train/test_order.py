"""The temporal heads earn their place: on clips whose class is the order of two events (the same
frames in both classes), a trained LSTM's clip features separate the held-out clips while the mean
over frames stays at chance. Real encoded videos, the real extraction job, the training's epochs
(run in this process, train_here.py: Ray Train's own path is test_train.py's), apply."""
from __future__ import annotations

import pytest
import yaml

from pipeline.train import checkpoint as ckpt
from pipeline.train.order_demo import order_loop

from conftest import SMALL_MODEL, run
from train_here import in_process

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.mark.slow
def test_trained_lstm_separates_what_the_mean_cannot(tmp_path, capsys):
    out = tmp_path / "out"
    job = yaml.safe_load(open("jobs/demo_order.yaml"))
    job["output"]["uri"] = str(out / "frames")
    job["model"] = dict(SMALL_MODEL)
    training = yaml.safe_load(open("jobs/demo_order_train.yaml"))
    training["output"]["uri"] = str(out / "head")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(training))

    def extract(path, overrides):
        from pipeline.config import apply_override

        data = yaml.safe_load(open(path))
        for item in overrides:
            apply_override(data, item)
        assert run(data).features == 64

    with in_process():
        accuracy = order_loop(str(tmp_path / "job.yaml"), str(tmp_path / "train.yaml"), str(tmp_path / "videos"),
                              64, extract, say=print)
    assert accuracy["mean"] <= 0.65, accuracy  # 32 held-out clips; the mean holds no order
    # 32 clips trained on and a small backbone: the default LSTM overfits by epoch 7 and its clip
    # feature separates 0.78-0.84 of the held-out clips by nearest centroid (seven runs); 23 of 32 at
    # chance has p ~ 0.01. How close it comes to a tuned loop is bench/train_quality.py's measure.
    assert accuracy["lstm"] >= 0.72, accuracy
    assert "epoch  20/20" in capsys.readouterr().out  # the default train.epochs
    assert ckpt.load(str(out / "head")).classes == ["a_then_b", "b_then_a"]
