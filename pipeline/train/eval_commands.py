"""`featurize eval CHECKPOINT --input OUT [--split S] [--json]`: a trained head's evaluation (no Ray)."""
from __future__ import annotations

import argparse
import json

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
    from .evaluate import evaluate_head, format_evaluation

    result = evaluate_head(args.checkpoint, args.input, split=args.split, storage_options=args.storage_options,
                           allow_other_source=args.allow_other_source)
    if args.json:
        print(redact_text(json.dumps(result, indent=2, sort_keys=True)))
    else:
        print(format_evaluation(result, where=args.checkpoint.rstrip("/")))
    return EXIT_OK
