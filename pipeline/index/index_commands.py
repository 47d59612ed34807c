"""`featurize index | search | dedup`: the CLI of the similarity index (no Ray)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

from ..cli_args import add_storage_options
from ..errors import EXIT_OK, BadOption
from ..output.provenance import of_duplicates
from ..pages.page_commands import add_allow_uris
from ..redact import redact_text
from .options import KINDS, METRICS

CENTER_HELP = ("cosine of the vectors minus the table's mean: a backbone's features share a large common part "
               "that pushes every cosine towards 1")


def add_parsers(sub) -> None:
    index = sub.add_parser("index", help="build or update a faiss index over a features table (OUT/_index/)")
    _common(index)
    index.add_argument("--kind", choices=KINDS, default="auto",
                       help="auto: exact search for small tables, IVF with a measured recall for large ones")
    index.add_argument("--metric", choices=METRICS, default="cosine", help="default: cosine")
    index.add_argument("--center", action="store_true", help=CENTER_HELP)
    index.add_argument("--rebuild", action="store_true", help="index the whole table again (a damaged index is "
                       "rebuilt without it)")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="the nearest samples to an id, an image, a video or a text")
    _common(search)
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--id", dest="sample_id", help="a sample_id of the table; VIDEO#S: the clip of a "
                       "video starting at S seconds")
    query.add_argument("--image", help="an image file, embedded with the table's own model and preprocessing")
    query.add_argument("--video", help="a video file, embedded with the table's model and temporal head")
    query.add_argument("--text", help="a text (open_clip tables only)")
    search.add_argument("-k", type=int, default=10, help="how many neighbours (default: 10)")
    search.add_argument("--json", action="store_true", help="print the query and hits as JSON")
    search.add_argument("--html", default=None, metavar="PATH", help="also write a page with thumbnails")
    add_allow_uris(search)
    search.set_defaults(func=cmd_search)

    dedup = sub.add_parser("dedup", help="near-duplicate groups of a features table, as a Parquet table")
    _common(dedup)
    dedup.add_argument("--threshold", type=float, default=0.95,
                       help="cosine similarity at or above which two rows are duplicates (l2: distance at or below)")
    dedup.add_argument("--center", action="store_true", default=None,
                       help=CENTER_HELP + " (default: as the table's index was built)")
    dedup.add_argument("--out", dest="dedup_out", default=None,
                       help="where the groups table goes (default: OUT/_duplicates/<column>.parquet)")
    dedup.add_argument("--html", default=None, metavar="PATH", help="also write a page of the groups as thumbnails")
    add_allow_uris(dedup)
    dedup.set_defaults(func=cmd_dedup)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output root of a featurize run (local path or URI)")
    parser.add_argument("--column", default=None, help="the vector column (default: feature, else clip_<head>)")
    add_storage_options(parser)


def _say(line: str) -> None:
    print(redact_text(line), file=sys.stderr)


def cmd_index(args: argparse.Namespace) -> int:
    from .build import build_index

    meta = build_index(args.out, args.storage_options, args.column, kind=args.kind, metric=args.metric,
                       center=args.center, rebuild=args.rebuild)
    print(describe(meta, args.out))
    return EXIT_OK


def describe(meta: Dict[str, Any], out: str) -> str:
    where = f"{redact_text(out.rstrip('/'))}/_index/{meta['column']}"
    params = ", ".join(f"{k} {v}" for k, v in {**meta.get("params", {}), **meta.get("search", {})}.items())
    lines = [f"index    {where}: {meta['action']} ({meta['reason']}), {meta['added_rows']} rows added",
             f"kind     {meta['kind']}{f' ({params})' if params else ''}, metric {meta['metric']}"
             f"{' (centred)' if meta.get('center') else ''}, "
             f"{meta['rows']} rows of {meta['column']} (D={meta['dim']}) from {len(meta['files'])} files"]
    if meta.get("skipped"):
        lines.append(f"skipped  {meta['skipped']} rows without a finite vector (null, inf or NaN): not indexed")
    recall = meta.get("recall")
    if meta.get("exact"):
        lines.append("recall   exact search (recall 1.0)")
    elif recall:
        lines.append(f"recall   recall@{recall['at']} {recall['value']:.3f} against exact search on "
                     f"{recall['queries']} of the table's rows (measured at build, {recall['rows']} rows; "
                     f"target {recall['target']})")
    return "\n".join(lines)


def cmd_search(args: argparse.Namespace) -> int:
    from .search import open_index
    from .search import query as nearest

    if args.k < 1:
        raise BadOption(f"-k {args.k}: at least 1")
    index = open_index(args.out, args.storage_options, args.column)
    if index.note:
        _say(f"featurize: {index.note}")
    about = index.provenance()
    if about.warning:
        _say(f"featurize: WARNING: {about.warning}")
    query, hits = nearest(index, args.out, args.storage_options, sample_id=args.sample_id, image=args.image,
                          video=args.video, text=args.text, k=args.k)
    if args.html:
        from ..pages.html import search_page

        page = search_page(query, hits, args.storage_options, table=args.out, allow_uris=args.allow_uris,
                           about=about)
        _write_text(args.html, page, args.storage_options)
    if args.json:
        print(json.dumps({"query": query, "column": index.column, "metric": index.metric, "hits": hits}, indent=1))
    else:
        print(format_hits(hits, index.metric))
    return EXIT_OK


def format_hits(hits: List[Dict[str, Any]], metric: str) -> str:
    """One line per hit: rank, score, label, the clip's span when the rows are a video's clips, the
    row's own sample_id (as --json shows it and --id takes it) and its uri."""
    clips = any(h.get("start_s") is not None for h in hits)

    def span(text: str) -> str:
        return f"{text:<14} " if clips else ""

    lines = [f"{'rank':>4}  {'score' if metric == 'cosine' else 'distance':>8}  {'label':<16} {span('clip')}"
             "sample_id  uri"]
    for h in hits:
        times = f"{h['start_s']:g}-{h['end_s']:g} s" if h.get("start_s") is not None else ""
        lines.append(f"{h['rank']:>4}  {h['score']:>8.4f}  {h['label'][:16]:<16} {span(times)}{h['sample_id']}  "
                     f"{h['uri']}")
    return redact_text("\n".join(lines))


