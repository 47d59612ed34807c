"""What decides an output (a run's OUT, a training's checkpoint): its settings' fingerprint, and the
settings that differ when another run or training finds one there."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Dict, List, Tuple


def fingerprint(settings: Dict[str, Any]) -> str:
    """16 hex digits of the settings' JSON (keys sorted): the same settings, the same output."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def flat(settings: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Nested settings as dotted keys (`head.hidden`), so a difference names its key."""
    out: Dict[str, Any] = {}
    for k, v in settings.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed(old: Dict[str, Any], new: Dict[str, Any],
            same: Callable[[str, Any, Any], bool] = lambda k, a, b: a == b) -> List[Tuple[str, str]]:
    """(key, `old -> new` in JSON) for every key whose values differ, sorted by key."""
    return [(k, f"{json.dumps(old.get(k))} -> {json.dumps(new.get(k))}")
            for k in sorted(set(old) | set(new)) if not same(k, old.get(k), new.get(k))]
