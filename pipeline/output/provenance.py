"""What made a table, in words: the model, family, weights, layer and pool (and temporal heads) of an
extraction; the head and the source table's model of an `apply` output; and, for search and
duplicates, the metric, centring and threshold. Read from the `featurize.*` metadata every features
file carries (FeatureTable.metadata(), the sink's metadata); a visible warning when any of it came
from random weights.

`describe` is the one place that says it: the run summary, the report, and the search and duplicate
pages all show its rows and its warning.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

RANDOM_INIT = "random-init"  # the weights id of a model or temporal head made without trained weights


def random_init_id(seed: int) -> str:
    """The weights id `model.weights: none` (and a temporal head's allow_random_init) records."""
    return f"{RANDOM_INIT}(seed={seed})"


def is_random(weights_id: Any) -> bool:
    return str(weights_id or "").startswith(RANDOM_INIT)


@dataclass
class Provenance:
    rows: List[Tuple[str, str]] = field(default_factory=list)  # (what, value), in the order shown
    warning: Optional[str] = None  # random weights somewhere in what made the table

    def lines(self) -> List[str]:
        """As the summary prints them: `name         value`, the warning last."""
        out = [f"{name:<12} {value}" for name, value in self.rows]
        return out + ([f"{'WARNING':<12} {self.warning}"] if self.warning else [])


def describe(meta: Mapping[str, str], *, metric: Optional[str] = None, center: Optional[bool] = None,
             threshold: Optional[float] = None) -> Provenance:
    """What `meta` (a features file's `featurize.*` metadata) says made the table; `metric`, `center`,
    `threshold`: the search or duplicates settings to name with it (None: not shown)."""
    rows: List[Tuple[str, str]] = []
    random: List[str] = []
    _made(meta, rows, random)
    if metric is not None:
        closer = "higher is closer" if metric == "cosine" else "lower is closer"
        rows.append(("metric", f"{metric} ({closer})"))
    if center is not None:
        rows.append(("centring", "yes: the table's mean is taken off every vector" if center else "no"))
    if isinstance(threshold, (int, float)):
        what = "cosine similarity at or above" if metric in (None, "cosine") else "L2 distance at or below"
        rows.append(("threshold", f"{threshold:g} ({what})"))
    warning = None
    if random:
        warning = (f"random weights: {'; '.join(random)} {'was' if len(random) == 1 else 'were'} never trained, "
                   "so these vectors say nothing learned about the content: for tests and demos only")
    return Provenance(rows, warning)


def of_duplicates(metadata: Optional[Mapping[bytes, bytes]]) -> Optional[Provenance]:
    """What made the table a duplicates table's rows are of, and the metric, centring and threshold
    that grouped them: from its `featurize.duplicates` metadata (find_duplicates writes it); None
    for a groups table made by hand or by an older version."""
    made = _json((metadata or {}).get(b"featurize.duplicates", b"").decode("utf-8", "replace"), {})
    if not isinstance(made.get("metadata"), dict):
        return None
    return describe(made["metadata"], metric=made.get("metric"), center=bool(made.get("center")),
                    threshold=made.get("threshold"))


def _made(meta: Mapping[str, str], rows: List[Tuple[str, str]], random: List[str]) -> None:
    """The rows of one table: an apply output's head, then its source table's (recursively)."""
    if meta.get("featurize.kind") == "apply":
        head, source = applied_head(meta), _json(meta.get("featurize.source"), {})
        classes = head.get("classes") or []
        rows.append(("head", f"{head.get('kind', '?')} from {head.get('uri', '?')}"
                             f"{_sha(head.get('sha256'))}{f', {len(classes)} classes' if classes else ''}"))
        rows.append(("source", str(source.get("uri") or "not recorded")))
        source_meta = source.get("metadata")
        _made(source_meta if isinstance(source_meta, dict) else {}, rows, random)
        return
    model = meta.get("featurize.model")
    if not model:
        rows.append(("model", "unknown: the table's files carry no featurize.* provenance"))
        return
    weights = meta.get("featurize.weights_id", "")
    rows.append(("model", f"{model} ({meta.get('featurize.model_family', '?')})"))
    rows.append(("weights", f"{weights or '?'}{_sha(meta.get('featurize.weights_sha256'))}"))
    pool = meta.get("featurize.pool")
    rows.append(("layer", f"{meta.get('featurize.layer', '?')}{f', pool {pool}' if pool else ''}"))
    if is_random(weights):
        random.append(f"{model} ({weights})")
    heads = [h for h in _json(meta.get("featurize.temporal"), []) if isinstance(h, dict)]
    if heads:
        rows.append(("temporal", "; ".join(_head(h) for h in heads)))
        random += [f"temporal head {h.get('name')} ({h.get('weights')})" for h in heads if is_random(h.get("weights"))]


def applied_head(meta: Mapping[str, str]) -> Dict[str, Any]:
    """An `apply` output's head as its metadata records it (kind, uri, sha256, classes in order ...); {} if none."""
    return _json(meta.get("featurize.head"), {})


def _head(head: Dict[str, Any]) -> str:
    """A temporal head of an extraction: its column, kind and weights (none for mean and max)."""
    weights = head.get("weights")
    return f"clip_{head.get('name')}: {head.get('kind')}{f' ({weights})' if weights else ''}"


def _sha(sha256: Any) -> str:
    return f", sha256 {str(sha256)[:12]}" if sha256 else ""


def _json(text: Optional[str], default: Any) -> Any:
    try:
        value = json.loads(text) if text else default
    except ValueError:  # a file written by hand, or cut: say what can be said
        return default
    return value if isinstance(value, type(default)) else default

