"""The read side of an output root: what `featurize status` and `featurize.status` report, from
the files alone (the record, the plan, the committed tables, the lease)."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import NoOutput
from .lease import describe, read, stale
from .ledger import STAGING, audit, parquet_files
from .root import JOB_FILE, OVERWRITE, PLAN_FILE, load_plan, read_record
from .store import filesystem


def status(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Planned, committed, errored and remaining counts of an output root."""
    fs, root = filesystem(uri, storage_options or {})
    root = root.rstrip("/")
    record = read_record(fs, root)
    plan = load_plan(fs, root)
    if record is None or plan is None:
        raise NoOutput(f"{uri}: no output there (no {JOB_FILE} and {PLAN_FILE})")
    found = audit(fs, root, plan)
    rows = found["rows"]
    return {
        "name": record.get("name"), "status": record.get("status"), "planned": len(plan),
        "features": rows["features"], "errors": rows["errors"], "remaining": found["missing"],
        "duplicates": len(found["duplicates"]),
        "staged_files": len(parquet_files(fs, f"{root}/{STAGING}")),
        "overwrite_pending": fs.exists(f"{root}/{OVERWRITE}"),
        "lease": _lease_holder(fs, root),
        "complete": record.get("status") == "complete" and not found["missing"] and not found["duplicates"],
    }


def _lease_holder(fs, root: str) -> Optional[str]:
    """Who holds OUT's lease, in words, or None."""
    held = read(fs, root)[1]
    if held is None:
        return None
    gone = stale(held)
    return describe(root, held) if gone is None else f"a stale lease of run {held.get('run_id')} ({gone})"
