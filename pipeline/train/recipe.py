"""How a head is optimised: AdamW, a learning rate per step (a linear warm-up, then cosine or
constant), gradient-norm clipping for the recurrent heads, and balanced class weights.

The scheduler is torch's LambdaLR over a plain function, so its state_dict is plain numbers
(state.py keeps it in state.json, and a resumed training goes on along the same curve).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np

from .models import TEMPORAL

CLIP_TEMPORAL = 1.0  # the norm an lstm's or attention's gradients are cut to when train.clip_grad is null


def steps_per_epoch(train_rows: int, workers: int, batch_size: int) -> int:
    """Optimizer steps each worker takes per epoch (its share of the rows, the last batch short)."""
    return max(1, math.ceil(math.ceil(train_rows / max(1, workers)) / batch_size))


def shuffle_seed(seed: int, epoch: int) -> int:
    """The seed of the training rows' order in `epoch` (0-based) under train.seed `seed`: a stream of
    its own for each (seed, epoch) pair, as FeatureDataset's default_rng([seed, epoch]). Not
    seed + epoch: then train.seed 1 replayed train.seed 0's row orders one epoch on (19 of 20 epochs
    the same), and trainings averaged over seeds 0..N-1 were not independent draws."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """The learning rate's share at `step` (0-based): rises linearly over `warmup` steps, then stays
    (constant) or falls along a half cosine to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def optimizer_and_schedule(model, config: Dict[str, Any]):
    """(AdamW, its LambdaLR) for the loop config's lr, weight_decay, schedule, warmup, epochs and steps;
    (L-BFGS, None) for train.optimizer lbfgs: its line search sets the step, there is no rate to schedule."""
    import torch

    if config.get("optimizer") == "lbfgs":
        from .lbfgs import make_optimizer

        return make_optimizer(model), None

    optimizer = torch.optim.AdamW(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
    total = config["epochs"] * config["steps_per_epoch"]
    warmup = round(config["warmup"] * total)
    schedule = config["schedule"]

    def factor(step: int) -> float:  # a plain function: LambdaLR's state_dict leaves it out
        return lr_factor(step, total, warmup, schedule)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_norm(kind: str, clip_grad: Optional[float]) -> Optional[float]:
    """The gradients' norm cap: the file's (0: none), else CLIP_TEMPORAL for lstm and attention."""
    if clip_grad is None:
        return CLIP_TEMPORAL if kind in TEMPORAL else None
    return clip_grad or None


def class_weights(classes: List[str], counts: Counter, how: str) -> Optional[List[float]]:
    """balanced: n_samples / (n_classes * count_c) over the training rows' labels, as scikit-learn's
    compute_class_weight("balanced"); a class no training row has (only validation rows) gets 1."""
    if how != "balanced":
        return None
    present = [c for c in classes if counts.get(c, 0) > 0]
    n = sum(counts[c] for c in present)
    return [n / (len(present) * counts[c]) if counts.get(c, 0) > 0 else 1.0 for c in classes]
