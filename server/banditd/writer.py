"""Group commit: one thread owns every LMDB write transaction.

Handlers submit write operations to a bounded queue (a deque: appending is one atomic
operation under the GIL, where queue.Queue takes a lock and notifies a condition per put).
The writer takes everything queued (up to `max_batch`), runs the operations in ONE
transaction, commits it (synced to disk), hands the statistics it changed to the engine
(`on_commit`), then applies each operation's in-memory effects and resolves its future. So a
reward is acknowledged only once it is durable and applied, and a thousand rewards cost
about one fsync.

Every submitted operation's future is resolved, whatever fails: a transaction that cannot
begin, a map that cannot grow, a commit the disk refuses.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import lmdb

from banditd.errors import (
    BanditdError,
    DeadlineExceeded,
    Internal,
    ResourceExhausted,
    Unavailable,
    database_error,
)
from banditd.store import ExperimentChanges, Store, WriteTxn

log = logging.getLogger("banditd.writer")

# How long a write waits for its commit when the caller set no deadline.
DEFAULT_WAIT_S = 30.0
# After a commit failed because the database could not be reached, the writer waits this
# long before retrying the decision records it kept (an urgent write ends the wait).
RETRY_PAUSE_S = 0.5
# Map growth stops here: beyond it a full map is reported, not grown (RESOURCE_EXHAUSTED).
MAX_MAP_SIZE = 1 << 40

# The write transaction of a batch (kept as a name: write ops take a `Batch`).
Batch = WriteTxn

# Upper bounds of the commit statistics kept for metrics (`banditd.metrics`): the seconds of
# each LMDB transaction commit (its fsync) and the operations each group commit carried.
COMMIT_SECONDS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


class WriteOp:
    """A unit of durable work. `write` runs in the batch transaction and must do all of its
    checks before its first put, so a failing op leaves nothing behind; `after_commit`
    applies in-memory effects once the data is on disk."""

    future: Future[Any] | None = None
    # Nobody waits on a deferrable op (a decision log record): a batch made only of them may
    # linger to gather more, so a burst of decisions costs one fsync instead of dozens.
    deferrable = False
    # Set when a batch holding it failed because the database was unreachable and it is
    # written again: that commit may have been applied after all (the connection broke
    # during COMMIT), so a retried op must not count twice.
    retried = False

    def write(self, batch: WriteTxn) -> Any:
        raise NotImplementedError

    def after_commit(self, result: Any) -> None:
        pass

    def failed(self, exc: BaseException) -> None:
        """Called when the op's batch could not be committed (nothing of it is stored)."""


class Probe(WriteOp):
    """A tiny write that tells whether the store can write again after a storage error."""

    def write(self, batch: WriteTxn) -> None:
        batch.bump(b"probe")


class _Barrier(WriteOp):
    def __init__(self) -> None:
        self.future = Future()

    def write(self, batch: WriteTxn) -> None:
        return None


_STOP = object()


def storage_error(exc: BaseException) -> BanditdError:
    """The status a client can act on for a failed commit."""
    from_database = database_error(exc)
    if from_database is not None:
        return from_database
    text = str(exc)
    if isinstance(exc, lmdb.MapFullError):
        return ResourceExhausted(f"the store's map is full at its limit ({MAX_MAP_SIZE} bytes); nothing was written")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in text:
        return ResourceExhausted("the disk holding the store is full; nothing was written. Free space and retry")
    if "Input/output error" in text or "MDB_" in text or isinstance(exc, lmdb.Error):
        return ResourceExhausted(
            f"the store could not write ({text}); the disk may be full or failing. Nothing was written"
        )
    return Internal(f"write failed: {type(exc).__name__}: {exc}")


