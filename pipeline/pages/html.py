"""Self-contained HTML pages: search results and duplicate groups as thumbnails.

Nothing is fetched when a page is viewed: the style is inline, every picture is a data URI, and
there is no script. Every string from a table or a query is escaped, and every URI redacted.
While a page is made, a hit's thumbnail is read only under the table's source or a prefix in
`allow_uris` (allowed.py); the user's own query file is read as given.
"""
from __future__ import annotations

from html import escape
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import pyarrow as pa
import pyarrow.parquet as pq

from ..output.provenance import Provenance, of_duplicates
from ..redact import redact_text
from .allowed import page_roots
from .thumbnails import is_placeholder, placeholder_reason, thumbnails

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 4px} h2{font-size:1.15em;margin:28px 0 8px;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em;margin-bottom:12px}
.grid{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;width:var(--w);font-size:.8em}
.card img{display:block;width:var(--w);height:var(--w);object-fit:contain;background:#f0f0f0}
.card.query{border:2px solid #3b6fd6}
.card div{overflow-wrap:anywhere;margin-top:2px} .score{font-weight:600}
.uri{color:#777} .why{color:#a33}
.group{margin:10px 0 18px} h3{font-size:.95em;margin:14px 0 6px}
table{border-collapse:collapse;font-size:.85em;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
figure{margin:8px 0} figure img{max-width:100%;border:1px solid #ddd;background:#fff}
.note{color:#666;font-style:italic}
.warn{color:#8a1c1c;background:#fdecea;border:1px solid #e6a7a1;border-radius:4px;padding:6px 10px;font-weight:600}
.about{margin:4px 0 12px}
"""


def text(value: Any) -> str:
    """A value as page text: credentials masked, then escaped."""
    return escape(redact_text("" if value is None else str(value)), quote=True)


def document(title: str, body: str, size: int = 160) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{text(title)}</title>\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<style>:root{{--w:{int(size)}px}}{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def card(thumb: str, lines: Sequence[str], css: str = "card", title: str = "") -> str:
    """One thumbnail with its caption; `lines` are already escaped HTML."""
    alt = f"no thumbnail: {placeholder_reason(thumb)}" if is_placeholder(thumb) else "thumbnail"
    caption = "".join(f"<div>{line}</div>" for line in lines)
    return (f'<div class="{css}"><img src="{escape(thumb, quote=True)}" alt="{text(alt)}" title="{text(title)}">'
            f"{caption}</div>")


def _score(value: Any) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return text(value)


def hit_lines(hit: Dict[str, Any]) -> List[str]:
    lines = []
    if "rank" in hit:
        lines.append(f'<span class="score">#{text(hit["rank"])} &middot; {_score(hit.get("score"))}</span>')
    elif "score" in hit:
        lines.append(f'<span class="score">{_score(hit["score"])}</span>')
    lines.append(f"label {text(hit.get('label'))}" + (f" &middot; {text(hit['split'])}" if hit.get("split") else ""))
    lines.append(f"id {text(hit.get('sample_id'))}")
    if hit.get("start_s") is not None:
        lines.append(f"clip {float(hit['start_s']):.2f}&ndash;{float(hit.get('end_s') or 0):.2f} s")
    lines.append(f'<span class="uri">{text(hit.get("uri"))}</span>')
    return lines


def search_page(query: Dict[str, Any], hits: Sequence[Dict[str, Any]],
                storage_options: Optional[Dict[str, Any]] = None, size: int = 160, *, table: Optional[str] = None,
                allow_uris: Sequence[str] = (), about: Optional[Provenance] = None) -> str:
    """The query and its nearest samples as thumbnails with score, label, id and URI (redacted).
    `table`: the output root the hits are rows of (its source is read); `allow_uris`: other prefixes
    to read; `about`: what made the table and how it is searched (Index.provenance()), shown on top.
    A query by file names the user's own file; a query by id, a row of the table."""
    kind, value, uri = query.get("kind", ""), query.get("value", ""), query.get("uri")
    items = ([(uri, None)] if uri else []) + [(h.get("uri", ""), h.get("start_s")) for h in hits]
    roots = page_roots(table, storage_options, allow_uris) + ([uri] if uri and kind != "id" else [])
    thumbs = thumbnails(items, storage_options, size, roots=roots)
    query_thumb = thumbs.pop(0) if uri else None
    if query_thumb is not None:
        head = card(query_thumb, [f"<b>query</b> ({text(kind)})", text(value)], "card query", uri)
    else:
        head = f'<div class="card query"><div><b>query</b> ({text(kind)})</div><div>{text(value)}</div></div>'
    cards = "\n".join(card(t, hit_lines(h), title=h.get("uri", "")) for t, h in zip(thumbs, hits))
    metric = "higher is closer" if _cosine_like(hits) else "lower is closer"
    body = (f"<h1>Search: {text(kind)} {text(value)}</h1>\n"
            f'<div class="meta">{len(hits)} nearest samples, by rank; score: {metric}</div>\n'
            f"{provenance_html(about)}"
            f'<div class="grid">{head}</div>\n<h2>Neighbours</h2>\n<div class="grid">\n{cards}\n</div>')
    if not hits:
        body += '\n<p class="note">no neighbours found</p>'
    return document(f"featurize search: {value}", body, size)


def _cosine_like(hits: Sequence[Dict[str, Any]]) -> bool:
    """Scores that fall with the rank are similarities; rising ones are distances."""
    scores = [h.get("score") for h in hits if isinstance(h.get("score"), (int, float))]
    return len(scores) < 2 or scores[0] >= scores[-1]


def dedup_page(groups_table: Union[pa.Table, str], storage_options: Optional[Dict[str, Any]] = None,
               max_groups: int = 200, size: int = 120, max_members: int = 24, *, table: Optional[str] = None,
               allow_uris: Sequence[str] = ()) -> str:
    """Duplicate groups as rows of thumbnails (the first `max_groups` groups, `max_members` each).
    `groups_table`: the dedup table (pyarrow), or its Parquet file's URI; `table`, `allow_uris`:
    where thumbnails may be read, as for search_page."""
    if isinstance(groups_table, str):
        from ..output.store import filesystem

        fs, path = filesystem(groups_table, storage_options or {})
        groups_table = pq.read_table(path, filesystem=fs)
    rows = groups_table.select([c for c in ("group", "sample_id", "uri", "label", "split", "score", "start_s",
                                            "end_s") if c in groups_table.column_names]).to_pylist()
    groups: Dict[int, List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(int(row["group"]), []).append(row)
    total, members = len(groups), len(rows)
    shown = sorted(groups)[:max_groups]
    picked = [m for g in shown for m in groups[g][:max_members]]
    roots = page_roots(table, storage_options, allow_uris)
    thumbs = iter(thumbnails([(m.get("uri") or "", m.get("start_s")) for m in picked], storage_options, size,
                             roots=roots))
    sections = []
    for g in shown:
        kept = groups[g][:max_members]
        cards = "".join(card(next(thumbs), hit_lines(m), title=m.get("uri") or "") for m in kept)
        more = len(groups[g]) - len(kept)
        extra = f' <span class="note">({more} more not shown)</span>' if more > 0 else ""
        sections.append(f'<div class="group"><h3>group {g}: {len(groups[g])} samples{extra}</h3>'
                        f'<div class="grid">{cards}</div></div>')
    note = (f'<p class="note">showing the first {len(shown)} of {total} groups</p>' if total > len(shown) else "")
    body = (f"<h1>Near-duplicate groups</h1>\n"
            f'<div class="meta">{total} groups, {members} samples; score: similarity to the group\'s first member'
            f"</div>\n{provenance_html(of_duplicates(groups_table.schema.metadata))}{note}\n" + "\n".join(sections))
    if not total:
        body += '\n<p class="note">no near-duplicates found</p>'
    return document("featurize dedup", body, size)


def provenance_html(about: Optional[Provenance]) -> str:
    """The warning (random weights) in a box, then what made the table as a small table; nothing
    when not known."""
    if about is None:
        return ""
    warning = f'<p class="warn">WARNING: {text(about.warning)}</p>\n' if about.warning else ""
    return f'{warning}<div class="about">{table_html(None, about.rows)}</div>\n'


def figure(src: str, alt: str) -> str:
    """A chart (a data URI) on the page."""
    return f'<figure><img src="{src}" alt="{text(alt)}"></figure>'


def table_html(header: Optional[Iterable[str]], rows: Iterable[Iterable[Any]]) -> str:
    """A plain table (no header row when `header` is None); every cell escaped (and redacted)."""
    head = "<tr>" + "".join(f"<th>{text(h)}</th>" for h in header) + "</tr>" if header is not None else ""
    body = "".join("<tr>" + "".join(f"<td>{text(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"
