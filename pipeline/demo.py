"""The demo's folders: it writes only where it may, and removes only what it made itself.

`featurize demo --job X --data D` generates sample data into D and replaces X's output.uri on every
run. A folder the demo makes carries a mark file; a folder that exists with content and no mark
belongs to someone else, and the demo refuses to touch it rather than delete or pollute it.
"""
from __future__ import annotations

import os
import shutil

from .errors import ConfigError

MARK = "_made_by_featurize_demo"  # a name no reader or lister takes up (leading _, no extension)


def check(folder: str, key: str) -> str:
    """The local path of `folder` if the demo may use it: absent, empty, or marked by an earlier
    demo run. Anything else is refused, naming `key`; nothing is written."""
    if "://" in folder and not folder.startswith("file://"):
        raise ConfigError(f"{key}: {folder}: the demo writes to local folders only")
    folder = folder[len("file://"):] if folder.startswith("file://") else folder
    if os.path.exists(folder):
        if not os.path.isdir(folder):
            raise ConfigError(f"{key}: {folder} is a file; the demo needs a folder of its own")
        if os.listdir(folder) and not os.path.exists(os.path.join(folder, MARK)):
            raise ConfigError(f"{key}: {folder} holds files the demo did not create; it neither removes nor "
                              "adds to them: choose another folder, or remove it yourself")
    return folder


def claim(folder: str, key: str, clear: bool = False) -> None:
    """Make `folder` the demo's (see check) and mark it; `clear` empties it first (the demo's own
    earlier output)."""
    folder = check(folder, key)
    if clear and os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, MARK), "w") as f:
        f.write("made by `featurize demo`, which replaces this folder's content when it runs again\n")
