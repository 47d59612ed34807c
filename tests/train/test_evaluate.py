"""`featurize eval` and featurize.evaluate (pipeline/train/evaluate.py, metrics.py): a head's top-1
and top-k accuracy, per-class precision/recall/F1, confusion matrix; an autoencoder's reconstruction
error and nearest-centroid accuracy. Heads are made with models.build and checkpoint.save, tables with
tables.write_table: only the apply comparison needs Ray."""
from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import featurize
from pipeline.cli import main
from pipeline.errors import EvalError, Refused
from pipeline.output.store import parquet_files
from pipeline.train.checkpoint import save
from pipeline.train.evaluate import evaluate_head
from pipeline.train.metrics import Centroids, Tally, report, topk_hits, unit
from pipeline.train.models import build
from pipeline.train.trainfile import HeadConfig

from tables import order_sequences, write_table

CLASSES = list("abcdefg")  # seven: top-5 differs from top-1 and from everything
PNG = b"\x89PNG\r\n\x1a\n"


def head_folder(path, kind: str, classes=CLASSES, dim: int = 8, column: str = "feature", frames=None, **head):
    """A head saved as `featurize train` saves one; linear: the identity on the first dimensions."""
    config = dataclasses.asdict(HeadConfig(kind=kind, **head))
    model = build(kind, dim, len(classes) or 1, config, seed=1)
    if kind == "linear":
        with torch.no_grad():
            model.net.weight.copy_(torch.eye(len(classes), dim))
            model.net.bias.zero_()
    save(str(path), {}, model, {"kind": kind, "head": config, "classes": classes,
                                "label": "label" if classes else None,
                                "input": {"column": column, "dim": dim, "frames": frames}}, [])
    return str(path)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """70 rows of seven classes (each a bump on its own dimension) and 4 rows labelled 'zebra'."""
    rng = np.random.default_rng(3)
    labels = [CLASSES[i % 7] for i in range(70)] + ["zebra"] * 4
    x = rng.normal(size=(74, 8)).astype(np.float32)
    for i, label in enumerate(labels[:70]):
        x[i, CLASSES.index(label)] += 1.5
    split = ["train" if i % 2 else "test" for i in range(74)]
    root = tmp_path_factory.mktemp("eval-table")
    return write_table(str(root), split, labels, feature=x, rows_per_file=7)


def read(uri: str, columns):
    return pads.dataset(parquet_files_of(uri), format="parquet").to_table(columns=columns)


def parquet_files_of(uri: str):
    import fsspec

    return parquet_files(fsspec.filesystem("file"), f"{uri}/features")


# ---------------------------------------------------------------- the numbers themselves

