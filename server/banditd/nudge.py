"""Pool members ask each other to commit lingering decision records now.

A reward that reaches one process of a `--workers` pool for a decision another process made
moments ago finds no record yet: it lingers in that process's writer (up to
--decision-linger-ms) until its group commit. The waiting process sends every other member a
datagram ("nudge") on a Linux abstract UNIX socket named after the data directory and the
member's index; the member's writer ends its linger at once, so the reward waits one commit
(a few ms) instead of the linger. Costs nothing while nobody nudges: a thread blocked in recv.

Nudges are best effort: a member that is gone or not yet listening is skipped, and the
waiting process still polls the store until the decision's grace period ends (engine)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


def address(data_dir: str, index: int) -> bytes:
    """The abstract socket name of member `index` of the pool serving `data_dir`."""
    digest = hashlib.blake2b(os.path.realpath(data_dir).encode(), digest_size=12).hexdigest()
    return f"\0banditd-{digest}-{index}".encode()


class Nudger:
    """This member's listening socket and its way to nudge the others."""

    def __init__(self, data_dir: str, index: int, size: int, on_nudge: Callable[[], None]) -> None:
        self._others = [address(data_dir, i) for i in range(size) if i != index]
        self._on_nudge = on_nudge
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(address(data_dir, index))
        self._send = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._send.setblocking(False)
        self._thread = threading.Thread(target=self._listen, name="banditd-nudge", daemon=True)

    @classmethod
    def for_pool_member(cls, data_dir: str, on_nudge: Callable[[], None]) -> Nudger | None:
        """The nudger of a pool member (BANDITD_WORKER_INDEX / BANDITD_POOL_SIZE from pool.py),
        started; None outside a pool or when the socket cannot be bound (then rewards wait
        for the linger, as without nudges)."""
        try:
            index = int(os.environ.get("BANDITD_WORKER_INDEX", ""))
            size = int(os.environ.get("BANDITD_POOL_SIZE", ""))
        except ValueError:
            return None
        if size < 2 or not 0 <= index < size:
            return None
        try:
            nudger = cls(data_dir, index, size, on_nudge)
        except OSError as exc:
            log.warning("pool member %d cannot listen for commit nudges (%s): rewards for the other "
                        "members' decisions wait for their linger", index, exc)
            return None
        nudger._thread.start()
        return nudger

    def nudge_others(self) -> None:
        for other in self._others:
            try:
                self._send.sendto(b"c", other)
            except OSError:  # gone, restarting, or its buffer is full (a nudge is pending)
                pass

    def _listen(self) -> None:
        while True:
            try:
                if not self._sock.recv(16):
                    return  # shut down (close)
            except OSError:
                return  # closed
            try:
                self._on_nudge()
            except Exception:  # keep listening
                log.exception("commit nudge failed")

    def close(self) -> None:
        for s in (self._sock, self._send):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
