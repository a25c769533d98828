"""Pool members tell each other when to commit and when they committed.

Two datagrams on a Linux abstract UNIX socket per member, named after the data directory and
the member's index:

* "commit now": a reward that reaches one process of a `--workers` pool for a decision
  another process made moments ago finds no record yet: it lingers in that process's writer
  (up to --decision-linger-ms) until its group commit. The waiting process asks every other
  member to end its linger at once, so the reward waits one commit (a few ms), not the linger.
* "committed": sent after each commit, so the other members catch up with the store
  (`Follower`) when there is something to catch up with, instead of polling it 20 times a
  second whether or not anything changed (an idle 2-process pool spent ~23 ms of CPU a second
  on it, ~150 µs per decision at 150 decisions/s).

Costs nothing while nobody sends: a thread blocked in recv. Best effort: a member that is gone
or not yet listening is skipped, a full socket buffer drops the datagram (one is pending); the
waiting process still polls the store until the decision's grace period ends (engine), and the
follower still refreshes every FALLBACK_S."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

COMMIT_NOW = b"c"
COMMITTED = b"f"
# A follower told of commits still refreshes this often: a lost datagram (a full buffer, a
# member restarting) or a member that could not bind its socket is caught up within it.
FALLBACK_S = 1.0


def address(data_dir: str, index: int) -> bytes:
    """The abstract socket name of member `index` of the pool serving `data_dir`."""
    digest = hashlib.blake2b(os.path.realpath(data_dir).encode(), digest_size=12).hexdigest()
    return f"\0banditd-{digest}-{index}".encode()


class Nudger:
    """This member's listening socket and its way to nudge the others. `on_commit_now`: another
    member waits for this one's lingering records; `on_committed`: another member committed."""

    def __init__(
        self,
        data_dir: str,
        index: int,
        size: int,
        on_commit_now: Callable[[], None],
        on_committed: Callable[[], None] = lambda: None,
    ) -> None:
        self._others = [address(data_dir, i) for i in range(size) if i != index]
        self._handlers = {COMMIT_NOW: on_commit_now, COMMITTED: on_committed}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address(data_dir, index))
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._thread = threading.Thread(target=self._listen, name="banditd-nudge", daemon=True)

    @classmethod
    def for_pool_member(
        cls, data_dir: str, on_commit_now: Callable[[], None], on_committed: Callable[[], None]
    ) -> Nudger | None:
        """The nudger of a pool member (BANDITD_WORKER_INDEX / BANDITD_POOL_SIZE from pool.py),
        listening; None outside a pool or when the socket cannot be bound (then rewards wait
        for the linger and the follower polls, as without nudges)."""
        try:
            index = int(os.environ.get("BANDITD_WORKER_INDEX", ""))
            size = int(os.environ.get("BANDITD_POOL_SIZE", ""))
        except ValueError:
            return None
        if size < 2 or not 0 <= index < size:
            return None
        try:
            nudger = cls(data_dir, index, size, on_commit_now, on_committed)
        except OSError as exc:
            log.warning(
                "pool member %d cannot listen for nudges (%s): rewards for the other members' "
                "decisions wait for their linger, and it polls the store",
                index,
                exc,
            )
            return None
        nudger.start()
        return nudger

    def start(self) -> None:
        self._thread.start()

    def listening(self) -> bool:
        return self._thread.is_alive()

    def nudge_others(self) -> None:
        """Asks the other members to commit what lingers now."""
        self._tell(COMMIT_NOW)

    def committed(self) -> None:
        """Tells the other members this one committed (they follow the store)."""
        self._tell(COMMITTED)

    def _tell(self, message: bytes) -> None:
        for other in self._others:
            try:
                self._send.sendto(message, other)
            except OSError:  # gone, restarting, or its buffer is full (a datagram is pending)
                pass

    def _listen(self) -> None:
        while True:
            try:
                message = self._sock.recv(16)
            except OSError:
                return  # closed
            if not message:
                return  # shut down (close)
            handler = self._handlers.get(message[:1])
            if handler is None:
                continue
            try:
                handler()
            except Exception:  # keep listening
                log.exception("nudge %r failed", message[:1])

    def close(self) -> None:
        for s in (self._sock, self._send):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class Follower:
    """Runs `refresh` (this process catching up with what the others committed to the store)
    when told another process committed (`poke`), at most once per `gap_s`, and at the latest
    `fallback_s` after the previous refresh. With fallback_s == gap_s it polls every gap_s
    (nodes on PostgreSQL, which cannot nudge each other across machines)."""

    def __init__(self, refresh: Callable[[], None], gap_s: float, fallback_s: float) -> None:
        self._refresh = refresh
        self.gap_s = gap_s
        self.fallback_s = max(gap_s, fallback_s)
        self.refreshes = 0
        self._due = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="banditd-follow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def poke(self) -> None:
        self._due.set()

    def stop(self) -> None:
        self._stopped.set()
        self._due.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while True:
            self._due.wait(self.fallback_s - self.gap_s)
            # Cleared before the refresh: a poke from here on (a commit the refresh may not
            # see) sets it again for the next round; one before is covered by this refresh.
            self._due.clear()
            if self._stopped.is_set():
                return
            try:
                self._refresh()
            except Exception:  # keep following; the next round retries
                log.exception("refresh from store failed")
            self.refreshes += 1
            if self._stopped.wait(self.gap_s):
                return
