"""`featurize apply` under attack (issue 23): a link that names the input, a head trained on other
features, NaN weights, rows whose outputs are not finite, API arguments of the wrong kind."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import featurize
from pipeline.errors import ApplyError
from pipeline.output.tensors import vectors
from pipeline.train.apply import apply_head
from pipeline.train.checkpoint import MODEL, load, save
from pipeline.train.models import build
from pipeline.train.trainfile import HeadConfig

from conftest import assert_exactly_once, read_errors, read_features
from tables import write_table

DIM = 4


def table(root, n=12, model="resnet18", inf_rows=()):
    """n rows of split train (float16), `featurize.model` in every file; rows in inf_rows all inf."""
    x = np.random.default_rng(0).normal(size=(n, DIM)).astype(np.float32)
    x[list(inf_rows)] = np.inf
    write_table(str(root), ["train"] * n, ["a" if i % 2 else "b" for i in range(n)], feature=x)
    for path in sorted(root.rglob("*.parquet")):
        t = pq.read_table(path)
        pq.write_table(t.replace_schema_metadata({"featurize.model": model, "featurize.dim": str(DIM),
                                                  "featurize.dtype": "float16"}), path)
    return [f"s{i:05d}" for i in range(n)]


def head(folder, kind="linear", model="resnet18", scale=None):
    """A head as train saves it; `model`: the provenance of the table it says it was trained on
    (None: an older checkpoint that recorded none); `scale`: multiply its weights (nan to poison them)."""
    config = dataclasses.asdict(HeadConfig(kind=kind, code_dim=2 if kind == "autoencoder" else None))
    classes = [] if kind == "autoencoder" else ["a", "b"]
    net = build(kind, DIM, len(classes) or 1, config)
    if scale is not None:
        with torch.no_grad():
            for p in net.parameters():
                p.mul_(scale)
    source = {"uri": "/t"}
    if model is not None:
        source["lineage"] = {"provenance": {"model": model, "dim": str(DIM)}, "files": 1, "digest": "x"}
    save(str(folder), {}, net, {"kind": kind, "head": config, "classes": classes, "source": source,
                                "input": {"column": "feature", "dim": DIM}}, metrics=[])
    return str(folder)


def test_an_output_that_links_to_the_input_or_the_head_is_refused(tmp_path):
    copy = tmp_path / "copy"
    table(copy)
    alias = tmp_path / "alias"
    os.symlink(copy, alias)
    linear = head(tmp_path / "h")
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    with pytest.raises(ApplyError, match=r"--output .*alias is the input table .* links resolved"):
        apply_head(linear, str(copy), str(alias), overwrite=True)
    os.symlink(tmp_path / "h", tmp_path / "hlink")
    with pytest.raises(ApplyError, match="is the checkpoint directory"):
        apply_head(linear, str(copy), str(tmp_path / "hlink"), overwrite=True)
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before  # the input untouched


def test_a_head_trained_on_other_features_is_refused_unless_allowed(tmp_path, capsys):
    src = tmp_path / "t34"
    table(src, model="resnet34")
    with pytest.raises(ApplyError) as e:
        apply_head(head(tmp_path / "h"), str(src), str(tmp_path / "o"))
    message = str(e.value)
    assert 'model "resnet18" -> "resnet34"' in message and "--allow-other-source" in message and "\n" not in message
    assert not (tmp_path / "o").exists()


@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
def test_allowed_other_features_and_an_older_head_apply_with_a_warning(tmp_path, capsys):
    src = tmp_path / "t34"
    ids = table(src, model="resnet34")
    apply_head(head(tmp_path / "h"), str(src), str(tmp_path / "o"), allow_other_source=True)
    assert_exactly_once(str(tmp_path / "o"), ids)
    assert "applying" in capsys.readouterr().err
    apply_head(head(tmp_path / "old", model=None), str(src), str(tmp_path / "o2"))  # no lineage recorded
    assert "does not record which table it was trained on" in capsys.readouterr().err
    assert_exactly_once(str(tmp_path / "o2"), ids)


def test_a_head_with_non_finite_weights_is_refused(tmp_path):
    src = tmp_path / "t"
    table(src)
    nan = head(tmp_path / "nan", scale=float("nan"))
    with pytest.raises(ApplyError, match=f"nan/{MODEL}: weights that are not finite"):
        apply_head(nan, str(src), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
def test_rows_whose_outputs_are_not_finite_become_error_rows(tmp_path):
    src = tmp_path / "t"
    ids = table(src, inf_rows=(0, 5))
    apply_head(head(tmp_path / "lin"), str(src), str(tmp_path / "o"), batch_size=4)
    features, errors = assert_exactly_once(str(tmp_path / "o"), ids)
    assert sorted(errors) == ["s00000", "s00005"]
    rows = read_errors(str(tmp_path / "o")).to_pylist()
    assert {(r["stage"], r["error_type"]) for r in rows} == {("apply", "NonFiniteFeature")}
    probs = np.asarray(read_features(str(tmp_path / "o"))["probs"].to_pylist())
    assert np.isfinite(probs).all()

    # finite float32 outputs that overflow the table's float16: error rows too, never inf in OUT2
    big = head(tmp_path / "big", kind="autoencoder", scale=1e5)
    apply_head(big, str(src), str(tmp_path / "codes"), allow_other_source=True)
    _, errors = assert_exactly_once(str(tmp_path / "codes"), ids)
    t = read_features(str(src))
    code = load(big).outputs(vectors(t["feature"]), None, "x")["code"]
    over = ~(np.isfinite(code) & (np.abs(code) <= np.finfo(np.float16).max)).all(axis=1)
    expected = set(np.asarray(t["sample_id"].to_pylist())[over])
    assert expected - {"s00000", "s00005"}, "no row overflowed float16: scale the head more"
    assert set(errors) == expected
    codes = np.asarray(read_features(str(tmp_path / "codes"))["code"].to_pylist(), dtype=np.float32)
    assert np.isfinite(codes).all()


@pytest.mark.parametrize("options, message", [
    ({"name": "../x"}, "^name: '../x' is not a plain name"),  # the API's word, not the command's --name
    ({"name": "a-b"}, "letters, digits and _ only"),
    ({"batch_size": "5"}, "batch_size: expected a positive integer"),
    ({"batch_size": True}, "batch_size: expected a positive integer"),
    ({"batch_size": 0}, "batch_size: must be a positive integer"),
    ({"overwrite": "no"}, "overwrite: expected True or False"),
    ({"storage_options": "{}"}, "storage_options: expected a mapping"),
    ({"address": 6379}, "address: expected a Ray address"),
    ({"bogus": 1}, "bogus: not an option of apply"),
])
def test_the_api_refuses_bad_arguments(tmp_path, options, message):
    src = tmp_path / "t"
    table(src)
    with pytest.raises(featurize.Refused, match=message.replace("(", r"\(")):
        featurize.apply(head(tmp_path / "h"), str(src), str(tmp_path / "o"), **options)
    with pytest.raises(featurize.Refused, match="^input: expected a path"):
        featurize.apply(head(tmp_path / "h"), 3, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_a_planted_pickle_as_the_heads_weights_is_refused_never_loaded(tmp_path):
    """checkpoint.py reads safetensors and JSON only: a pickle named model.safetensors does not run."""
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    src = tmp_path / "t"
    table(src)
    planted = head(tmp_path / "h")
    (tmp_path / "h" / MODEL).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ApplyError, match=f"{MODEL} does not fit config.json"):
        apply_head(planted, str(src), str(tmp_path / "o"))
    assert not (tmp_path / "pwned").exists()


def test_a_second_apply_into_a_held_output_is_refused_and_overwrites_nothing(tmp_path):
    """A concurrent second apply (here the lease taken by hand, as a live apply holds it), with
    --overwrite: refused before any work; the first one's files stay as they are."""
    import fsspec

    from pipeline.output.lease import Lease

    src, out2 = tmp_path / "t", tmp_path / "o"
    table(src)
    out2.mkdir()
    held = Lease(fsspec.filesystem("file"), str(out2), str(out2), "other-run").acquire()
    before = sorted(p.name for p in out2.rglob("*"))
    try:
        with pytest.raises(ApplyError, match="is in use by run other-run"):
            apply_head(head(tmp_path / "h"), str(src), str(out2), overwrite=True)
        assert sorted(p.name for p in out2.rglob("*")) == before == ["_lease.json"]
    finally:
        held.release()
