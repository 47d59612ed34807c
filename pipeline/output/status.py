"""The read side of an output root: what `featurize status` and `featurize.status` report, from
the files alone (the record, the plan, the committed tables, the lease).

The status says what OUT holds now, not only what its record last said: a plan saved before any
record (a run stopped while Ray started) is `planned`, and a record that still says `running`
while no live run holds OUT's lease (its driver was killed) is `stopped`."""
from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import NoOutput
from ..extract.planfile import scratch
from .lease import describe, read, stale
from .ledger import STAGING, audit, parquet_files
from .root import JOB_FILE, OVERWRITE, PLAN_FILE, local_plan, read_record
from .store import READERS, filesystem, with_connections

# the two states the files tell, in words for the CLI's line (the record's own words, complete,
# running, interrupted, failed, say themselves)
MEANING = {
    "planned": "planned, not started: stopped before its first record",
    "stopped": "stopped: its record says running but no run holds the output (killed?)",
}


def status(uri: str, storage_options: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Planned, committed, errored and remaining counts of an output root."""
    fs, root = filesystem(uri, with_connections(uri, storage_options or {}, READERS))  # the audit's reads overlap
    root = root.rstrip("/")
    record = read_record(fs, root)
    with scratch() as folder:  # the saved plan read from a local file, not held in memory
        plan = local_plan(fs, root, folder)
        if plan is None:
            raise NoOutput(f"{uri}: no output there (no {JOB_FILE} and {PLAN_FILE})")
        found = audit(fs, root, plan)
    rows = found["rows"]
    held = read(fs, root)[1]
    state = _state(record, held)
    return {
        "name": (record or {}).get("name"), "status": state, "planned": len(plan),
        "features": rows["features"], "errors": rows["errors"], "remaining": found["missing"],
        "duplicates": len(found["duplicates"]),
        "staged_files": len(parquet_files(fs, f"{root}/{STAGING}")),
        "overwrite_pending": fs.exists(f"{root}/{OVERWRITE}"),
        "lease": _lease_holder(root, held),
        "complete": state == "complete" and not found["missing"] and not found["duplicates"],
    }


def _state(record: Optional[Dict[str, Any]], held: Optional[Dict[str, Any]]) -> str:
    if record is None:
        return "planned"
    said = record.get("status") or "unknown"
    if said == "running" and (held is None or stale(held) is not None):
        return "stopped"
    return said


def _lease_holder(root: str, held: Optional[Dict[str, Any]]) -> Optional[str]:
    """Who holds OUT's lease, in words, or None."""
    if held is None:
        return None
    gone = stale(held)
    return describe(root, held) if gone is None else f"a stale lease of run {held.get('run_id')} ({gone})"
