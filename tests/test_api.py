"""`import featurize`: the Python API a notebook uses, two runs in one process on one local Ray."""
from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import featurize
from pipeline.errors import ConfigError, TableError, api_words

from conftest import job_dict
from tables import fixed, windows, write_table

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "docs" / "example.py"


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


def test_a_refusal_names_the_apis_arguments_where_the_command_names_its_flags(tmp_path, capsys):
    from pipeline.cli import main
    from pipeline.errors import OutputExists

    job, out = job_dict(str(tmp_path / "src"), str(tmp_path / "out")), str(tmp_path / "out")
    with pytest.raises(OutputExists) as e:
        featurize.run(job, overwrite=True, retry_failed=True)
    assert str(e.value) == "overwrite=True and retry_failed=True: choose one"
    with pytest.raises(OutputExists) as e:
        featurize.run(job, overwrite=True, incremental=True)
    assert str(e.value) == "overwrite=True and incremental=True: choose one (overwrite=True lists the source anew anyway)"
    with pytest.raises(OutputExists) as e:
        featurize.run(job, retry_failed=True)
    assert str(e.value) == f"retry_failed=True: output.uri {out} holds no output to retry"
    with pytest.raises(ConfigError) as e:
        featurize.run(job, ["model.arch"])
    assert str(e.value) == "overrides 'model.arch': expected KEY=VALUE, e.g. model.arch=resnet18"

    (tmp_path / "job.yaml").write_text(json.dumps(job))  # the command's words stay the command's
    capsys.readouterr()
    assert main(["run", str(tmp_path / "job.yaml"), "--overwrite", "--retry-failed"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the `starting` line
    assert last == "featurize: --overwrite and --retry-failed: choose one"
    assert main(["run", str(tmp_path / "job.yaml"), "--set", "model.arch"]) == 2
    assert capsys.readouterr().err.strip() == "featurize: --set 'model.arch': expected KEY=VALUE, e.g. model.arch=resnet18"


def test_api_words_change_the_flags_it_knows_only():
    assert api_words("run with --overwrite to train anew; pass --allow-other-source to apply it anyway") == (
        "run with overwrite=True to train anew; pass allow_other_source=True to apply it anyway")
    assert api_words("--sweep lr: no values; --column: x; choose another --output") == (
        "sweep lr: no values; column: x; choose another output")
    kept = "run featurize index out --rebuild; s3://b/--overwrite-me/x --overwrites --output-storage-options"
    assert api_words(kept) == kept  # other flags, and words that only contain one, are left as they are


@pytest.mark.parametrize("verbose", [False, True])
def test_rays_native_noise_is_kept_off_a_notebooks_stderr_unless_verbose(tmp_path, monkeypatch, capfd, verbose):
    """The core worker writes its ray#53727 line to descriptor 2, which a notebook's kernel shows as
    the cell's stderr; Python's sys.stderr there is a stream of the kernel's, as pytest's is here.
    The API's calls that start Ray filter the line as the command does (verbose=True: everything)."""
    import os

    from pipeline.console import NATIVE_NOISE

    def run_job(job, **modes):  # the run, as far as stderr sees it
        os.write(2, b"[core_worker.cc:123] Actor " + NATIVE_NOISE[0] + b" ray#53727\n")
        os.write(2, b"a native line kept\n")
        print("a python line", file=sys.stderr)
        return "summary"

    monkeypatch.setattr("pipeline.extract.runner.run_job", run_job)
    assert sys.stderr.fileno() != 2  # as in a notebook
    before = sorted(os.listdir("/proc/self/fd"))
    assert featurize.run(job_dict(str(tmp_path / "src"), str(tmp_path / "out")), verbose=verbose) == "summary"
    assert sorted(os.listdir("/proc/self/fd")) == before  # a notebook calls it again and again: nothing left open
    err = capfd.readouterr().err
    assert "a native line kept" in err and "a python line" in err
    assert ("constructor arguments in the object store" in err) is verbose


def test_the_command_says_its_version(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"featurize {featurize.__version__}"


# -- featurize.open: every kind of table read back, as written (tables in run's and apply's layouts) --

N, D, T, CLASSES = 12, 6, 5, ["cat", "dog"]


def f16(x):
    """The values as a float16 column stores them (every comparison below is exact)."""
    return x.astype(np.float16).astype(np.float32)


def table_of(tmp_path, name, **kwargs):
    """(the output, its labels, where: row read back -> row written; files come back in path order)."""
    labels = [CLASSES[i % 2] for i in range(N)]
    split = ["train" if i < 8 else "test" for i in range(N)]
    out = featurize.open(write_table(str(tmp_path / name), split, labels, rows_per_file=5, **kwargs))
    written = {sid: i for i, sid in enumerate(kwargs.get("rows", {}).get("sample_id") or [f"s{i:05d}" for i in range(N)])}
    return out, labels, lambda ids: np.array([written[sid] for sid in ids])


def one_line_refusal(read, *needles):
    with pytest.raises(TableError) as e:
        read()
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_an_image_table_reads_back_exactly_in_every_form(tmp_path):
    pl = pytest.importorskip("polars")
    x = np.random.default_rng(0).normal(size=(N, D))
    out, labels, where = table_of(tmp_path, "images", feature=x)

    ids, got_labels, got = out.to_numpy()  # the 3-tuple of before, unchanged
    order = where(ids)
    assert got.dtype == np.float32 and np.array_equal(got, f16(x)[order])
    assert list(got_labels) == [labels[i] for i in order]
    df = out.to_pandas()
    assert list(df.columns) == ["sample_id", "label", "split", "feature"]
    assert np.array_equal(np.stack(df["feature"]), got) and list(df["sample_id"]) == list(ids)
    torch_x = out.to_torch().x
    assert torch_x.dtype.is_floating_point and np.array_equal(torch_x.numpy(), got)
    pf = out.to_polars()
    assert pf.schema["feature"] == pl.Array(pl.Float32, D) and np.array_equal(pf["feature"].to_numpy(), got)

    one_line_refusal(lambda: out.to_numpy("clip_mean"), "column: ", "has no feature column 'clip_mean'",
                     "(feature columns: feature (vector))")
    one_line_refusal(lambda: out.to_pandas("label"), "has no feature column 'label'")


def windowed_video(tmp_path):
    """A video table as a windowed run writes it: two 4 s windows per video (ids v<j>.avi#w<k>),
    clip_mean and clip_lstm, and frame_features of unequal lengths (a video's last window is shorter)."""
    rng = np.random.default_rng(1)
    frames = rng.normal(size=(N, T, D))
    lengths = np.array([T if i % 2 == 0 else 3 for i in range(N)])
    clips = windows([2] * (N // 2))
    out, labels, where = table_of(tmp_path, "video", feature=frames.mean(1), column="clip_mean", rows=clips,
                                  frames=frames, lengths=lengths, columns={"clip_lstm": fixed(rng.normal(size=(N, 4)))})
    return out, labels, where, frames, lengths, clips


def test_a_windowed_video_table_reads_its_clip_column_and_its_frame_sequences(tmp_path):
    pl = pytest.importorskip("polars")
    out, labels, where, frames, lengths, clips = windowed_video(tmp_path)

    ids, _, x = out.to_numpy()  # clip_mean: the first clip_<head>, as featurize index takes it
    order = where(ids)
    assert np.array_equal(x, f16(frames.mean(1))[order])
    df = out.to_pandas()
    assert list(df.columns) == ["sample_id", "label", "split", "start_s", "end_s", "clip_mean"]
    assert list(df["sample_id"]) == [clips["sample_id"][i] for i in order]  # v<j>.avi#w<k>
    assert list(df["start_s"]) == [clips["start_s"][i] for i in order] and list(df["end_s"]) == [clips["end_s"][i] for i in order]
    assert np.stack(out.to_pandas("clip_lstm")["clip_lstm"]).shape == (N, 4)

    seq = out.to_numpy("frame_features")
    ids, got_labels, x, got_lengths = seq  # sequences unpack as four
    order = where(ids)
    assert x.dtype == np.float32 and x.shape == (N, T, D) and np.array_equal(got_lengths, lengths[order])
    for i, row in enumerate(order):
        n = lengths[row]
        assert np.array_equal(x[i, :n], f16(frames[row, :n])) and not x[i, n:].any()  # zero after the clip
    assert list(got_labels) == [labels[i] for i in order]

    cells = out.to_pandas("frame_features")["frame_features"]  # one (T_i, D) array per row
    assert [c.shape for c in cells] == [(lengths[r], D) for r in order]
    assert all(np.array_equal(c, x[i, :len(c)]) and c.dtype == np.float32 for i, c in enumerate(cells))
    tx = out.to_torch("frame_features")
    assert np.array_equal(tx.x.numpy(), x) and np.array_equal(tx.lengths.numpy(), got_lengths)
    pf = out.to_polars("frame_features")
    assert pf.schema["frame_features"] == pl.List(pl.Array(pl.Float32, D))
    assert [np.array_equal(np.asarray(v.to_list(), np.float32), c) for v, c in zip(pf["frame_features"], cells)] == [True] * N
    assert list(pf["start_s"]) == list(df["start_s"])


@pytest.mark.parametrize("kind", ["lstm", "autoencoder", "linear"])
def test_an_apply_output_reads_back_by_the_index_rule_with_its_predictions(tmp_path, kind):
    """What `featurize apply` writes per head kind (Checkpoint.columns): clip_<name>, pred, probs for a
    temporal head; code for an autoencoder; pred, probs for a classifier."""
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([1, 1], size=N).astype(np.float32)
    pred = pa.array([CLASSES[i] for i in probs.argmax(1)])
    code = rng.normal(size=(N, 3))
    columns, expected = {
        "lstm": ({"clip_seq": fixed(code, np.float32), "pred": pred, "probs": fixed(probs, np.float32)},
                 ("clip_seq", code)),
        "autoencoder": ({"code": fixed(code)}, ("code", f16(code))),
        "linear": ({"pred": pred, "probs": fixed(probs, np.float32)}, ("probs", probs)),
    }[kind]
    out, _, where = table_of(tmp_path, kind, columns=columns)

    ids, _, x = out.to_numpy()
    order = where(ids)
    column, values = expected
    assert np.array_equal(x, values.astype(np.float32)[order])
    df = out.to_pandas()
    assert list(df.columns) == ["sample_id", "label", "split", *(["pred"] if "pred" in columns else []), column]
    if "pred" in columns:
        assert list(df["pred"]) == [pred[i].as_py() for i in order]
        assert np.array_equal(out.to_numpy("probs").x, probs[order])


def test_tables_that_cannot_be_read_as_asked_are_one_line_refusals(tmp_path):
    frames = np.random.default_rng(3).normal(size=(N, T, D))
    out, _, _ = table_of(tmp_path, "frames-only", frames=frames)
    one_line_refusal(out.to_numpy, "has no vector column to read", "(feature columns: frame_features (sequence))")
    assert out.to_numpy("frame_features").x.shape == (N, T, D)
    one_line_refusal(featurize.open(str(tmp_path / "nothing")).to_pandas, "holds no features table")
    nulls, _, _ = table_of(tmp_path, "nulls", columns={"feature": pa.array([None] * N, pa.list_(pa.float16(), D))})
    one_line_refusal(nulls.to_pandas, f"column 'feature' of {tmp_path}/nulls: {N} rows have no vector")
