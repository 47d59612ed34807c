"""The grid of `featurize train --sweep KEY=V1,V2` and featurize.train(sweep=...), checked before any work."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from ..config import ConfigError
from .sweep import KEYS, Sweep


def parse_sweep(given: Union[bool, Sequence[str], Mapping[str, Any], None]) -> Optional[Sweep]:
    """`--sweep` (repeatable, bare or KEY=V1,V2,...) or featurize.train(sweep=True | {key: [values]})
    -> the Sweep, or None for no sweep. Keys: weight_decay, lr, max_concurrent_trials."""
    if given is None or given is False:
        return None
    values: Dict[str, Any] = {}
    if isinstance(given, Mapping):
        values = dict(given)
    elif given is not True:
        if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
            raise ConfigError(f"--sweep: expected True, a mapping or 'key=v1,v2' items, got {type(given).__name__}")
        for item in given:
            if not isinstance(item, str):
                raise ConfigError(f"--sweep: expected 'key=v1,v2' items, got {type(item).__name__}")
            if not item.strip():
                continue  # a bare --sweep: the default grid
            key, sep, text = item.partition("=")
            if not sep:
                raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,... (keys: {', '.join(KEYS)})")
            values[key.strip()] = [v.strip() for v in text.split(",")]
    return _build(values)


def _build(values: Dict[str, Any]) -> Sweep:
    sweep = Sweep()
    for key, value in values.items():
        if key not in KEYS:
            raise ConfigError(f"--sweep {key}: not a key of the sweep (keys: {', '.join(KEYS)})")
        if key == "max_concurrent_trials":
            n = value[0] if isinstance(value, list) and len(value) == 1 else value
            try:
                n = int(n)
            except (TypeError, ValueError):
                raise ConfigError(f"--sweep max_concurrent_trials: expected a positive integer, got {n!r}") from None
            if n < 1:
                raise ConfigError(f"--sweep max_concurrent_trials: expected a positive integer, got {n}")
            sweep.max_concurrent_trials = n
            continue
        setattr(sweep, key, _numbers(key, value))
    return sweep


def _numbers(key: str, value: Any) -> List[float]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in items:
        try:
            number = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"--sweep {key}: {v!r} is not a number") from None
        if not math.isfinite(number) or number < 0 or (key == "lr" and number <= 0):
            raise ConfigError(f"--sweep {key}: {v!r} must be a finite number {'> 0' if key == 'lr' else '>= 0'}")
        out.append(number)
    if not out:
        raise ConfigError(f"--sweep {key}: no values")
    if len(set(out)) != len(out):
        raise ConfigError(f"--sweep {key}: a value is given twice ({', '.join(map(str, items))})")
    return sorted(out)
