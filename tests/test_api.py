"""`import featurize`: the Python API a notebook uses, two runs in one process on one local Ray."""
from __future__ import annotations

import runpy
from pathlib import Path

import numpy as np
import pytest

import featurize
from pipeline.errors import ConfigError

from conftest import job_dict

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example.py"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.usefixtures("ray_session")
def test_the_example_script_runs_twice_in_one_process_and_reads_what_it_wrote(tmp_path, monkeypatch):
    """docs/example.py as a notebook runs it: run, run again, open, train, apply, a loader; one Ray."""
    monkeypatch.chdir(tmp_path)
    scope = runpy.run_path(str(EXAMPLE))
    assert (scope["summary"].features, sum(scope["summary"].errors.values())) == (40, 4)
    assert scope["again"].samples == 0 and scope["again"].skipped == 44  # the same job: nothing redone

    ids, labels, x = scope["ids"], scope["labels"], scope["x"]
    assert len(ids) == len(set(ids)) == 40 and x.dtype == np.float32 and x.shape == (40, 512)
    assert all(sample_id.startswith(label + "/") for sample_id, label in zip(ids, labels))
    df = featurize.open("out/example").to_pandas()
    assert list(df.columns) == ["sample_id", "label", "split", "feature"] and df["feature"][0].shape == (512,)
    assert sorted(df["label"]) == sorted(labels)
    assert featurize.open("out/example").errors().num_rows == 4
    assert featurize.open("out/example").status()["complete"]

    assert scope["result"].epochs == 3 and len(scope["result"].metrics) == 3
    probs = featurize.open("out/example-probs").table(["sample_id", "probs"])
    assert sorted(probs["sample_id"].to_pylist()) == sorted(ids)
    assert np.allclose(np.asarray(probs["probs"].to_pylist()).sum(axis=1), 1, atol=1e-3)
    assert tuple(scope["batch"]["x"].shape) == (16, 512) and len(scope["dataset"].classes) == 5


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
