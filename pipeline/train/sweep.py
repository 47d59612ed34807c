"""`featurize train --sweep`: the linear-probe protocol, a small grid of weight decay (and learning
rate) tried on the validation rows, the best trial kept as the checkpoint.

Each trial is one Ray Train run of the training's own TorchTrainer (loop.py builds it: the same loop,
the same config, the same datasets, which a small table has materialised in Ray's object store, so
every trial reads the same cached rows) with the trial's values in its train_loop_config. Ray Tune
runs them: in Ray 2.60 Ray Train is its V2, whose trainers a Tuner no longer takes, so each Tune
trial is a function that builds the TorchTrainer and fits it, with TuneReportCallback passing the
epochs' metrics on to Tune (Ray's "Hyperparameter Tuning with Ray Tune" guide for Train V2). The
trials run one at a time by default (`max_concurrent_trials`); a trial's function reserves no CPU,
its Ray Train workers do
(a token 0.01).

Every trial's epochs come from its own last Ray Train checkpoint (state.py), so a rerun after an
interruption resumes each trial where it stopped. The best trial is the one with the best
validation accuracy (validation loss for an autoencoder) at the epoch its checkpoint would hold
(train.select); sweep.json records every trial, sweep.png plots them against the weight decay.

With train.optimizer lbfgs (lbfgs.py) a trial is a converged L2-regularised logistic regression, the
weight decay its coefficient: the default grid is scikit-learn's C 0.001..100 as weight_decay
1 / (C n_train), each trial's C recorded beside it. No 0: an unregularised logistic regression on
separable rows has no optimum (its weights grow without end).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from ..output.store import filesystem, write_atomic
from ..procs import environ
from ..redact import redact_text
from .epoch_lines import TrialLines, shown
from .models import supervised
from .selection import effective
from .train_plan import TrainError

SWEEP_JSON, SWEEP_PNG = "sweep.json", "sweep.png"
DEFAULT_WEIGHT_DECAY = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
LBFGS_C = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # train.optimizer lbfgs: the default grid, as scikit-learn's C
KEYS = ("weight_decay", "lr", "max_concurrent_trials")
TRIAL_CPU = 0.01


@dataclass
class Sweep:
    """The grid (weight_decay None: the optimizer's default, set by prepare(); lr None: the training
    file's), and after `fit` every trial's record."""

    weight_decay: Optional[List[float]] = None
    lr: Optional[List[float]] = None
    max_concurrent_trials: int = 1
    trials: List[Dict[str, Any]] = field(default_factory=list)
    output: Any = None  # (uri, storage options) of the checkpoint directory, set by prepare()
    kind: str = ""
    select: str = "last"
    _heads: List[str] = field(default_factory=list, repr=False)  # each trial's line head, set by fit()
    _stopped: List[List[str]] = field(default_factory=list, repr=False)  # each trial's stop, if any
    local: bool = True  # an embedded Ray (no --address): what it has is all it will have
    optimizer: str = "adamw"  # train.optimizer; lbfgs has no learning rate
    train_rows: int = 0

    def points(self, file_lr: float) -> List[Dict[str, float]]:
        if self.optimizer == "lbfgs":
            return [{"weight_decay": wd} for wd in self.weight_decay]
        return [{"lr": lr, "weight_decay": wd} for lr, wd in itertools.product(self.lr or [file_lr], self.weight_decay)]

    def settings(self, file_lr: float) -> Dict[str, Any]:
        """What of the sweep decides the checkpoint (its fingerprint): the grid, not the concurrency."""
        if self.optimizer == "lbfgs":
            return {"weight_decay": list(self.weight_decay)}
        return {"weight_decay": list(self.weight_decay), "lr": list(self.lr or [file_lr])}

    def c(self, weight_decay: float) -> Optional[float]:
        """scikit-learn's C of an lbfgs trial's weight decay (lbfgs.py), 12 digits: 1 / (weight_decay n_train)."""
        if self.optimizer != "lbfgs" or weight_decay <= 0:
            return None
        return float(f"{1 / (weight_decay * self.train_rows):.12g}")

    def label(self, point: Dict[str, float]) -> str:
        """`weight_decay 0, lr 0.1`; lbfgs: `weight_decay 0.00031 (C 10)`."""
        if self.optimizer == "lbfgs":
            c = self.c(point["weight_decay"])
            return f"weight_decay {point['weight_decay']:g}" + (f" (C {c:g})" if c is not None else "")
        return f"weight_decay {point['weight_decay']:g}, lr {point['lr']:g}"

    def prepare(self, cfg, plan, address: Optional[str] = None) -> None:
        """Refuse a sweep that cannot choose (no validation rows); note where its record goes."""
        self.local = not address
        if not plan.val_rows:
            raise TrainError("--sweep: the sweep chooses on the validation rows and this training has none; set "
                             "data.val_split or data.val_fraction")
        self.output = (cfg.output.uri, cfg.out_options)
        self.kind = plan.kind
        self.select = effective(getattr(cfg.train, "select", "last"), plan.val_rows, cfg.train.optimizer)
        self.optimizer, self.train_rows = cfg.train.optimizer, plan.train_rows
        if self.optimizer == "lbfgs" and self.lr is not None:
            raise TrainError("--sweep lr: train.optimizer lbfgs has no learning rate (its line search sets the "
                             "step); sweep weight_decay only")
        if self.weight_decay is None:
            self.weight_decay = (sorted(1 / (c * plan.train_rows) for c in LBFGS_C) if self.optimizer == "lbfgs"
                                 else list(DEFAULT_WEIGHT_DECAY))

    @property
    def metric(self) -> str:
        return "val_acc" if supervised(self.kind) else "val_loss"

    # ------------------------------------------------------------ the trials (loop._fit calls this)

    def fit(self, trainer, lines) -> Any:
        """Run the grid through Ray Tune; record every trial; return the best trial's Ray Train
        Result (what `trainer.fit()` would have returned for it). `lines` (epoch_lines.EpochLines,
        showing through `shown`) carries every trial's epoch lines."""
        import ray.tune as tune

        run = trainer.run_config
        self._check_room(trainer)
        points = self.points(trainer.train_loop_config["lr"])
        self._heads = [f"trial {i + 1}/{len(points)} ({self.label(p)})" for i, p in enumerate(points)]
        self._stopped = [[] for _ in points]
        parts = {"loop": trainer.train_loop_per_worker, "scaling": trainer.scaling_config,
                 "datasets": trainer.datasets, "config": trainer.train_loop_config,
                 "storage": f"{run.storage_path}/{run.name}", "fs": run.storage_filesystem,
                 "checkpoint_config": run.checkpoint_config}
        # the trial's function only waits on its run: a token CPU (Ray refuses a request of nothing)
        trainable = tune.with_resources(tune.with_parameters(_trial, parts=parts), {"CPU": TRIAL_CPU})
        space = {"train_loop_config": tune.grid_search([{"trial": i, **p} for i, p in enumerate(points)])}
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(metric=self.metric, mode="max" if self.metric == "val_acc"
                                                       else "min", max_concurrent_trials=self.max_concurrent_trials),
                           run_config=tune.RunConfig(name="tune", storage_path=parts["storage"],
                                                     storage_filesystem=parts["fs"], verbose=0))
        try:
            # Tune's console tables and INFO lines stay off the console: the trials' epoch lines are the progress
            with environ("RAY_AIR_NEW_OUTPUT", "0"), _quiet("ray.tune"):
                grid = tuner.fit()
        finally:
            lines.close()  # every trial's lines shown, its stop recorded, before the records are made
        errors = {r.config["train_loop_config"]["trial"]: r.error for r in grid if r.config}
        results = [self._record(i, p, parts, errors.get(i), self._stopped[i]) for i, p in enumerate(points)]
        return self._choose(results)

    def _check_room(self, trainer) -> None:
        """An embedded Ray cannot grow: the trial's token CPU on top of workers that take every CPU
        would wait forever (loop._check_local_resources checked the workers alone)."""
        import ray

        scaling = trainer.scaling_config
        need = TRIAL_CPU + scaling.num_workers * (scaling.resources_per_worker or {}).get("CPU", 1)
        have = ray.cluster_resources().get("CPU", 0)
        if self.local and need > have:
            raise TrainError(f"--sweep: a trial needs {need:g} CPUs (its workers and {TRIAL_CPU:g} for the trial), "
                             f"this machine's Ray has {have:g}; lower train.workers or train.cpus_per_worker")

    def _record(self, i: int, point: Dict[str, float], parts: Dict[str, Any], error, stopped: List[str]):
        """(the trial's record, its Ray Train Result or None), from its own run's last checkpoint."""
        import ray.train

        from . import state as epoch_state

        record: Dict[str, Any] = {"trial": i + 1, **point, "score": None, "epochs": []}
        if self.c(point["weight_decay"]) is not None:
            record["C"] = self.c(point["weight_decay"])
        result = None
        try:
            with _quiet("ray.train"):  # it logs a paragraph about the snapshot it found: that is the point here
                result = ray.train.Result.from_path(f"{parts['storage']}/trial-{i}", parts["fs"])
        except Exception as e:  # no checkpoint at all: the trial failed, or stopped in its first epoch
            record["note"] = f"no epoch saved ({type(e).__name__})"
        if result is not None and result.checkpoint is not None:
            with result.checkpoint.as_directory() as d:
                history = epoch_state.load_folder(d)["history"]  # safetensors and JSON: never a pickle
            record["epochs"] = history
            record["epoch"], record["score"] = kept(history, self.metric, self.select)
        if error is not None:
            record["error"] = redact_text(f"{type(error).__name__}: {str(error).strip().splitlines()[-1:]}")[:500]
        if stopped:
            record["stopped"] = stopped[0]
        return record, result

    def _choose(self, results):
        scored = [(r, res) for r, res in results if r["score"] is not None and math.isfinite(r["score"])]
        if not scored:
            why = "; ".join(f"trial {r['trial']}: {r.get('error') or r.get('stopped') or r.get('note', 'no score')}"
                            for r, _ in results)
            failed = any(r.get("error") for r, _ in results)  # a failure (exit 1), not a value that diverged
            raise (RuntimeError if failed else TrainError)(f"--sweep: no trial finished an epoch ({why})")
        best = max(scored, key=lambda s: s[0]["score"]) if self.metric == "val_acc" else \
            min(scored, key=lambda s: s[0]["score"])
        # the first of equals: the grid's order (smaller lr, then weight decay); under lbfgs the smallest
        # weight decay, the largest C, held out better than the largest on the photo tasks (bench/README.md)
        best[0]["best"] = True
        self.trials = [r for r, _ in results]
        self._write()
        return best[1]

    @property
    def best(self) -> Dict[str, Any]:
        return next(t for t in self.trials if t.get("best"))

    def _write(self) -> None:
        """sweep.json and sweep.png, before the checkpoint's config.json (written last)."""
        from .figures import sweep_png

        uri, options = self.output
        fs, root = filesystem(uri, options)
        root = root.rstrip("/")
        kept = {k: self.best[k] for k in ("trial", "lr", "weight_decay", "C", "score") if k in self.best}
        grid = {"weight_decay": self.weight_decay}
        if self.optimizer == "lbfgs":
            grid["C"] = [self.c(wd) for wd in self.weight_decay]
        else:
            grid["lr"] = sorted({t["lr"] for t in self.trials})
        record = {"metric": self.metric, "select": self.select, "optimizer": self.optimizer, "kept": kept,
                  "grid": grid, "trials": self.trials}
        png = sweep_png(self.trials, self.metric, f"sweep: {self.metric} by weight decay")
        write_atomic(fs, f"{root}/{SWEEP_PNG}", png)
        write_atomic(fs, f"{root}/{SWEEP_JSON}", json.dumps(record, indent=2).encode())

    def summary(self) -> str:
        b = self.best
        return (f"{len(self.trials)} trials, kept trial {b['trial']}: {self.label(b)} ({self.metric} "
                f"{b['score']:.4f} at epoch {b.get('epoch')})")

    def shown(self, say: Callable[[str], None]) -> Callable[[Any], None]:
        """The trials' items (epoch_lines.TrialLines tags them): a line said after its trial's head,
        a stop kept for its trial's record. Only `fit` starts trials, and it names them first."""
        def show(tagged: Any) -> None:
            i, item = tagged
            shown(lambda line: say(f"{self._heads[i]}  {line}"), self._stopped[i])(item)
        return show