def test_metrics_equal_hand_computed_values():
    y, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    tally = Tally(3, 2)
    second = np.array([1, 0, 0, 0, 0, 1])  # row 1's second choice is its class, row 5's is not
    tally.add(y, np.eye(3)[pred] + 0.1 * np.eye(3)[second])
    out = report(tally.confusion, ["a", "b", "c"], 2, tally.topk_hits)
    assert out["confusion"]["matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["accuracy"] == pytest.approx(4 / 6)
    assert out["top_k_accuracy"] == pytest.approx(5 / 6)  # row 5 (c: a, then b) is the one miss
    per = {r["class"]: r for r in out["per_class"]}
    assert (per["a"]["precision"], per["a"]["recall"], per["a"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (per["b"]["precision"], per["b"]["recall"], per["b"]["f1"]) == pytest.approx((2 / 3, 1.0, 0.8))
    assert (per["c"]["precision"], per["c"]["recall"], per["c"]["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    assert out["macro"]["f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert [r["support"] for r in out["per_class"]] == [2, 2, 2]


def test_metrics_equal_sklearns():
    metrics = pytest.importorskip("sklearn.metrics")  # a test dependency only
    rng = np.random.default_rng(0)
    y = rng.integers(0, 7, 300)
    y[y == 6] = 5  # class 6 never occurs in the truth: it may still be predicted
    scores = rng.normal(size=(300, 7)) + 1.5 * np.eye(7)[y]
    tally = Tally(7, 5)
    for chunk in np.array_split(np.arange(300), 7):  # batch by batch, as an evaluation reads
        tally.add(y[chunk], scores[chunk])
    out = report(tally.confusion, CLASSES, 5, tally.topk_hits)
    pred = scores.argmax(axis=1)
    assert out["confusion"]["matrix"] == metrics.confusion_matrix(y, pred, labels=range(7)).tolist()
    assert out["top_k_accuracy"] == pytest.approx(metrics.top_k_accuracy_score(y, scores, k=5, labels=range(7)))
    theirs = metrics.classification_report(y, pred, output_dict=True, zero_division=0)
    assert out["accuracy"] == pytest.approx(theirs["accuracy"])
    for i, row in enumerate(out["per_class"]):
        if str(i) in theirs:
            assert [row[k] for k in ("precision", "recall", "f1")] == pytest.approx(
                [theirs[str(i)][k] for k in ("precision", "recall", "f1-score")])
            assert row["support"] == theirs[str(i)]["support"]
    for avg in ("macro", "weighted"):
        assert [out[avg][k] for k in ("precision", "recall", "f1")] == pytest.approx(
            [theirs[f"{avg} avg"][k] for k in ("precision", "recall", "f1-score")])


def test_top_k_takes_the_k_highest_scores():
    scores = np.array([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    assert topk_hits(np.array([2, 2]), scores, 2).tolist() == [True, False]


def test_leave_one_out_centroids_equal_a_direct_computation():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 40)
    x = rng.normal(size=(40, 5)) + np.eye(5)[y] * 1.2
    probe = Centroids(3, 5)
    probe.add(y[:25], x[:25])
    probe.add(y[25:], x[25:])
    probe.score(y, x)
    hits = 0
    for i in range(40):
        others = np.arange(40) != i
        means = np.stack([unit(x[others & (y == c)]).mean(axis=0) for c in range(3)])
        hits += int((unit(means) @ unit(x[i:i + 1])[0]).argmax() == y[i])
    assert probe.accuracy == pytest.approx(hits / 40)


# ---------------------------------------------------------------- a head on a table

@pytest.mark.usefixtures("ray_session")
@pytest.mark.timeout(300)
def test_the_evaluation_equals_a_recomputation_from_applys_pred_column(table, tmp_path):
    """The numbers of `evaluate` are those of apply's pred and probs on the same rows."""
    head = head_folder(tmp_path / "head", "linear")
    featurize.apply(head, table, str(tmp_path / "applied"), progress=False)
    rows = read(str(tmp_path / "applied"), ["label", "split", "pred", "probs"]).to_pylist()
    result = featurize.evaluate(head, table, split="test")
    test = [r for r in rows if r["split"] == "test"]
    known = [r for r in test if r["label"] in CLASSES]
    pairs = Counter((r["label"], r["pred"]) for r in known)
    assert result["confusion"]["matrix"] == [[pairs[(t, p)] for p in CLASSES] for t in CLASSES]
    assert result["accuracy"] == pytest.approx(np.mean([r["label"] == r["pred"] for r in known]))
    top5 = [CLASSES.index(r["label"]) in np.argsort(-np.asarray(r["probs"]), kind="stable")[:5] for r in known]
    assert result["top_k"] == 5 and result["top_k_accuracy"] == pytest.approx(np.mean(top5))
    for row in result["per_class"]:
        c = row["class"]
        tp = pairs[(c, c)]
        predicted = sum(v for (_, p), v in pairs.items() if p == c)
        support = sum(v for (t, _), v in pairs.items() if t == c)
        assert row["support"] == support
        assert row["precision"] == pytest.approx(tp / predicted if predicted else 0.0)
        assert row["recall"] == pytest.approx(tp / support if support else 0.0)
    assert result["rows"] == len(known) == 35 and 0.5 < result["accuracy"] < 1.0
    assert result["unknown_labels"] == {"rows": 2, "labels": {"zebra": 2}}  # counted apart, never scored
    assert result["computed_on"].endswith("(no Ray)")


def test_featurize_eval_prints_a_table_and_writes_json_and_png(table, tmp_path, capsys):
    head = head_folder(tmp_path / "head", "linear")
    assert main(["eval", head, "--input", table, "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert f"evaluated    linear head on {table} (split test): 35 rows, on the CPU" in out
    assert "accuracy     0." in out and "top-5 " in out and "macro F1 0." in out
    assert "class                    precision   recall       f1  support" in out
    assert len([line for line in out.splitlines() if line[:1] in CLASSES and line[1] == " "]) == 7
    assert "unknown      2 rows with a label the head does not know (zebra: 2): not scored" in out
    written = json.loads((tmp_path / "head" / "eval-test.json").read_text())
    assert (tmp_path / "head" / "confusion-test.png").read_bytes()[:8] == PNG
    assert np.asarray(written["confusion"]["matrix"]).sum() == 35 and written["split"] == "test"

    assert main(["eval", head, "--input", table, "--json"]) == 0  # every row, the whole JSON
    everything = json.loads(capsys.readouterr().out)
    assert everything["rows"] == 70 and everything["unknown_labels"]["rows"] == 4
    assert everything == json.loads((tmp_path / "head" / "eval-all.json").read_text())


@pytest.mark.parametrize("case, message", [
    ("not a checkpoint", "no config.json: not a featurize checkpoint"),
    ("no column", "reads column 'frame_features', which"),
    ("no label", "has no label column 'label'"),
    ("unknown split", "--split 'val': {table} has no rows of it (splits: 'test', 'train')"),
    ("split with a slash", "--split"),
])
def test_refusals_are_one_line_and_exit_2(table, tmp_path, capsys, case, message):
    args = ["eval", head_folder(tmp_path / "head", "linear"), "--input", table]
    if case == "not a checkpoint":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif case == "no column":
        args[1] = head_folder(tmp_path / "lstm", "lstm", column="frame_features", frames=4, hidden=4)
    elif case == "no label":
        unlabelled = tmp_path / "unlabelled"
        write_table(str(unlabelled), ["test"] * 4, list("abcd"), feature=np.ones((4, 8), np.float32))
        import pyarrow.parquet as pq

        for f in parquet_files_of(str(unlabelled)):
            pq.write_table(pq.read_table(f).drop_columns(["label"]), f)
        args[3] = str(unlabelled)
    elif case == "unknown split":
        args += ["--split", "val"]
    else:
        args += ["--split", "../x"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(table=table) in err, err
    with pytest.raises(Refused):
        featurize.evaluate(*args[1:2], args[3], split=args[5] if len(args) > 5 else None)


def test_the_api_refuses_bad_arguments(table, tmp_path):
    head = head_folder(tmp_path / "head", "linear")
    with pytest.raises(EvalError, match="split: expected a split name"):
        evaluate_head(head, table, split=3)
    with pytest.raises(EvalError, match="--input: must not be empty"):
        evaluate_head(head, " ")
    with pytest.raises(EvalError, match="splt: not an option of evaluate"):
        featurize.evaluate(head, table, splt="test")


def test_an_lstm_is_scored_on_its_classifiers_logits(tmp_path):
    x, labels = order_sequences(24, frames=4, dim=8)
    uri = write_table(str(tmp_path / "t"), ["val"] * 24, labels, frames=x)
    classes = ["a_then_b", "b_then_a"]
    head = head_folder(tmp_path / "lstm", "lstm", classes=classes, column="frame_features", frames=4, hidden=6)
    result = evaluate_head(head, uri, write=False)
    model = build("lstm", 8, 2, dataclasses.asdict(HeadConfig(kind="lstm", hidden=6)), seed=1).eval()
    with torch.no_grad():  # float16 as stored, then float32
        pred = model(torch.from_numpy(x.astype(np.float16).astype(np.float32)), torch.full((24,), 4)).argmax(1)
    y = np.array([classes.index(v) for v in labels])
    assert result["accuracy"] == pytest.approx(float((pred.numpy() == y).mean()))
    assert result["top_k"] == 2 and result["top_k_accuracy"] == 1.0


def test_an_autoencoder_gets_its_reconstruction_error_and_centroid_accuracies(table, tmp_path):
    head = head_folder(tmp_path / "ae", "autoencoder", classes=[], code_dim=3)
    result = evaluate_head(head, table, split="test")
    t = read(table, ["feature", "split", "label"]).to_pylist()
    x = np.array([r["feature"] for r in t if r["split"] == "test"], np.float32)
    model = build("autoencoder", 8, 1, dataclasses.asdict(HeadConfig(kind="autoencoder", code_dim=3)), seed=1)
    with torch.no_grad():
        mse = float(((model(torch.from_numpy(x)).numpy() - x) ** 2).mean())
    assert result["reconstruction_mse"] == pytest.approx(mse, rel=1e-5) and result["rows"] == 37
    probe = result["nearest_centroid"]
    assert probe["classes"] == 8 and probe["rows"] == 37  # zebra is a label of these rows too
    assert probe["input"] > probe["code"] - 0.5 and 0.3 < probe["input"] <= 1.0  # the bumps separate the input
    assert "confusion" not in result and not (tmp_path / "ae" / "confusion-test.png").exists()
    assert json.loads((tmp_path / "ae" / "eval-test.json").read_text())["reconstruction_mse"] == pytest.approx(mse, rel=1e-5)
