"""`train.optimizer: lbfgs`: the CLIP paper's linear probe, a full-batch L-BFGS fit of the
L2-regularised multinomial logistic regression

    mean cross-entropy over the training rows + weight_decay / 2 * |W|^2      (the bias unpenalised)

whose optimum is scikit-learn's LogisticRegression(C=1 / (weight_decay * training rows)) on the same
(standardised) rows. For two classes scikit-learn fits one vector, the difference of the two
softmax rows, whose penalty is half of theirs: its C is then 2 / (weight_decay * rows).

The head is fitted in float64: in float32 the line search stopped ~1e-2 (relative) from scikit-learn's
coefficients and moved 1-2 of 180 held-out predictions on bench/train_quality.py's photos tasks; in
float64 every prediction agreed, for C 0.001..100. Each epoch takes up to MAX_ITER iterations: there
the objective stopped changing (1e-6) by epoch 10 of 20 for every C.

With several workers each holds its shard; the closure sums the loss and the gradients over them
(all_reduce, normalised by the rows of all of them), so every worker's line search sees the same
values and takes the same step from the same weights: no DDP, whose hooks would average gradients.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

MAX_ITER = 50  # iterations per epoch (train.epochs of them: 1000 by default)
HISTORY = 10  # curvature pairs kept, as scikit-learn's lbfgs
TOLERANCE_GRAD, TOLERANCE_CHANGE = 1e-9, 1e-12  # float64: stop at an optimum, not at float32's noise
GATHER_BATCH = 4096


def make_optimizer(model) -> torch.optim.LBFGS:
    return torch.optim.LBFGS(model.parameters(), lr=1, max_iter=MAX_ITER, history_size=HISTORY,
                             line_search_fn="strong_wolfe", tolerance_grad=TOLERANCE_GRAD,
                             tolerance_change=TOLERANCE_CHANGE)


def state_dict(optimizer) -> Dict[str, Any]:
    """The optimizer's settings without its curvature history (lists of tensors, which state.py does
    not keep): a resumed fit builds the history anew, towards the same optimum (the objective is convex)."""
    return {"state": {}, "param_groups": optimizer.state_dict()["param_groups"]}


def gather(shard, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """A worker's shard (anything with Ray Data's iter_torch_batches) as (x float64, y): the table is
    held in memory (data.cache), so its rows fit."""
    xs, ys = [], []
    for batch in shard.iter_torch_batches(batch_size=GATHER_BATCH, device=device):
        xs.append(batch["x"])
        ys.append(batch["y"])
    return torch.cat(xs).double(), torch.cat(ys)


def summed(value: torch.Tensor) -> torch.Tensor:
    """`value` summed over the workers (itself with one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
    return value


def _penalty(model, l2: float) -> torch.Tensor:
    return l2 / 2 * sum((p * p).sum() for name, p in model.named_parameters() if not name.endswith("bias"))


def closure(model, optimizer, x, y, l2: float, weight: Optional[torch.Tensor] = None):
    """L-BFGS's closure: the objective over every worker's rows, its gradients in the parameters."""
    rows = summed(torch.tensor(float(len(y)), dtype=torch.float64, device=x.device))

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y, weight=weight, reduction="sum") / rows
        loss.backward()
        for p in model.parameters():
            summed(p.grad)
        penalty = _penalty(model, l2)  # the same weights on every worker: added once, not summed
        penalty.backward()
        return summed(loss.detach()) + penalty.detach()

    return objective


def epoch(model, optimizer, data: Dict[str, Tuple[torch.Tensor, torch.Tensor]], l2: float,
          weight: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """Up to MAX_ITER iterations on the training rows, then the metrics of epochs.py's rows (summed
    over the workers) and the objective and its gradient's largest entry (converged: ~0)."""
    model.train()
    objective = closure(model, optimizer, *data["train"], l2, weight)
    optimizer.step(objective)
    value = objective()  # at the weights the step left, with their gradients
    row = {"objective": value.item(), "grad_max": max(p.grad.abs().max().item() for p in model.parameters())}
    with torch.no_grad():
        model.eval()
        for name, (x, y) in data.items():
            row.update(_metrics(model, x, y, name, weight if name == "train" else None))
    return row


def _metrics(model, x, y, name: str, weight: Optional[torch.Tensor]) -> Dict[str, Any]:
    """Mean cross-entropy (class-weighted for the training rows, as the objective) and accuracy."""
    out = model(x)
    sums = torch.tensor([F.cross_entropy(out, y, weight=weight, reduction="sum").item(),
                         (out.argmax(dim=1) == y).sum().item(), len(y)], dtype=torch.float64, device=x.device)
    loss, correct, rows = summed(sums).tolist()
    metrics = {f"{name}_loss": loss / rows if rows else None, f"{name}_acc": correct / rows if rows else None,
               f"{name}_nonfinite": int(not math.isfinite(loss))}
    if name == "train":
        metrics["train_rows"] = rows
    return metrics