def kept(history: List[Dict[str, Any]], metric: str, select: str):
    """(epoch, score) of the epoch a trial's checkpoint holds: the best by `metric` with train.select
    best (the first of equals), else the last."""
    rows = [r for r in history if r.get(metric) is not None]
    if not rows:
        return None, None
    if select == "best":
        row = max(rows, key=lambda r: r[metric]) if metric == "val_acc" else min(rows, key=lambda r: r[metric])
    else:
        row = rows[-1]
    return row["epoch"], float(row[metric])


@contextlib.contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _trial(config: Dict[str, Any], parts: Dict[str, Any]) -> None:
    """One Tune trial: the training's TorchTrainer with this trial's values, its run under
    OUT/_train/<fingerprint>/trial-<i> (a rerun resumes it there)."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    values = dict(config["train_loop_config"])
    i = values.pop("trial")
    trainer = TorchTrainer(
        parts["loop"], train_loop_config={**parts["config"], **values,
                                          "lines": TrialLines(parts["config"]["lines"], i)},
        scaling_config=parts["scaling"], datasets=parts["datasets"],
        run_config=ray.train.RunConfig(name=f"trial-{i}", storage_path=parts["storage"],
                                       storage_filesystem=parts["fs"], checkpoint_config=parts["checkpoint_config"],
                                       callbacks=[TuneReportCallback()]))
    trainer.fit()
