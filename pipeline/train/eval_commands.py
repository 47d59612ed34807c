"""`featurize eval CHECKPOINT --input OUT [--split S] [--json]`: a trained head's evaluation (no Ray)."""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

from ..cli_args import add_storage_options
from ..errors import EXIT_OK
from ..redact import redact_text


def add_parsers(sub) -> None:
    ev = sub.add_parser("eval", help="how good a trained head is on a features table: accuracy, top-k, per-class "
                                     "precision/recall/F1, confusion matrix (autoencoder: reconstruction error)")
    ev.add_argument("checkpoint", help="the head's checkpoint directory (featurize train's output.uri)")
    ev.add_argument("--input", required=True, help="a featurize output root with the head's input column (and labels)")
    ev.add_argument("--split", default=None, help="only the rows of this split (default: every row)")
    ev.add_argument("--json", action="store_true", help="print the whole evaluation as JSON")
    ev.add_argument("--allow-other-source", action="store_true",
                    help="evaluate on features of another model, weights or layer than the head was trained on")
    add_storage_options(ev, "fsspec options for the input (and the checkpoint, when on the same store)")
    ev.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_head

    result = evaluate_head(args.checkpoint, args.input, split=args.split, storage_options=args.storage_options,
                           allow_other_source=args.allow_other_source)
    if args.json:
        print(redact_text(json.dumps(result, indent=2, sort_keys=True)))
    else:
        print(format_evaluation(result, where=args.checkpoint.rstrip("/")))
    return EXIT_OK


def format_evaluation(result: Dict[str, Any], where: str = "") -> str:
    """The readable summary `featurize eval` prints (and `train` its first lines)."""
    lines = [f"evaluated    {result['kind']} head on {redact_text(result['input'])} ({result['rows_are']}): "
             f"{result['rows']} rows, on {result['computed_on']}"]
    if "accuracy" in result:
        acc, topk, f1 = result["accuracy"], result.get("top_k_accuracy"), result["macro"]["f1"]
        lines.append(f"accuracy     {_num(acc)}   top-{result['top_k']} {_num(topk)}   macro F1 {_num(f1)}")
        lines.append(f"{'class':<24} {'precision':>9} {'recall':>8} {'f1':>8} {'support':>8}")
        for row in result["per_class"]:
            name = row["class"] if len(row["class"]) <= 24 else row["class"][:23] + "…"
            lines.append(f"{name:<24} {row['precision']:>9.3f} {row['recall']:>8.3f} {row['f1']:>8.3f} "
                         f"{row['support']:>8}")
        unknown = result.get("unknown_labels", {})
        if unknown.get("rows"):
            shown = ", ".join(f"{k}: {v}" for k, v in unknown["labels"].items())
            lines.append(f"unknown      {unknown['rows']} rows with a label the head does not know ({shown}): "
                         "not scored")
    else:
        lines.append(f"recon. error {_num(result['reconstruction_mse'], 5)} (mean squared, per value)")
        probe = result.get("nearest_centroid")
        if probe:
            lines.append(f"centroid acc code {_num(probe['code'])}   input {_num(probe['input'])}   "
                         f"({probe['classes']} labels, nearest class mean, leave one out)")
    if where:
        lines.append(f"written      {', '.join(f'{where}/{f}' for f in result.get('files', []))}")
    return redact_text("\n".join(lines))


def _num(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"
