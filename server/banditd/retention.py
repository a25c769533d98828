"""Retention: decision records and reward events expire, so memory and disk stay bounded.

Decision ids start with their creation time in hex milliseconds, so expired decisions are a
prefix of the decisions database: one cursor from the start, stopping at the cutoff. Reward
events are keyed by experiment, so their sweep walks the database a slice per run. Deleted
pages go to LMDB's free list and are reused by later writes (the file does not shrink).
Sticky assignments are kept: they are what keeps a unit's arm stable.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from banditd.store import WriteTxn
from banditd.writer import WriteOp, Writer

log = logging.getLogger("banditd")
# Deletions per write transaction: keeps each commit short, so rewards are not held up.
SWEEP_LIMIT = 20_000


class ExpireRecords(WriteOp):
    """Deletes up to SWEEP_LIMIT decisions (with their outcomes) and events older than `cutoff_ms`."""

    def __init__(self, cutoff_ms: int, events_from: bytes) -> None:
        self.cutoff_ms = cutoff_ms
        self.events_from = events_from

    def write(self, batch: WriteTxn) -> tuple[int, int, bytes]:
        return batch.expire(self.cutoff_ms, self.events_from, SWEEP_LIMIT)


class Janitor:
    """Runs the expiry sweep every `every_s` seconds on its own thread."""

    def __init__(self, writer: Writer, retention_s: float, every_s: float = 60.0) -> None:
        self.writer = writer
        self.retention_s = retention_s
        self.every_s = every_s
        self._stop = threading.Event()
        self._events_from = b""
        self.expired_decisions = 0
        self.expired_events = 0

    def start(self) -> None:
        threading.Thread(target=self._run, name="banditd-janitor", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def sweep(self) -> dict[str, Any]:
        """One pass (repeated while a pass hits the per-transaction limit)."""
        cutoff = int((time.time() - self.retention_s) * 1000)
        while True:
            decisions, events, self._events_from = self.writer.submit_and_wait(
                ExpireRecords(cutoff, self._events_from), timeout=60.0
            )
            self.expired_decisions += decisions
            self.expired_events += events
            if decisions < SWEEP_LIMIT and not self._events_from:
                break
        return {"expired_decisions": self.expired_decisions, "expired_events": self.expired_events}

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                if not self.writer.store.lead("banditd-retention"):
                    continue  # another node sweeps
                self.sweep()
            except Exception:  # a failed sweep is retried next round
                log.exception("retention sweep failed")
