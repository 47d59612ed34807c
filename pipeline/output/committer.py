"""The Ray actor that publishes a run's files through the Ledger (ledger.py), several at once."""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Tuple

from .lease import Fence
from .ledger import Ledger, Staged, Tally
from .store import filesystem, with_connections

CONCURRENCY = 32  # commit calls in flight: a cluster's write tasks at once, each one file or a few


class Committer:
    """The Ray actor around a Ledger: one per run, so that one process decides what is committed.
    It runs as a threaded actor (CONCURRENCY calls at once): the ledger decides under its lock and
    overlaps the store's round trips, which on an object store are most of a commit's time.

    It reads its state from OUT (the files are the truth) when it starts, so that nothing it
    needs lives in the object store: the driver's copy of a large set would be a constructor
    argument there, which an actor restart cannot count on (ray-project/ray#53727). Restarted
    after a failure, it also publishes what was left staged. `job` is the job's fingerprint;
    `lease` (OUT's uri, the run's id) fences every commit; `base` is (rows, units) committed
    before this run, which lets a restarted actor estimate the run's progress.
    """

    def __init__(self, out_uri: str, storage_options: Dict[str, Any], job: str = "",
                 lease: Optional[Tuple[str, str]] = None, base: Tuple[int, int] = (0, 0)):
        import ray

        fs, root = filesystem(out_uri, with_connections(out_uri, storage_options, CONCURRENCY))
        fence = None
        if lease is not None:
            fence = Fence(*filesystem(lease[0], storage_options), run_id=lease[1])
        self.ledger = Ledger(fs, root, job=job, fence=fence)
        self.tally = Tally()
        self.tally_lock = threading.Lock()
        if ray.get_runtime_context().was_current_actor_reconstructed:
            if fence is not None:
                fence()
            self.ledger.recover()
            # this run's tally died with the actor: what OUT gained since the run began stands in
            # for it (without the error count, and counting a unit's rows as it goes)
            rows = len(self.ledger.rows) - base[0]
            self.tally.features = self.tally.units = max(0, rows)
        self.actors: List[Any] = []

    def register(self, actor: Any) -> None:
        """A model actor of this job: Ray Data leaves a failed job's actors running (its forced
        shutdown comes after a non-forced one and is skipped), so the driver stops them itself."""
        self.actors.append(actor)

    def registered(self) -> List[Any]:
        actors, self.actors = self.actors, []
        return actors

    def commit(self, staged: List[Staged], seconds: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
        result = self.ledger.commit(staged)
        with self.tally_lock:
            self.tally.add(result, seconds or {})
        return result

    def complete_units(self, units: List[str]) -> None:
        self.ledger.complete_units(units)

    def progress(self) -> "Tally":
        """What this run has committed so far: a few counters, cheap to ask for every second."""
        with self.tally_lock:
            return Tally(self.tally.units, self.tally.features, self.tally.errors, dict(self.tally.seconds))
