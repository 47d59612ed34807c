"""Names that become parts of paths (a vector column under OUT/_index, a head's name in
`clip_<name>`, a training's name): one check, so that no name read from a table, a job file or a
command line can walk out of the folder it is meant for."""
from __future__ import annotations

import re

from .errors import UnsafeName

PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def is_plain(value: object) -> bool:
    """Letters, digits, '_', '.', '-'; at most 128; not starting with '.' or '-'; no '..'."""
    return isinstance(value, str) and PLAIN.fullmatch(value) is not None and ".." not in value


def plain_name(value: object, what: str) -> str:
    """`value` when it is plain; otherwise a one-line refusal naming `what` (a key, a column)."""
    if not is_plain(value):
        raise UnsafeName(f"{what}: {value!r} is not a plain name (letters, digits, '_', '.', '-'; at most 128 "
                         "characters; not starting with '.' or '-'); it becomes part of a path")
    return value  # type: ignore[return-value]
