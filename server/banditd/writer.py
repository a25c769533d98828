"""Group commit: one thread owns every LMDB write transaction.

Handlers submit write operations to a bounded queue. The writer takes everything queued
(up to `max_batch`), runs the operations in ONE transaction, commits it (synced to disk),
then applies each operation's in-memory effects and resolves its future. So a reward is
acknowledged only once it is durable, and a thousand rewards cost about one fsync.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from typing import Any

import lmdb
import orjson

from banditd.errors import ResourceExhausted, Unavailable
from banditd.store import STATS_COUNTER, Store

log = logging.getLogger("banditd.writer")


class Batch:
    """What the operations of one transaction share: the txn and per-arm total deltas."""

    def __init__(self, txn: lmdb.Transaction, store: Store) -> None:
        self.txn = txn
        self.store = store
        # arm key -> [pulls, rewards, reward_sum, reward_sumsq]
        self.arm_deltas: dict[bytes, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0.0])

    def flush_arm_totals(self) -> None:
        db = self.store.arms
        for k, (pulls, rewards, s, s2) in self.arm_deltas.items():
            raw = self.txn.get(k, db=db)
            cur = orjson.loads(raw) if raw is not None else [0, 0, 0.0, 0.0]
            cur[0] += pulls
            cur[1] += rewards
            cur[2] += s
            cur[3] += s2
            self.txn.put(k, orjson.dumps(cur), db=db)
        # One counter per experiment whose totals moved: other server processes poll these
        # to know which posteriors to refresh.
        for exp in {k.split(b"\0", 1)[0] for k in self.arm_deltas}:
            self.store.bump(self.txn, STATS_COUNTER + exp)


class WriteOp:
    """A unit of durable work. `write` runs in the batch transaction and must do all of its
    checks before its first put, so a failing op leaves nothing behind; `after_commit`
    applies in-memory effects once the data is on disk."""

    future: Future[Any] | None = None
    # Nobody waits on a deferrable op (a decision log record): a batch made only of them may
    # linger to gather more, so a burst of decisions costs one fsync instead of dozens.
    deferrable = False

    def write(self, batch: Batch) -> Any:
        raise NotImplementedError

    def after_commit(self, result: Any) -> None:
        pass


class _Barrier(WriteOp):
    def __init__(self) -> None:
        self.future = Future()

    def write(self, batch: Batch) -> None:
        return None


_STOP = object()


class Writer:
    def __init__(
        self, store: Store, *, max_batch: int = 20_000, queue_limit: int = 200_000, linger_s: float = 0.0
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_limit)
        self._thread = threading.Thread(target=self._run, name="banditd-writer", daemon=True)
        self._closed = False
        self.commits = 0
        self.ops_committed = 0
        self.last_commit_seconds = 0.0

    def start(self) -> None:
        self._thread.start()

    def submit(self, op: WriteOp) -> None:
        if self._closed:
            raise Unavailable("server is shutting down; retry against another instance")
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            raise ResourceExhausted(
                f"write queue is full ({self._queue.maxsize} pending operations); retry with backoff"
            ) from None

    def submit_and_wait(self, op: WriteOp, timeout: float | None = 30.0) -> Any:
        op.future = Future()
        self.submit(op)
        return op.future.result(timeout=timeout)

    def sync(self, timeout: float | None = 30.0) -> None:
        """Returns once everything submitted before the call is durable and applied."""
        self.submit_and_wait(_Barrier(), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commits what is queued, then stops the thread."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            ops = [first]
            deferrable = first.deferrable
            deadline = 0.0
            while len(ops) < self.max_batch:
                try:
                    op = self._queue.get_nowait()
                except queue.Empty:
                    if not (deferrable and self.linger_s > 0):
                        break
                    deadline = deadline or time.monotonic() + self.linger_s
                    try:
                        op = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0))
                    except queue.Empty:
                        break
                if op is _STOP:
                    stop = True
                    break
                ops.append(op)
                deferrable = deferrable and op.deferrable
            try:
                self._commit(ops)
            except Exception:  # noqa: BLE001 - the writer must survive to report errors
                log.exception("writer batch failed")

    def _commit(self, ops: list[WriteOp]) -> None:
        started = time.perf_counter()
        while True:
            txn = self.store.env.begin(write=True)
            results: list[tuple[bool, Any]] = []
            try:
                batch = Batch(txn, self.store)
                for op in ops:
                    try:
                        results.append((True, op.write(batch)))
                    except lmdb.MapFullError:
                        raise
                    except Exception as exc:  # noqa: BLE001 - reported on the op's future
                        results.append((False, exc))
                batch.flush_arm_totals()
                txn.commit()
                break
            except lmdb.MapFullError:
                txn.abort()
                self.store.grow()
            except Exception as exc:  # noqa: BLE001 - nothing was committed
                txn.abort()
                log.exception("commit failed; %d operations rejected", len(ops))
                for op in ops:
                    if op.future is not None:
                        op.future.set_exception(exc)
                return
        for op, (ok, value) in zip(ops, results, strict=True):
            if ok:
                try:
                    op.after_commit(value)
                except Exception as exc:  # noqa: BLE001
                    log.exception("after_commit failed")
                    ok, value = False, exc
            if op.future is not None:
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)
        self.commits += 1
        self.ops_committed += len(ops)
        self.last_commit_seconds = time.perf_counter() - started