class Writer:
    def __init__(
        self, store: Store, *, max_batch: int = 20_000, queue_limit: int = 200_000, linger_s: float = 0.0
    ) -> None:
        self.store = store
        self.max_batch = max_batch
        self.linger_s = linger_s
        self.queue_limit = queue_limit
        self._ops: deque[Any] = deque()
        # `_wake`: there is something to write (set by an op entering an empty queue and by
        # every non-deferrable op); `_urgent`: a non-deferrable op waits, end any linger.
        self._wake = threading.Event()
        self._urgent = threading.Event()
        self._thread = threading.Thread(target=self._run, name="banditd-writer", daemon=True)
        self._closed = False
        self.commits = 0
        self.ops_committed = 0
        self.failed_commits = 0
        self.last_commit_seconds = 0.0
        # Commit statistics (writer thread only; read at scrape time): per-bucket counts of
        # COMMIT_SECONDS_BUCKETS / BATCH_SIZE_BUCKETS, the last one above every bound.
        self.commit_seconds_sum = 0.0
        self.commit_seconds_counts = [0] * (len(COMMIT_SECONDS_BUCKETS) + 1)
        self.batch_size_counts = [0] * (len(BATCH_SIZE_BUCKETS) + 1)
        # The error of the last commit the store refused (disk or map full, I/O error); None
        # once a commit succeeds again. Decisions are refused meanwhile: they could not be stored.
        self.storage_error: BanditdError | None = None
        # Called after each commit with the statistics it changed, before any op is resolved.
        self.on_commit: Callable[[dict[str, ExperimentChanges]], None] | None = None
        # Called after each commit (a pool member tells the others to follow the store).
        self.notify_commit: Callable[[], None] | None = None
        # Records queued outside `_ops` (the Decide fast path, see `attach_source`).
        self._take: Callable[[], WriteOp | None] | None = None
        self._queued_outside: Callable[[], int] = lambda: 0
        self._on_health: Callable[[bool], None] | None = None

    def start(self) -> None:
        self._thread.start()

    def attach_source(
        self, take: Callable[[], WriteOp | None], queued: Callable[[], int], on_health: Callable[[bool], None]
    ) -> None:
        """Another queue of deferrable writes (the Decide fast path's records): `take` gives an
        op holding what it queued so far, put first in each commit, after the ops collected
        for it (whatever was queued there before a collected op is in); `queued` tells whether
        it holds any; it calls `wake` when its first record arrives. `on_health(False)` while
        the store cannot write or the writer is stopping: the source must then queue nothing."""
        self._take, self._queued_outside, self._on_health = take, queued, on_health
        on_health(self.storage_error is None and not self._closed)

    def is_writer_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def wake(self) -> None:
        self._wake.set()

    def commit_now(self) -> None:
        """Ends a linger at once if anything waits (another pool member needs the records)."""
        if self._ops or self._queued_outside():
            self._urgent.set()
            self._wake.set()

    def _health_changed(self) -> None:
        if self._on_health is not None:
            self._on_health(self.storage_error is None and not self._closed)

    def submit(self, op: WriteOp) -> None:
        if self._closed:
            raise Unavailable("server is shutting down; retry against another instance")
        ops = self._ops
        if len(ops) >= self.queue_limit:  # may overshoot by the handler threads racing here
            raise ResourceExhausted(
                f"write queue is full ({self.queue_limit} pending operations); retry with backoff"
            )
        ops.append(op)
        if not op.deferrable:
            self._urgent.set()  # ends a linger at once (see _run)
            self._wake.set()
        elif len(ops) == 1:
            self._wake.set()

    def refuse_if_failing(self) -> None:
        """Decisions are refused (with the store's status: RESOURCE_EXHAUSTED for a full disk,
        UNAVAILABLE for a database that cannot be reached) while the last commit failed:
        they could not be logged. The background thread's probe clears it."""
        err = self.storage_error
        if err is not None:
            raise type(err)(f"decisions are refused while the store cannot write ({err.message})")

    def submit_and_wait(self, op: WriteOp, timeout: float | None = None) -> Any:
        return wait_for(self.submit_future(op), timeout)

    def submit_future(self, op: WriteOp) -> Future[Any]:
        """Queues the op; its future gets what `write` returns once durable (`wait_for`)."""
        op.future = Future()
        self.submit(op)
        return op.future

    def sync(self, timeout: float | None = None) -> None:
        """Returns once everything submitted before the call is durable and applied."""
        self.submit_and_wait(_Barrier(), timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commits what is queued, then stops the thread."""
        if self._closed:
            return
        self._closed = True
        self._health_changed()
        self._ops.append(_STOP)
        self._urgent.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return len(self._ops)

    def _run(self) -> None:
        ops_queue = self._ops
        stop = False
        while not stop:
            self._wake.clear()
            if not ops_queue and not self._queued_outside():
                # An op appended after the check sets `_wake` after the clear: no lost wake-up.
                self._wake.wait()
                continue
            first = ops_queue[0] if ops_queue else None
            if (first is None or (first is not _STOP and first.deferrable)) and self.linger_s > 0:
                # Linger for more decision records without waking per record: the thread sleeps
                # on `_urgent` (set by a non-deferrable op), so handlers appending decisions
                # never hand it the GIL.
                self._urgent.wait(self.linger_s)
            self._urgent.clear()
            ops: list[WriteOp] = []
            while ops_queue and len(ops) < self.max_batch:
                op = ops_queue.popleft()
                if op is _STOP:
                    stop = True
                    break
                ops.append(op)
            if self._take is not None:
                taken = self._take()  # after collecting: records made before those ops are in
                if taken is not None:
                    ops.insert(0, taken)
            if not ops:
                continue
            try:
                self._commit(ops)
            except BaseException as exc:  # noqa: BLE001 - the writer must survive and answer
                if self.storage_error is None:  # once per outage, not per retry
                    log.exception("writer batch failed")
                kept = self._fail(ops, exc)
                if kept:
                    # Decision records already answered wait for the database to come back
                    # (new decisions are refused meanwhile, so they are bounded by the queue).
                    ops_queue.extendleft(reversed(kept))
                    if not stop:
                        self._urgent.wait(RETRY_PAUSE_S)

    def _fail(self, ops: list[WriteOp], exc: BaseException) -> list[WriteOp]:
        """Fails the batch's ops; returns the decision records to retry when the database is
        only unreachable for now (their decisions were answered: dropping them would lose
        rewardable decisions to a database restart)."""
        self.failed_commits += 1
        error = exc if isinstance(exc, BanditdError) else storage_error(exc)
        if isinstance(error, ResourceExhausted | Unavailable):
            was_healthy = self.storage_error is None
            self.storage_error = error
            if was_healthy:
                self._health_changed()
        kept = [op for op in ops if op.deferrable and op.future is None] if isinstance(error, Unavailable) else []
        kept_ids = {id(op) for op in kept}
        for op in kept:
            op.retried = True
        for op in ops:
            if id(op) in kept_ids:
                continue
            try:
                op.failed(error)
            except Exception:  # noqa: BLE001
                log.exception("failed() hook raised")
            if op.future is not None and not op.future.done():
                op.future.set_exception(error)
        return kept

    def _commit(self, ops: list[WriteOp]) -> None:
        started = time.perf_counter()
        while True:
            txn = self.store.begin_write()
            results: list[tuple[bool, Any]] = []
            try:
                batch = WriteTxn(self.store, txn)
                for op in ops:
                    try:
                        results.append((True, op.write(batch)))
                    except lmdb.MapFullError:
                        raise
                    except BanditdError as exc:  # the op's own refusal, reported on its future
                        results.append((False, exc))
                    except lmdb.Error:
                        raise  # the store failed: the batch cannot be trusted
                    except Exception as exc:  # noqa: BLE001 - a bug in one op: report it on that op
                        log.exception("write op %s failed", type(op).__name__)
                        results.append((False, Internal(f"{type(op).__name__}: {type(exc).__name__}: {exc}")))
                batch.flush()
                commit_started = time.perf_counter()
                txn.commit()
                commit_seconds = time.perf_counter() - commit_started
                break
            except lmdb.MapFullError:
                self.store.abort_write(txn)
                if self.store.env.info()["map_size"] * 2 > MAX_MAP_SIZE:
                    raise
                self.store.grow()
            except BaseException:
                self.store.abort_write(txn)
                raise
        if self.on_commit is not None and batch.changes:
            try:
                self.on_commit(batch.changes)
            except Exception:  # noqa: BLE001 - durable already; memory catches up on refresh
                log.exception("applying committed statistics failed")
        if self.notify_commit is not None:
            try:
                self.notify_commit()
            except Exception:  # noqa: BLE001 - best effort: the others poll as a fallback
                log.exception("telling the other processes of a commit failed")
        for op, (ok, value) in zip(ops, results, strict=True):
            if ok:
                try:
                    op.after_commit(value)
                except Exception as exc:  # noqa: BLE001
                    log.exception("after_commit failed")
                    ok, value = False, Internal(f"applying a committed write failed: {exc}")
            if op.future is not None:
                if ok:
                    op.future.set_result(value)
                else:
                    op.future.set_exception(value)
        if self.storage_error is not None:
            self.storage_error = None
            self._health_changed()
        self.commits += 1
        self.ops_committed += len(ops)
        self.last_commit_seconds = time.perf_counter() - started
        self.commit_seconds_sum += commit_seconds
        self.commit_seconds_counts[bisect_left(COMMIT_SECONDS_BUCKETS, commit_seconds)] += 1
        self.batch_size_counts[bisect_left(BATCH_SIZE_BUCKETS, len(ops))] += 1


def wait_for(future: Future[Any], timeout: float | None) -> Any:
    """The result of a queued write, or DEADLINE_EXCEEDED when the caller's deadline passes
    first. The write may still commit after that: retry with the same event id."""
    # No deadline: None, or gRPC's "infinite" one (beyond what a lock wait accepts).
    no_deadline = timeout is None or timeout >= threading.TIMEOUT_MAX
    try:
        return future.result(timeout=DEFAULT_WAIT_S if no_deadline else timeout)
    except FutureTimeout:
        raise DeadlineExceeded(
            "the deadline passed before the write was durable; it may still commit: retry with the same "
            "event id (rewards are idempotent by event id)"
        ) from None
