"""`featurize report OUT`: the CLI side of the pages (cli.py calls add_parsers)."""
from __future__ import annotations

import argparse
import sys

from ..cli_args import add_storage_options
from ..errors import EXIT_OK
from ..redact import redact_text

ALLOW_HELP = ("a page's thumbnails may also be read under this prefix (repeatable); by default only under "
              "the table's own source (its _job.json): any other URI in the table is shown as not read")


def add_allow_uris(parser: argparse.ArgumentParser) -> None:
    """`--allow-uris PREFIX` of the commands that write pages of a table's rows (search, dedup)."""
    parser.add_argument("--allow-uris", action="append", default=[], metavar="PREFIX", help=ALLOW_HELP)


def add_parsers(sub) -> None:
    report = sub.add_parser("report", help="write OUT/_report.html: time per stage, throughput, errors, "
                                           "feature norms and a PCA projection")
    report.add_argument("out", help="output root (local path or URI)")
    add_storage_options(report, "fsspec options for the output's store")
    report.add_argument("--out", dest="target", default=None, metavar="PATH",
                        help="where the page goes (default: OUT/_report.html)")
    report.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    where = write_report(args.out, args.storage_options, args.target)
    print(f"report       {where}")
    return EXIT_OK


def demo_report(out: str) -> None:
    """`featurize demo`'s last step for the image job: write its report and print where it is."""
    import os

    from .report import write_report

    try:
        where = write_report(out)
    except Exception as e:  # the demo's tables are made; a report that fails says so and the demo goes on
        print(redact_text(f"featurize: the report of {out} failed: {type(e).__name__}: {e}"), file=sys.stderr)
        return
    print(f"report       {os.path.abspath(where) if '://' not in where else where}  (open it in a browser)")