def cmd_dedup(args: argparse.Namespace) -> int:
    from ..output.table import open_table
    from .batches import choose_column
    from .dedup import find_duplicates, write_groups

    column, _ = choose_column(open_table(args.out, args.storage_options, key="OUT"), args.column)
    groups = find_duplicates(args.out, args.storage_options, column, threshold=args.threshold, center=args.center)
    built = json.loads((groups.schema.metadata or {}).get(b"featurize.duplicates", b"{}")).get("index") or {}
    if built.get("action") == "rebuilt":  # another model's table, a damaged index: say why it took longer
        _say(f"featurize: note: the index was rebuilt first ({built['reason']})")
    where = write_groups(args.out, args.storage_options, column, groups, args.dedup_out)
    about = of_duplicates(groups.schema.metadata)
    if about and about.warning:
        _say(f"featurize: WARNING: {about.warning}")
    if args.html:
        from ..pages.html import dedup_page

        page = dedup_page(groups, args.storage_options, table=args.out, allow_uris=args.allow_uris)
        _write_text(args.html, page, args.storage_options)
    n = len(set(groups.column("group").to_pylist())) if len(groups) else 0
    print(f"duplicates {n} groups, {len(groups)} rows (threshold {args.threshold}) -> {where}")
    return EXIT_OK


def _write_text(path: str, text: str, options: Dict[str, Any]) -> None:
    from ..output.store import filesystem, write_atomic

    fs, p = filesystem(path, options or {})
    write_atomic(fs, p, text.encode())
    print(f"page     {redact_text(path)}", file=sys.stderr)
