"""Which epoch the checkpoint keeps (`train.select`), and when to stop early (`train.patience`).

Classifiers rank epochs by validation accuracy, ties to the lower validation loss; the autoencoder
by validation loss. Every worker sees the same all-reduced metrics (epochs.py), so every worker
takes the same decision; rank 0 saves the best epoch's weights in the epoch state (state.py), and
the record below in state.json, so a resumed training keeps its best so far.

`best` needs MIN_VAL_ROWS validation rows: on fewer, an accuracy moves by 1/n a row and the best
epoch is mostly the luckiest one (measured, bench/README.md: on the order task's 8 validation rows
`best` kept epoch 1 of 20, 0.675 held out, where the last epoch gave 0.91), so the last is kept
and the checkpoint says why. Under train.optimizer lbfgs the last epoch is kept too: its fit
converges to the one optimum of the regularised objective, and an earlier epoch is a half-way point
chosen by the same luck (measured, bench/README.md: on the photos task `best` kept epoch 1 of 20 of
every trial, its 50 iterations short of the optimum).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

MIN_VAL_ROWS = 30


def effective(select: str, val_rows: int, optimizer: str = "adamw") -> str:
    """train.select as it applies to a training with `val_rows` validation rows and train.optimizer."""
    return "last" if select == "best" and (0 < val_rows < MIN_VAL_ROWS or optimizer == "lbfgs") else select


class Selection:
    def __init__(self, supervised: bool, select: str, patience: Optional[int], record: Optional[Dict] = None,
                 val_rows: int = 0, optimizer: str = "adamw"):
        self.metric = "val_acc" if supervised else "val_loss"
        self.asked, self.val_rows, self.optimizer = select, val_rows, optimizer
        self.select, self.patience = effective(select, val_rows, optimizer), patience
        self.record: Dict[str, Any] = dict(record or {})  # {"epoch", "value", "loss", "key"} of the best epoch so far
        self.weights = None  # the best epoch's state dict (on CPU), when select is best

    def _key(self, row: Dict[str, Any]) -> Optional[Tuple[float, float]]:
        """Larger is better; None: the epoch has no validation metric."""
        loss = row.get("val_loss")
        if loss is None:
            return None
        if self.metric == "val_acc" and row.get("val_acc") is not None:
            return (row["val_acc"], -loss)
        return (-loss, 0.0)

    def update(self, row: Dict[str, Any], state_dict) -> bool:
        """Record the epoch if it is the best so far (keeping its weights); True if it is."""
        key = self._key(row)
        if key is None:
            return False
        if self.record and key <= tuple(self.record["key"]):
            return False
        self.record = {"epoch": row["epoch"], "value": row[self.metric], "loss": row["val_loss"], "key": list(key)}
        if self.select == "best":
            self.weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
        return True

    def stop(self, epoch: int) -> Optional[str]:
        """Why to stop after `epoch` (1-based), or None: `patience` epochs passed without a better one."""
        if self.patience is None or not self.record or epoch - self.record["epoch"] < self.patience:
            return None
        return (f"stopped early after epoch {epoch}: {self.metric} not better for {self.patience} epochs "
                f"(train.patience)")

    def selected_by(self, epochs_run: int, early: Optional[str] = None) -> Tuple[int, str]:
        """(the epoch the checkpoint holds, why): e.g. "best val_acc 0.9300 at epoch 7 of 20"."""
        end = f" of {epochs_run}" + (" (stopped early, train.patience)" if early else "")
        if self.select == "best" and self.record:
            value = f"{self.record['value']:.4f}"
            return self.record["epoch"], f"best {self.metric} {value} at epoch {self.record['epoch']}{end}"
        if self.select == "best":
            return epochs_run, f"last: no validation rows to choose the best epoch by (epoch {epochs_run}{end})"
        if self.asked == "best" and self.optimizer == "lbfgs":
            return epochs_run, f"last: train.optimizer lbfgs keeps its converged fit (epoch {epochs_run}{end})"
        if self.asked == "best":
            return epochs_run, (f"last: {self.val_rows} validation rows are too few to choose the best epoch by "
                                f"(best needs {MIN_VAL_ROWS}; epoch {epochs_run}{end})")
        return epochs_run, "last"
