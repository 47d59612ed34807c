"""Command-line pieces every command shares (cli.py, index/, pages/): the JSON options type."""
from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Dict, Optional

from .errors import BadOption


def json_object(flag: str) -> Callable[[str], Dict[str, Any]]:
    """argparse type of a JSON-object flag. It raises a Refused, which argparse lets through (it
    catches only ValueError and TypeError), so cli.main prints it on one line and exits 2."""
    def parse(text: str) -> Dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError as e:
            raise BadOption(f"{flag}: not JSON ({e})") from None
        if not isinstance(value, dict):
            raise BadOption(f"{flag}: a JSON object is needed, e.g. '{{\"anon\": true}}'; got {text!r}")
        return value
    return parse


def add_storage_options(parser: argparse.ArgumentParser, help: str = "fsspec options for OUT's store",
                        flag: str = "--storage-options", default: Optional[dict] = None) -> None:
    parser.add_argument(flag, type=json_object(flag), default={} if default is None else default,
                        metavar="JSON", help=help)
