"""Trained heads by default against a careful reference, on the same features and the same split.

    .venv/bin/python bench/train_quality.py [--videos 120] [--clips 360] [--photos 60] [--only order photos]
    .venv/bin/python bench/train_quality.py --no-apply --sweep   # also featurize train --sweep (linear: L-BFGS)
    .venv/bin/python bench/train_quality.py --no-apply --sweep --sweep-optimizer adamw   # the probes' sweep by AdamW
    .venv/bin/python bench/train_quality.py --grid      # the measurement the train.* defaults come from

For each task (bench/quality_tasks.py: the order videos, synthetic sequences, photo classes and an
imbalanced variant) and head, the DEFAULT training file (only data.uri, data.column, head.kind and
output.uri) goes through `featurize train` and `featurize apply` (its `pred` column on the held-out
split `test`; with --no-apply, and for --sweep, the checkpoint's model on the same rows), against
the reference: scikit-learn's LogisticRegression on standardised features with C chosen on the
validation rows for `linear`, a plain standardised PyTorch loop with the same head for the others
(quality_tasks.py). Both train on the same rows: split train less the 10% the default validates on.
Target: ratio >= 0.97.

--grid runs the reference loop's recipe (standardised inputs, AdamW, warm-up and cosine) over
lr x epochs x batch on every task and head and prints the mean held-out accuracy of each recipe.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import quality_tasks as tasks  # noqa: E402

OUT = os.path.join(HERE, "out", "train_quality")
HEADS = {"order": ("frame_features", ["lstm"]), "sequences": ("frame_features", ["lstm", "attention"]),
         "photos": ("feature", ["linear", "mlp"]), "photos-imbalanced": ("feature", ["linear", "mlp"])}
SWEPT = ("linear", "mlp")  # --sweep: the probes (the linear-probe protocol)


def make_tasks(args) -> dict:
    os.makedirs(OUT, exist_ok=True)
    made = {}
    for name in args.only:
        if name == "order":
            made[name] = tasks.order_task(OUT, args.videos)
        elif name == "sequences":
            made[name] = tasks.sequence_task(OUT, args.clips)
        else:
            made[name] = tasks.photo_task(OUT, args.photos, args.photos // 2, imbalanced=name.endswith("imbalanced"))
    return made


def default_accuracy(task: str, uri: str, kind: str, column: str, d: dict, via_apply: bool = True, sweep=None,
                     seed: int = 0, optimizer: str = "auto"):
    """(held-out accuracy, the checkpoint's selected_by) of the default training file (with `sweep`:
    of `featurize train --sweep`, the default grid unless given, and its kept trial; `optimizer`:
    its train.optimizer)."""
    from pipeline.output.table import open_table
    from pipeline.train import checkpoint as ckpt
    from pipeline.train.apply import apply_head
    from pipeline.train.loop import train
    from pipeline.train.sweep_args import parse_sweep
    from pipeline.train.trainfile import parse_training

    out = os.path.join(OUT, "heads", f"{task}-{kind}" + ("-sweep" if sweep is not None else "")
                       + ("-" + optimizer if optimizer != "auto" else ""))
    shutil.rmtree(out, ignore_errors=True)
    data = {"name": f"quality-{task}-{kind}", "data": {"uri": uri, "column": column}, "head": {"kind": kind},
            "output": {"uri": out}}
    train_keys = {**({"seed": seed} if seed else {}), **({"optimizer": optimizer} if optimizer != "auto" else {})}
    cfg = parse_training({**data, "train": train_keys} if train_keys else data)  # seed 0, auto: the default file
    result = train(cfg, say=lambda line: None, sweep=parse_sweep(sweep))
    kept = result.sweep or result.selected_by  # --sweep: its kept trial
    if sweep is not None:
        via_apply = False  # the kept trial's checkpoint, predicted as below
    applied = f"{out}-applied"
    shutil.rmtree(applied, ignore_errors=True)
    if via_apply:
        apply_head(out, uri, applied, name=kind)
    t = open_table(applied).dataset().to_table().sort_by("sample_id") if via_apply else None
    if t is not None and "pred" in t.schema.names:
        test = np.asarray(t["split"].to_pylist(), dtype=object) == "test"
        pred = np.asarray(t["pred"].to_pylist(), dtype=object)[test]
        truth = np.asarray(t["label"].to_pylist(), dtype=object)[test]
        return float((pred == truth).mean()), kept
    head = ckpt.load(out)  # lstm/attention before apply writes pred (or --no-apply): the checkpoint's model
    x, lengths = d["x"][d["test"]], None if d["lengths"] is None else d["lengths"][d["test"]]
    import torch

    with torch.no_grad():
        logits = head.model(torch.from_numpy(x), None if lengths is None else torch.from_numpy(lengths))
    codes = np.asarray([head.classes.index(c) for c in np.asarray(d["classes"])[d["y"][d["test"]]]])
    return float((logits.argmax(1).numpy() == codes).mean()), kept


def reference(d: dict, kind: str, args) -> tuple:
    if kind == "linear":
        acc, c = tasks.logistic_reference(d)
        return acc, f"logistic regression, C={c:g} ({'scikit-learn' if tasks._has_sklearn() else 'torch L-BFGS'})"
    accs = [tasks.loop_reference(d, kind, args.lr, args.epochs, args.batch, seed=s) for s in range(args.seeds)]
    return float(np.mean(accs)), f"loop lr {args.lr:g}, {args.epochs} epochs, batch {args.batch}"


def table(made: dict, args) -> None:
    from pipeline.jobrun import init_ray

    init_ray(None)
    print("| task | head | rows train/val/test | default | reference | ratio | default kept | reference is |"
          + (" sweep | sweep ratio | sweep kept |" if args.sweep else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|---|" if args.sweep else ""))
    for task, uri in made.items():
        column, kinds = HEADS[task]
        d = tasks.rows(uri, column)
        n = f"{d['train'].sum()}/{d['val'].sum()}/{d['test'].sum()}"
        for kind in [k for k in kinds if not args.heads or k in args.heads]:
            ref, how = reference(d, kind, args)
            runs = [default_accuracy(task, uri, kind, column, d, args.apply, seed=s)
                    for s in range(args.default_seeds)]
            got, kept = float(np.mean([r[0] for r in runs])), runs[0][1]
            if args.default_seeds > 1:
                kept = f"seeds {' / '.join(f'{r[0]:.3f}' for r in runs)}; seed 0: {kept}"
            line = f"| {task} | {kind} | {n} | {got:.3f} | {ref:.3f} | {got / ref:.2f} | {kept} | {how} |"
            if args.sweep and kind in SWEPT and (args.sweep_optimizer != "lbfgs" or kind == "linear"):
                swept, trial = default_accuracy(task, uri, kind, column, d, sweep=args.sweep_grid or True,
                                                optimizer=args.sweep_optimizer)
                line += f" {swept:.3f} | {swept / ref:.2f} | {trial} |"
            print(line, flush=True)


def grid(made: dict, args) -> None:
    """Mean held-out accuracy of each recipe of the reference loop over every task and head."""
    data = {task: tasks.rows(uri, HEADS[task][0]) for task, uri in made.items()}
    pairs = [(task, kind) for task in made for kind in HEADS[task][1]
             if (kind != "linear" or args.grid_linear) and f"{task}:{kind}" not in args.grid_skip]
    print("| lr | epochs | batch | " + " | ".join(f"{t} {k}" for t, k in pairs) + " | mean |")
    print("|---" * (len(pairs) + 4) + "|")
    for lr, epochs, batch in itertools.product(args.grid_lr, args.grid_epochs, args.grid_batch):
        accs = [np.mean([tasks.loop_reference(data[t], k, lr, epochs, batch, seed=s) for s in range(args.seeds)])
                for t, k in pairs]
        print(f"| {lr:g} | {epochs} | {batch} | " + " | ".join(f"{a:.3f}" for a in accs)
              + f" | {np.mean(accs):.3f} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="+", choices=list(HEADS), default=list(HEADS))
    p.add_argument("--heads", nargs="+", choices=sorted({k for _, ks in HEADS.values() for k in ks}), default=None,
                   help="only these head kinds of the tasks (default: all)")
    p.add_argument("--videos", type=int, default=120, help="order videos (2/3 of the scenes train)")
    p.add_argument("--clips", type=int, default=360, help="synthetic sequences (1/3 held out)")
    p.add_argument("--photos", type=int, default=60, help="training crops a class (half as many held out)")
    p.add_argument("--lr", type=float, default=None, help="the reference loop's (default: train.lr's default)")
    p.add_argument("--epochs", type=int, default=None, help="the reference loop's (default: train.epochs')")
    p.add_argument("--batch", type=int, default=None, help="the reference loop's (default: train.batch_size's)")
    p.add_argument("--seeds", type=int, default=2, help="reference loop runs averaged")
    p.add_argument("--default-seeds", type=int, default=1, help="default trainings (train.seed 0..N-1) averaged")
    p.add_argument("--no-apply", dest="apply", action="store_false",
                   help="predict with the checkpoint's model (Checkpoint.outputs, what apply runs) without apply's job")
    p.add_argument("--sweep", action="store_true", help="also `featurize train --sweep` for the linear and mlp heads")
    p.add_argument("--sweep-grid", nargs="*", default=None, help="--sweep's KEY=V1,V2 items (default: its grid)")
    p.add_argument("--sweep-optimizer", choices=["auto", "adamw", "lbfgs"], default="auto",
                   help="--sweep's train.optimizer (auto, the default: lbfgs for the linear head, adamw for the "
                        "mlp; lbfgs: the linear head only, the mlp is not swept)")
    p.add_argument("--grid", action="store_true", help="the recipe measurement instead of the table")
    p.add_argument("--grid-lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--grid-epochs", type=int, nargs="+", default=[20, 40])
    p.add_argument("--grid-batch", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--grid-linear", action="store_true", help="the linear head in the grid too")
    p.add_argument("--grid-skip", nargs="*", default=[], help="task:head pairs left out of the grid")
    args = p.parse_args()
    from pipeline.train.trainfile import TrainSettings

    defaults = TrainSettings()
    args.lr = args.lr or defaults.lr
    args.epochs = args.epochs or defaults.epochs
    args.batch = args.batch or defaults.batch_size
    made = make_tasks(args)
    grid(made, args) if args.grid else table(made, args)


if __name__ == "__main__":
    main()
