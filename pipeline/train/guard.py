"""Checks of what `train` and `apply` are handed, before any of it reaches torch, Ray or a store:
the API's arguments (types and values), apply's output root against its input and its head (after
resolving links), and the head's input provenance against the table it is applied to. Each is a
one-line refusal (a featurize.Refused) naming the argument, never a raw error from deeper down.
"""
from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Dict, Mapping, Sequence

from ..errors import BadArgument, Refused, TableError
from ..names import plain_name
from ..output.store import filesystem
from ..output.tensors import SEQUENCE, VECTOR
from ..redact import redact_text

# what a head's input is, of a table's lineage (table.lineage()): another model, weights, layer,
# pooling, preprocessing or head upstream makes other features, whatever their dimension
INPUT_KEYS = ("model", "model_family", "weights_id", "weights_sha256", "layer", "pool", "preprocess", "head")


def _is(value: Any, types, nullable: bool = False) -> bool:
    if value is None:
        return nullable
    return isinstance(value, types) and not (types is int and isinstance(value, bool))


def check(key: str, value: Any, types, what: str, nullable: bool = False, error=BadArgument) -> None:
    if not _is(value, types, nullable):
        raise error(f"{key}: expected {what}{' or None' if nullable else ''}, got {_shown(value)}")


def _shown(value: Any) -> str:
    text = redact_text(repr(value))
    return f"{type(value).__name__} {text[:60]}"


def check_train_call(training: Any, overrides: Any, address: Any, say: Any, verbose: Any, overwrite: Any) -> None:
    """featurize.train's arguments (the training file's own values are config.py's)."""
    import dataclasses

    if not (isinstance(training, (str, Mapping)) or (dataclasses.is_dataclass(training)
                                                     and not isinstance(training, type))):
        raise BadArgument(f"training: expected a training file's path or its mapping, got {_shown(training)}")
    if isinstance(training, str) and not training.strip():
        raise BadArgument("training: must not be empty")
    _overrides(overrides)
    check("address", address, str, "a Ray address (str)", nullable=True)
    if say is not None and not callable(say):
        raise BadArgument(f"say: expected a function of one line (or None), got {_shown(say)}")
    check("verbose", verbose, bool, "True or False")
    check("overwrite", overwrite, bool, "True or False")


def _overrides(overrides: Any) -> None:
    if overrides is None:
        return
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            check("overrides key", key, str, "a dotted key (str)")
            try:
                json.dumps(value, allow_nan=True)
            except (TypeError, ValueError):
                raise BadArgument(f"overrides[{key!r}]: expected a YAML value (str, number, bool, list, "
                                  f"mapping), got {_shown(value)}") from None
        return
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise BadArgument(f"overrides: expected a mapping or a list of 'key=value', got {_shown(overrides)}")
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise BadArgument(f"overrides: expected 'key=value' items, got {_shown(item)}")


def check_apply_args(checkpoint: Any, input_uri: Any, output_uri: Any, name: Any, storage_options: Any,
                     output_storage_options: Any, address: Any, flags: Dict[str, Any], batch_size: Any,
                     error=BadArgument) -> None:
    """apply_head's arguments, before anything is read."""
    for key, value in (("checkpoint", checkpoint), ("--input", input_uri), ("--output", output_uri)):
        check(key, value, str, "a path or URI (str)", error=error)
        if not value.strip():
            raise error(f"{key}: must not be empty")
    if name is not None:
        try:
            plain_name(name, "--name")
        except Refused as e:
            raise error(str(e)) from None
        if not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise error(f"--name {name!r}: letters, digits and _ only (it names the column clip_<name>)")
    check("storage_options", storage_options, dict, "a mapping (dict)", nullable=True, error=error)
    check("output_storage_options", output_storage_options, dict, "a mapping (dict)", nullable=True, error=error)
    check("address", address, str, "a Ray address (str)", nullable=True, error=error)
    for key, value in flags.items():
        check(key, value, bool, "True or False", error=error)
    check("batch_size", batch_size, int, "a positive integer", nullable=True, error=error)
    if batch_size is not None and batch_size < 1:
        raise error(f"batch_size: must be a positive integer, got {batch_size}")


