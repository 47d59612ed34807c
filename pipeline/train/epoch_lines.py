"""The workers' epoch lines, shown on the driver's console as they come.

Ray Train's reports reach the controller, not the driver, so the workers put their lines on one
Ray queue (an actor) that a thread here reads. A sweep's trials share the training's queue, each
trial's lines tagged with it (TrialLines), rather than a queue each: one actor and one reader for
the whole grid.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable


class EpochLines:
    """The queue (`queue`, for the workers' config) and the thread that hands each item to `show`:
    a line (str), a {"stopped": why} (a non-finite epoch, epochs.py), or (trial, either) in a sweep."""

    def __init__(self, show: Callable[[Any], None]):
        from ray.util.queue import Queue

        self.queue = Queue()
        self._stop = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(show,), daemon=True)
        self._reader.start()

    def _read(self, show: Callable[[Any], None]) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set() or not self.queue.empty():
            try:
                show(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # the queue's actor is gone: the run ended
                return

    def close(self) -> None:
        """Show what is still queued, then stop the reader and the queue's actor; again does nothing."""
        import ray

        self._stop.set()
        self._reader.join(timeout=5)
        try:
            ray.kill(self.queue.actor)
        except Exception:  # already gone
            pass


def shown(say: Callable[[str], None], stopped: list) -> Callable[[Any], None]:
    """A plain training's items: a line is said, a stop goes to `stopped`."""
    def show(item: Any) -> None:
        if isinstance(item, dict):
            stopped.append(item["stopped"])
        else:
            say(item)
    return show


@dataclass
class TrialLines:
    """A sweep trial's end of the training's queue: what its workers put goes on tagged (trial, item)."""

    queue: Any
    trial: int

    def put(self, item: Any) -> None:
        self.queue.put((self.trial, item))
