"""`import featurize`: the Python API a notebook uses, two runs in one process on one local Ray."""
from __future__ import annotations

import numpy as np
import pytest

import featurize
from conftest import job_dict
from pipeline.config import ConfigError
from pipeline.samples import make_image_folder


@pytest.mark.usefixtures("ray_session")
def test_run_twice_then_open_reads_what_was_written(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    make_image_folder(str(src), n=8, broken=1)
    job = job_dict(str(src), str(out), name="api")
    first = featurize.run(job, {"model.pool": "max"})
    assert (first.features, sum(first.errors.values())) == (8, 1)
    again = featurize.run(job, ["model.pool=max"])  # the same job, the same Ray: nothing left to do
    assert again.samples == 0 and again.skipped == 9

    ids, labels, x = featurize.open(str(out)).to_numpy()
    assert len(ids) == len(set(ids)) == 8 and x.dtype == np.float32 and x.shape == (8, 512)
    df = featurize.open(str(out)).to_pandas()
    assert list(df.columns) == ["sample_id", "label", "split", "feature"] and df["feature"][0].shape == (512,)
    assert sorted(df["label"]) == sorted(labels)
    assert featurize.open(str(out)).errors().num_rows == 1
    assert featurize.open(str(out)).status()["complete"]


def test_a_bad_job_or_training_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.pool"):
        featurize.run(job_dict("src", "out"), {"model.pool": "median"})
    with pytest.raises(ConfigError, match="head.kind"):
        featurize.train({"name": "t", "data": {"uri": "x"}, "head": {"kind": "rnn"}, "output": {"uri": "h"}})
    assert featurize.__version__ and callable(featurize.FeatureDataset) and callable(featurize.apply)


def test_the_command_says_its_version(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"featurize {featurize.__version__}"
