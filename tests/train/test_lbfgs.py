"""`train.optimizer: lbfgs` (pipeline/train/lbfgs.py): the full-batch L-BFGS fit of the L2-regularised
logistic regression is scikit-learn's LogisticRegression(C=1 / (weight_decay n)); its refusals; and
`--sweep` over its weight decay, which keeps the trial scikit-learn's C sweep would."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train import checkpoint as ckpt
from pipeline.train import lbfgs
from pipeline.train import state as epoch_state
from pipeline.train.loop import TrainError, plan_training, train
from pipeline.train.models import build
from pipeline.train.selection import Selection, effective
from pipeline.train.sweep import LBFGS_C, SWEEP_JSON
from pipeline.train.sweep_args import parse_sweep
from pipeline.train.trainfile import parse_training

from tables import write_table

sklearn = pytest.importorskip("sklearn.linear_model")

CLASSES = ["a", "b", "c"]


def three_classes(n: int, seed: int, dim: int = 6):
    """(x, y): three overlapping classes (imbalanced 3:2:1), so the L2 strength changes the predictions."""
    rng = np.random.default_rng(seed)
    y = rng.choice(3, size=n, p=[0.5, 1 / 3, 1 / 6])
    centres = rng.normal(0, 1.0, (3, dim))
    x = (centres[y] + rng.normal(0, 1.3, (n, dim))) * rng.uniform(0.5, 3, dim) + rng.normal(0, 2, dim)
    return x.astype(np.float16).astype(np.float64), y  # as the table holds them


def fit(x, y, l2: float, weight=None, epochs: int = 20):
    model = build("linear", x.shape[1], 3, {"kind": "linear", "normalize": "none"}).double()
    optimizer = lbfgs.make_optimizer(model)
    data = {"train": (torch.from_numpy(x), torch.from_numpy(y))}
    rows = [lbfgs.epoch(model, optimizer, data, l2, weight) for _ in range(epochs)]
    return model, optimizer, rows


@pytest.mark.parametrize("c, balanced", [(0.1, False), (1.0, False), (1.0, True)])
def test_the_fit_is_scikit_learns_logistic_regression(c, balanced):
    x, y = three_classes(240, seed=1)
    mean, std = x[:160].mean(0), x[:160].std(0)
    z = (x - mean) / std
    train, held = slice(0, 160), slice(160, None)
    n = 160
    weights = n / (3 * np.bincount(y[train], minlength=3)) if balanced else None
    model, _, rows = fit(z[train], y[train], 1 / (c * n), None if weights is None else torch.from_numpy(weights))
    reference = sklearn.LogisticRegression(C=c, tol=1e-10, max_iter=10_000,
                                           class_weight=dict(enumerate(weights)) if balanced else None)
    reference.fit(z[train], y[train])
    w, b = model.net.weight.detach().numpy(), model.net.bias.detach().numpy()
    assert np.abs(w - reference.coef_).max() <= 1e-3 * np.abs(reference.coef_).max()
    # the bias is unpenalised: defined up to a constant added to every class's
    assert b - b.mean() == pytest.approx(reference.intercept_ - reference.intercept_.mean(), abs=1e-3)
    got = model(torch.from_numpy(z[held])).argmax(1).numpy()
    assert (got == reference.predict(z[held])).all()
    assert abs(rows[-1]["objective"] - rows[-2]["objective"]) < 1e-9 and rows[-1]["grad_max"] < 1e-5  # converged
    assert rows[-1]["train_acc"] == pytest.approx((model(torch.from_numpy(z[train])).argmax(1).numpy()
                                                   == y[train]).mean())


def _fit_a_shard(rank: int, world: int, init: str, x, y, l2: float, out: str) -> None:
    """One worker of a two-process fit: its half of the rows, the loss and gradients all-reduced."""
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model, _, rows = fit(x[rank::world], y[rank::world], l2)
        if rank == 0:
            torch.save({"state": model.state_dict(), "rows": rows}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_two_workers_each_with_half_the_rows_fit_what_one_process_fits(tmp_path):
    """train.workers 2: each worker holds its shard and the closure sums the loss and the gradients
    over them (an all-reduce per evaluation, as under Ray Train's process group): the same optimum
    as one process with every row, and the same metrics (summed over the shards)."""
    x, y = three_classes(200, seed=3)
    z = (x - x.mean(0)) / x.std(0)
    l2 = 1 / (1.0 * 200)
    out = tmp_path / "rank0.pt"
    torch.multiprocessing.spawn(_fit_a_shard, args=(2, f"file://{tmp_path / 'rendezvous'}", z, y, l2, str(out)),
                                nprocs=2, join=True)
    two = torch.load(out)
    one, _, rows = fit(z, y, l2)
    for name, value in one.state_dict().items():
        assert torch.allclose(two["state"][name], value, atol=1e-6), name
    assert two["rows"][-1]["train_rows"] == 200  # the metrics count every worker's rows
    assert two["rows"][-1]["objective"] == pytest.approx(rows[-1]["objective"], rel=1e-9)
    assert two["rows"][-1]["train_acc"] == pytest.approx(rows[-1]["train_acc"])


def test_a_shard_is_gathered_in_float64_and_the_state_saves_without_its_history(tmp_path):
    class Shard:  # Ray Data's iter_torch_batches, in two batches
        def iter_torch_batches(self, batch_size, device):
            return iter([{"x": torch.ones(3, 2), "y": torch.tensor([0, 1, 2])},
                         {"x": torch.zeros(1, 2), "y": torch.tensor([1])}])

    x, y = lbfgs.gather(Shard(), "cpu")
    assert x.dtype == torch.float64 and x.shape == (4, 2) and y.tolist() == [0, 1, 2, 1]
    model, optimizer, _ = fit(*three_classes(30, seed=2), l2=0.1, epochs=1)
    epoch_state.save(str(tmp_path), model.state_dict(), lbfgs.state_dict(optimizer), [], 0)
    again = lbfgs.make_optimizer(model)
    again.load_state_dict(epoch_state.load_folder(str(tmp_path))["optimizer"])
    assert again.param_groups[0]["max_iter"] == lbfgs.MAX_ITER and not again.state


# ---------------------------------------------------------------- refusals, before any work

def lbfgs_file(uri: str, out: str, kind: str = "linear", **data):
    return {"name": "probe", "data": {"uri": uri, "column": "feature", "val_split": "val", **data},
            "head": {"kind": kind}, "train": {"optimizer": "lbfgs", "epochs": 5}, "output": {"uri": out}}


@pytest.fixture(scope="module")
def probe_table(tmp_path_factory):
    """Three classes: 120 training rows, 60 validation rows, 90 held out (split test)."""
    x, y = three_classes(270, seed=0)
    split = ["train"] * 120 + ["val"] * 60 + ["test"] * 90
    return write_table(str(tmp_path_factory.mktemp("lbfgs")), split, [CLASSES[v] for v in y],
                       feature=x.astype(np.float32)), x, y


def test_lbfgs_keeps_the_last_epoch_its_converged_fit():
    assert effective("best", 300, "lbfgs") == "last" and effective("best", 300) == "best"
    chosen = Selection(True, "best", None, val_rows=300, optimizer="lbfgs")
    for epoch, acc in ((1, 0.9), (2, 0.8)):
        chosen.update({"epoch": epoch, "val_acc": acc, "val_loss": 0.5}, {"w": torch.zeros(1)})
    assert chosen.weights is None and chosen.selected_by(2) == (2, "last: train.optimizer lbfgs keeps its "
                                                                   "converged fit (epoch 2 of 2)")


def test_lbfgs_fits_a_linear_head_only():
    with pytest.raises(ConfigError, match="^train.optimizer: lbfgs fits a linear probe \\(head.kind linear\\), not mlp"):
        parse_training(lbfgs_file("t", "h", kind="mlp"))
    assert parse_training(lbfgs_file("t", "h")).train.optimizer == "lbfgs"
    assert parse_training({**lbfgs_file("t", "h"), "train": {}}).train.optimizer == "auto"  # the default (below)


def test_lbfgs_needs_the_table_held_in_memory(probe_table, tmp_path):
    cfg = parse_training(lbfgs_file(probe_table[0], str(tmp_path / "h"), cache=0))
    with pytest.raises(TrainError, match="^data.cache: train.optimizer lbfgs .* over data.cache 0 "
                                         "\\(raise data.cache, or use train.optimizer adamw\\)$"):
        train(cfg)
    with pytest.raises(TrainError, match="^--sweep lr: train.optimizer lbfgs has no learning rate"):
        train(parse_training(lbfgs_file(probe_table[0], str(tmp_path / "h"))), sweep=parse_sweep(["lr=0.1,1"]))
    assert not (tmp_path / "h").exists()


def test_the_default_grid_of_lbfgs_is_scikit_learns_cs(probe_table):
    cfg = parse_training(lbfgs_file(probe_table[0], "h"))
    sweep = parse_sweep(True)
    sweep.prepare(cfg, plan_training(cfg)[1])
    assert sweep.weight_decay == pytest.approx(sorted(1 / (c * 120) for c in LBFGS_C))
    assert [sweep.c(wd) for wd in sweep.weight_decay] == sorted(LBFGS_C, reverse=True)
    assert sweep.settings(0.01) == {"weight_decay": sweep.weight_decay}  # no learning rate
    assert sweep.points(0.01)[0] == {"weight_decay": sweep.weight_decay[0]}
    assert sweep.label(sweep.points(0.01)[0]) == f"weight_decay {sweep.weight_decay[0]:g} (C 100)"
    adamw = parse_sweep(True)
    adamw.prepare(parse_training({**lbfgs_file(probe_table[0], "h"), "train": {"optimizer": "adamw"}}),
                  plan_training(cfg)[1])
    assert adamw.weight_decay == [0.0, 1e-4, 1e-3, 1e-2, 1e-1]


@pytest.mark.parametrize("kind, sweep, cache, chosen", [
    ("linear", True, "1GiB", "lbfgs"), ("linear", False, "1GiB", "adamw"), ("linear", True, 0, "adamw"),
    ("mlp", True, "1GiB", "adamw")])
def test_train_optimizer_auto_is_lbfgs_for_a_linear_probes_sweep_on_a_table_in_memory(probe_table, kind, sweep,
                                                                                      cache, chosen):
    from pipeline.train.loop import _optimizer

    spec = {**lbfgs_file(probe_table[0], "h", kind=kind, cache=cache), "train": {}}
    cfg = parse_training(spec)
    plan = plan_training(cfg)[1]
    said = []
    resolved = _optimizer(cfg, plan, 40_000, parse_sweep(True) if sweep else None, said.append)
    assert resolved.train.optimizer == chosen
    # the plan records what was resolved: adamw as before the key existed (old checkpoints resume)
    assert plan.settings["train"].get("optimizer", "adamw") == chosen
    assert bool(said) == (sweep and kind == "linear")  # the choice is said when the sweep made it


# ---------------------------------------------------------------- on Ray Train

@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_sweep_keeps_the_c_scikit_learn_would_and_predicts_as_it_does(probe_table, tmp_path):
    uri, x, y = probe_table
    cs = (0.1, 10.0)  # val 0.867 and 0.850 (scikit-learn): the second of the grid wins
    grid = [1 / (c * 120) for c in cs]
    out = tmp_path / "h"
    spec = lbfgs_file(uri, str(out))
    del spec["train"]["optimizer"]  # auto: a linear probe's sweep fits by lbfgs
    spec["train"]["cpus_per_worker"] = 0.5  # the two trials at once, of the session's two CPUs
    result = train(parse_training(spec), say=None, sweep=parse_sweep({"weight_decay": grid, "max_concurrent_trials": 2}))
    record = json.loads((out / SWEEP_JSON).read_text())
    assert record["optimizer"] == "lbfgs" and record["grid"]["C"] == sorted(cs, reverse=True)

    z = (x - x[:120].mean(0)) / x[:120].std(0)  # head.normalize standard: the training rows' statistics
    fitted = {c: sklearn.LogisticRegression(C=c, tol=1e-10, max_iter=10_000).fit(z[:120], y[:120]) for c in cs}
    val = {c: (m.predict(z[120:180]) == y[120:180]).mean() for c, m in fitted.items()}
    assert {t["C"]: t["score"] for t in record["trials"]} == pytest.approx(val)
    best = max(val.values())
    expected = next(c for c in sorted(cs, reverse=True) if val[c] == best)  # the first of equals: the smaller λ
    assert record["kept"]["C"] == expected and f"(C {expected:g})" in result.sweep
    assert len(set(val.values())) > 1  # the trials differ: the choice is a real one

    config = json.loads((out / ckpt.CONFIG).read_text())  # the converged fit, not the luckiest epoch
    assert config["selected_by"] == "last: train.optimizer lbfgs keeps its converged fit (epoch 5 of 5)"
    head = ckpt.load(str(out))
    with torch.no_grad():
        got = head.model(torch.from_numpy(x[180:].astype(np.float32))).argmax(1).numpy()
    codes = np.asarray([head.classes.index(CLASSES[v]) for v in fitted[expected].predict(z[180:])])
    assert (got == codes).all()  # the checkpoint predicts the held-out rows as scikit-learn does at that C

    order = [CLASSES.index(k) for k in head.classes]
    probs = head.outputs(x[180:].astype(np.float32), None, "")["probs"]
    assert np.abs(probs - fitted[expected].predict_proba(z[180:])[:, order]).max() < 1e-3