# ---------------------------------------------------------------- apply: roots and provenance

def _real(uri: str, options: Dict[str, Any]):
    """(protocol, the root with links resolved when local): two names of one folder compare equal."""
    from ..output.store import is_local

    fs, root = filesystem(uri, options)
    root = root.rstrip("/")
    if is_local(fs):
        root = os.path.realpath(root)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, root


def refuse_same_root(input_uri: str, in_options: Dict[str, Any], output_uri: str, out_options: Dict[str, Any],
                     checkpoint: str, ck_options: Dict[str, Any], error=BadArgument) -> None:
    """--output must be a folder of its own: not the input table (or inside its features or errors),
    not the head's checkpoint directory, whatever links name them."""
    p_out, out = _real(output_uri, out_options)
    p_in, root_in = _real(input_uri, in_options)
    if p_in == p_out and (out == root_in or any(out.startswith(f"{root_in}/{t}") for t in ("features", "errors"))):
        raise error(f"--output {output_uri} is the input table {input_uri} (or inside it, links resolved): "
                    "apply writes a new table; choose another --output")
    try:
        p_ck, root_ck = _real(checkpoint, ck_options)
    except Exception:  # a checkpoint URI that cannot be opened: load() says so, naming it
        return
    if p_ck == p_out and out == root_ck:
        raise error(f"--output {output_uri} is the checkpoint directory {checkpoint} (links resolved): "
                    "choose another --output")


def check_fits(head, table, checkpoint: str, input_uri: str, temporal: bool, error=BadArgument) -> str:
    """The head's input column in the table: present, of sequences for a `temporal` head (vectors
    otherwise), of the head's dimension. Returns its shape (tensors.SEQUENCE or VECTOR)."""
    column, dim = head.input["column"], int(head.input["dim"])
    if column not in table.schema.names:
        raise error(f"checkpoint {checkpoint} reads column {column!r}, which {input_uri} does not have "
                    f"(columns: {', '.join(table.schema.names)})")
    try:
        shape, found = table.shape(column, key="--input")
    except TableError as e:
        raise error(str(e)) from None
    wanted = SEQUENCE if temporal else VECTOR
    if shape != wanted:
        raise error(f"checkpoint {checkpoint} is a {head.kind} head over {wanted}s of {column}, but {column} in "
                    f"{input_uri} holds {shape}s")
    if found != dim:
        raise error(f"checkpoint {checkpoint} expects {column} of dimension {dim}, {input_uri} has dimension {found}")
    return shape


def check_input(head, table, checkpoint: str, input_uri: str, allow: bool, error=BadArgument) -> None:
    """The head's input provenance (recorded at training) against the table's: another model, weights,
    layer ... is refused unless `allow`; a head that recorded none (an older checkpoint) is applied
    with a warning on stderr."""
    recorded = (head.config.get("source") or {}).get("lineage")
    if not isinstance(recorded, dict) or not isinstance(recorded.get("provenance"), dict):
        _warn(f"featurize: checkpoint {checkpoint} does not record which table it was trained on (an older "
              f"checkpoint): its input is not checked against {input_uri}'s provenance")
        return
    have = table.lineage()["provenance"]
    was = recorded["provenance"]
    diff = [f"{k} {json.dumps(was.get(k))} -> {json.dumps(have.get(k))}"
            for k in INPUT_KEYS if was.get(k) != have.get(k)]
    if diff and not allow:
        raise error(f"checkpoint {checkpoint} was trained on other features than {input_uri}'s (the head's -> "
                    f"the table's: {', '.join(diff)}); pass --allow-other-source to apply it anyway")
    if diff:
        _warn(f"featurize: applying {checkpoint} to other features than it was trained on ({', '.join(diff)})")


def _warn(line: str) -> None:
    print(redact_text(line), file=sys.stderr, flush=True)

