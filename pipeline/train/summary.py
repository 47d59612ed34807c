"""What `featurize train` prints when it ends."""
from __future__ import annotations

from ..console import ray_log_dir
from ..redact import redact_text
from .checkpoint import CURVES, TEMPORAL_NOTE
from .trainfile import TrainConfig


def format_training(cfg: TrainConfig, result) -> str:
    last = result.metrics[-1] if result.metrics else {}
    lines = []
    if result.already_done:
        lines.append(f"nothing to do: {cfg.output.uri} holds this training's checkpoint ({result.epochs} epochs)")
    elif result.resumed_from:
        lines.append(f"resumed      after epoch {result.resumed_from} of an earlier run")
    final = [f"{k} {last[k]:.4f}" for k in ("train_loss", "val_loss", "train_acc", "val_acc")
             if last.get(k) is not None]
    lines.append(f"trained      {cfg.head.kind} on {cfg.data.column}, {result.epochs} epochs"
                 + (f" in {result.wall_s:.1f} s" if result.wall_s else ""))
    if final:
        lines.append(f"final        {', '.join(final)}")
    if getattr(result, "selected_by", ""):
        lines.append(f"kept         {result.selected_by}")
    out = cfg.output.uri.rstrip("/")
    lines.append(f"checkpoint   {out} (curves: {out}/{CURVES})")
    if getattr(result, "sweep", None):
        lines.append(f"sweep        {result.sweep} ({out}/sweep.json, sweep.png)")
    evaluation = getattr(result, "evaluation", None)
    if evaluation and evaluation.get("accuracy") is not None:
        lines.append(f"evaluation   {evaluation['rows_are']}: accuracy {evaluation['accuracy']:.3f}, "
                     f"top-{evaluation['top_k']} {evaluation['top_k_accuracy']:.3f}, macro F1 "
                     f"{evaluation['macro']['f1']:.3f} ({out}/eval.json, confusion.png; featurize eval for more)")
    elif evaluation and evaluation.get("reconstruction_mse") is not None:
        lines.append(f"evaluation   {evaluation['rows_are']}: reconstruction error "
                     f"{evaluation['reconstruction_mse']:.5f} ({out}/eval.json)")
    if cfg.head.kind in ("lstm", "attention"):
        lines.append(TEMPORAL_NOTE.format(kind=cfg.head.kind, out=out))
    lines.append(f"apply it     featurize apply {out} --input {cfg.data.uri} --output OUT2")
    if ray_log_dir() and not result.already_done:  # kept off the console (console.py)
        lines.append(f"ray logs     {ray_log_dir()}")
    return redact_text("\n".join(lines))
