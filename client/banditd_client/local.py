"""Assignment in the SDK: units get arms from an allocation snapshot, with no RPC per unit.

`LocalAssigner` fetches the experiment's allocation (`Client.get_allocation`) and assigns a
unit by the rule the server uses (`Decide` with `allocation_version` gives the same arm for
the same snapshot):

    u   = blake2b((salt + "\\x00" + unit_id).encode(), digest_size=8).digest(), big endian
    T_i = min(2**64 - 1, int(cumulative_i * 2**64))   (cumulative sums of the probabilities)
    arm = the first i with T_i > u (the last arm when none is); propensity = its probability

Each assignment gets a decision id like the server's (11 hex digits of unix ms, then 12 hex
digits) and is queued as an exposure; a background thread sends the queue with
`Client.log_exposures`, after which the decision id takes rewards like any other.

Staleness bound: an assignment uses a snapshot at most `max_age_seconds` old (the snapshot's
own field; the server issues ttl 10 s and max age 60 s unless configured otherwise). The age
counts from the snapshot's `issued_unix_ms` by the local clock, and never from later than the
moment the GetAllocation call started, so a client clock behind the server's cannot stretch
the bound (one ahead only shortens it). Past that age `assign` does not use the snapshot: it
asks the server (`Client.decide`, source "rpc") and wakes the refresh.

Sticky experiments are never assigned here: a sticky unit keeps the arm the server recorded
for it, and those assignments live on the server, so every `assign` is a decide call.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from banditd_client._convert import FlatExposures
from banditd_client.errors import BanditdError, ExperimentPaused
from banditd_client.types import Allocation, LocalDecision, RewardCounts, RewardRejection

if TYPE_CHECKING:
    from banditd_client.client import Client

log = logging.getLogger("banditd_client.local")

# Used when a snapshot leaves them unset (0): the server's defaults.
DEFAULT_TTL_S = 10.0
DEFAULT_MAX_AGE_S = 60.0
# Exposures held while they cannot be sent; beyond this the oldest are dropped (and counted).
MAX_QUEUED = 1_000_000
# Exposures per ExposureBatch message when flushing; deadline of a background flush.
FLUSH_BATCH = 5000
FLUSH_TIMEOUT_S = 30.0
# A failed refresh is retried after RETRY_MIN_S, doubling up to RETRY_MAX_S (and at most the
# ttl); assignments that find no usable snapshot wake it at most once per POKE_S.
RETRY_MIN_S = 0.5
RETRY_MAX_S = 10.0
POKE_S = 1.0
# A first GetAllocation failing with these does not stop the assigner from starting: it
# assigns by decide calls until a refresh succeeds. Any other error is raised.
TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.ABORTED,
    }
)

def unit_digest(salt: str, unit_id: str) -> bytes:
    """BLAKE2b-64 of salt + NUL + unit id: the unit's point u in [0, 2^64), big endian."""
    return hashlib.blake2b((salt + "\x00" + unit_id).encode(), digest_size=8).digest()


def unit_point(salt: str, unit_id: str) -> float:
    """u / 2^64 in [0, 1) (for reading; assignment compares the digest bytes)."""
    return int.from_bytes(unit_digest(salt, unit_id), "big") / 2**64


def cumulative(probabilities: Sequence[float]) -> list[float]:
    """Running sums, left to right (the order the server sums in)."""
    return list(itertools.accumulate(probabilities))


def thresholds(probabilities: Sequence[float]) -> list[bytes]:
    """T_i = min(2^64 - 1, floor(cumulative_i x 2^64)) as 8 big-endian bytes: the unit's arm
    is the first i with T_i > u, found by comparing digests as bytes (no int conversion on
    the hot path; the server computes the same integers from the same doubles)."""
    top = 2**64 - 1
    return [min(top, int(c * 2**64)).to_bytes(8, "big") for c in cumulative(probabilities)]


def pick(thr: Sequence[bytes], digest: bytes) -> int:
    """Index of the first arm whose threshold exceeds the digest; the last arm when none does."""
    return min(bisect.bisect_right(thr, digest), len(thr) - 1)


def arm_index(allocation: Allocation, unit_id: str) -> int:
    """Index into `allocation.arm_ids` of the unit's arm (what `Decide` with the snapshot's
    version gives)."""
    return pick(thresholds(allocation.probabilities), unit_digest(allocation.salt, unit_id))


def new_decision_id(ms: int | None = None) -> str:
    """A decision id like the server's: 11 hex digits of unix ms, then 12 random hex digits."""
    if ms is None:
        ms = time.time_ns() // 1_000_000
    return f"{ms:011x}{os.urandom(6).hex()}"


_LOW: list[str] = []


def _low_digits() -> list[str]:
    """"0000" .. "ffff", made once per process on first use (~4 MB; ~10 ms)."""
    if not _LOW:
        _LOW.extend(f"{i:04x}" for i in range(65536))
    return _LOW


@dataclass(frozen=True, slots=True)
class AssignerStats:
    """Counters of a LocalAssigner since it started."""

    snapshot_assignments: int  # assigned from the snapshot (each queued as an exposure)
    rpc_assignments: int  # assigned by a decide call (no usable snapshot, or sticky)
    queued: int  # exposures waiting to be sent
    dropped: int  # exposures dropped beyond the queue bound (oldest first)
    accepted: int  # exposures the server accepted
    duplicate: int  # exposures the server had already (a resend)
    rejected: int  # exposures the server refused (see last_rejections)
    flush_failures: int  # flushes that failed (their exposures stayed queued)
    refreshes: int  # snapshots fetched
    refresh_failures: int
    version: int  # allocation version in use; 0 = none
    snapshot_age_s: float  # age of that snapshot (by the local clock); -1 = none
    last_rejections: tuple[RewardRejection, ...]


def _count_value(counter: itertools.count[int]) -> int:
    """The next value of an itertools.count, without advancing it (its repr is `count(n)`)."""
    return int(repr(counter)[6:-1])


class LocalAssigner:
    """Assigns units to arms in the SDK from an allocation snapshot (see the module doc).

    >>> with client.local_assigner("subject-lines") as assigner:
    ...     d = assigner.assign("u-17")          # no RPC: ~2 µs
    ...     send(d.arm); later: client.reward(d.decision_id, 1.0)

    `ttl_seconds`: refresh period (default: the snapshot's ttl_seconds); a refresh always
    happens before the snapshot would pass its max age. Exposures are sent every
    `flush_every_s` seconds, or as soon as `flush_size` are queued; `flush()` sends at once.
    A failed send keeps the exposures queued (at most MAX_QUEUED; the oldest beyond are
    dropped and counted in `stats().dropped`; the batch being sent is held besides) for the
    next flush; resends are harmless (the decision id is the idempotency key).

    `assign` is thread-safe and lock-free: it reads the snapshot in one attribute access and
    queues the exposure with one list extend. A decision id is the millisecond, 8 random hex
    digits of the assigner and 4 of a counter: unique per assigner while it makes fewer than
    65,536 a millisecond and, practically, across processes. The sending thread competes for
    the GIL: sending costs about a seventh of assigning. The threads do not survive a fork: make the assigner in the
    process that uses it (e.g. in each worker, after the fork).
    """

    def __init__(
        self,
        client: Client,
        experiment_id: str,
        *,
        ttl_seconds: float | None = None,
        flush_every_s: float = 1.0,
        flush_size: int = 20000,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0, got {ttl_seconds!r}")
        if not flush_every_s > 0:
            raise ValueError(f"flush_every_s must be > 0, got {flush_every_s!r}")
        if flush_size < 1 or max_queued < 1:
            raise ValueError("flush_size and max_queued must be >= 1")
        self.client = client
        self.experiment_id = experiment_id
        self.ttl_seconds = ttl_seconds
        self.flush_every_s = float(flush_every_s)
        self.flush_size = int(flush_size)
        self.max_queued = int(max_queued)
        # Hot-path state: `_snap` is None (no usable snapshot: assign asks the server) or a
        # tuple (base hash, thresholds, arm ids, probabilities, version, dies at time_ns,
        # clock, id counter, exposure queue, flush size), replaced as a whole: one attribute
        # read gives assign everything. `clock` is [end of the current millisecond in ns,
        # the first 19 digits of the ids made in it]: formatted once per millisecond.
        self._snap: tuple[Any, ...] | None = None
        # Exposures waiting to be sent, flat: decision id, unit id, arm index, version, then the
        # next one's. `+=` of a 4-tuple is one atomic list extend (no tuple kept, nothing for
        # the garbage collector to track, columns are slices); only assign appends, and the
        # flusher takes a prefix, under `_lock` like the rare drop of the oldest.
        self._queue: list[Any] = []
        self._clock: list[Any] = [0, ""]
        # Each snapshot version's arm ids: the queue holds arm indexes (see FlatExposures).
        self._arm_tables: dict[int, tuple[str, ...]] = {}
        self._id_tag = int.from_bytes(os.urandom(4), "little")  # this assigner's 8 hex digits
        # The last 4 digits of the ids: "0000" .. "ffff" in turn (looked up: formatting a
        # number costs more than the rest of the id).
        self._suffixes = itertools.cycle(_low_digits())
        self._flush_wanted = False
        # Slow-path state.
        self.snapshot: Allocation | None = None  # the last snapshot fetched
        self._dies_mono = 0.0
        self._sticky = False
        self._closed = False
        self._rpc_count = itertools.count()
        self._lock = threading.Lock()  # counters and the retry list (never taken by assign)
        self._flush_lock = threading.Lock()  # one flush at a time
        self._retry: list[Any] = []  # taken, failed to send, oldest first (flat like the queue)
        self._taken_from_queue = 0
        self._dropped_queue = 0
        self._dropped_retry = 0
        self._totals = {"accepted": 0, "duplicate": 0, "rejected": 0, "flush_failures": 0}
        self._last_rejections: tuple[RewardRejection, ...] = ()
        self._refreshes = 0
        self._refresh_failures = 0
        self._last_poke = 0.0
        self._refresh_now = threading.Event()
        self._flush_now = threading.Event()

        self._next_delay = RETRY_MIN_S
        try:
            self._next_delay = self._refresh()
        except BanditdError as exc:
            # A paused experiment may resume: until then decide calls raise ExperimentPaused.
            if exc.code not in TRANSIENT and not isinstance(exc, ExperimentPaused):
                raise
            log.warning("no allocation snapshot for %r yet (%s); assigning by decide calls", experiment_id, exc)
        self._refresher = threading.Thread(
            target=self._refresh_loop, name=f"banditd-allocation-{experiment_id}", daemon=True
        )
        self._flusher = threading.Thread(
            target=self._flush_loop, name=f"banditd-exposures-{experiment_id}", daemon=True
        )
        self._refresher.start()
        self._flusher.start()

    # The hot path.

    def assign(
        self,
        unit_id: str,
        # Bound at definition: locals are the fastest lookups. Not arguments to pass.
        _time_ns: Any = time.time_ns,
        _bisect: Any = bisect.bisect_right,
        _new: Any = tuple.__new__,
        _cls: Any = LocalDecision,
    ) -> LocalDecision:
        """The unit's arm: from the snapshot (queued as an exposure), else from a decide call.

        The same unit gets the same arm for the same snapshot version (and usually across
        versions: the salt stays, so it moves only when its interval does)."""
        s = self._snap
        if s is None:
            return self._assign_by_rpc(unit_id)
        base, cum, arm_ids, probs, version, dies_ns, clock, suffixes, q, flush_items, max_items = s
        now = _time_ns()
        if now > dies_ns:
            return self._assign_by_rpc(unit_id)
        h = base.copy()
        h.update(unit_id.encode())
        i = _bisect(cum, h.digest())  # the last threshold is above every digest: i <= last
        if now >= clock[0]:  # a new millisecond: 11 digits of it and the assigner's 8
            ms = now // 1_000_000
            clock[1] = f"{ms:011x}{self._id_tag:08x}"
            clock[0] = (ms + 1) * 1_000_000
        # Then the next of 65,536 suffixes: unique while an assigner makes < 65,536 ids a ms.
        did = clock[1] + next(suffixes)
        q += (did, unit_id, i, version)
        if len(q) >= flush_items and (not self._flush_wanted or len(q) > max_items):
            self._queue_full()
        return _new(_cls, (did, unit_id, arm_ids[i], probs[i], version, "snapshot"))  # type: ignore[no-any-return]

    def _queue_full(self) -> None:
        """flush_size exposures are queued: wake the flusher; beyond max_queued drop the oldest."""
        q = self._queue
        if len(q) > 4 * self.max_queued:
            with self._lock:
                excess = len(q) - 4 * self.max_queued
                if excess > 0:
                    drop = excess // 4  # len(q) and the bound are multiples of 4
                    del q[: 4 * drop]
                    self._dropped_queue += drop
        if not self._flush_wanted:
            self._flush_wanted = True
            self._flush_now.set()

    def _assign_by_rpc(self, unit_id: str) -> LocalDecision:
        if self._closed:
            raise RuntimeError("the LocalAssigner is closed")
        next(self._rpc_count)
        if not self._sticky:
            now = time.monotonic()
            if now - self._last_poke >= POKE_S:
                self._last_poke = now
                self._refresh_now.set()
        d = self.client.decide(self.experiment_id, unit_id)
        return LocalDecision(d.decision_id, unit_id, d.arm, d.propensity, 0, "rpc")

    # Snapshots.

    def _refresh(self) -> float:
        """Fetches and installs a snapshot; returns the delay until the next refresh. Raises
        what get_allocation raises (the old snapshot stays until it is too old)."""
        started_mono, started_ns = time.monotonic(), time.time_ns()
        try:
            alloc = self.client.get_allocation(self.experiment_id)
        except Exception:
            with self._lock:
                self._refresh_failures += 1
            raise
        ttl = alloc.ttl_seconds if alloc.ttl_seconds > 0 else DEFAULT_TTL_S
        max_age = alloc.max_age_seconds if alloc.max_age_seconds > 0 else DEFAULT_MAX_AGE_S
        # Age at the call's start by the local clock; clamped at 0 (a clock behind the
        # server's): the snapshot is at least as old as the time since the call started.
        age = min(max(0.0, (started_ns // 1_000_000 - alloc.issued_unix_ms) / 1000.0), max_age)
        life = max_age - age
        self._dies_mono = started_mono + life
        usable = (
            bool(alloc.arm_ids) and not alloc.sticky and len(alloc.arm_ids) == len(alloc.probabilities)
            and not self._closed
        )  # fmt: skip
        if usable:
            base = hashlib.blake2b((alloc.salt + "\x00").encode(), digest_size=8)
            # "The last arm when no threshold exceeds u": a last threshold of 9 bytes sorts
            # above every 8-byte digest, so the bisection never runs past the last arm.
            cum = thresholds(alloc.probabilities)[:-1] + [b"\xff" * 9]
            dies_ns = started_ns + int(life * 1e9)
            with self._lock:  # before any exposure can name the version
                self._arm_tables.setdefault(alloc.version, tuple(alloc.arm_ids))
            self._snap = (
                base, cum, alloc.arm_ids, alloc.probabilities, alloc.version, dies_ns, self._clock,
                self._suffixes, self._queue, 4 * min(self.flush_size, self.max_queued), 4 * self.max_queued,
            )  # fmt: skip
        else:
            self._snap = None
        self._sticky = alloc.sticky
        self.snapshot = alloc
        with self._lock:
            self._refreshes += 1
        period = self.ttl_seconds if self.ttl_seconds is not None else ttl
        # Refresh in time: before half the remaining life is gone.
        return max(0.05, min(period, life / 2))

    def _refresh_loop(self) -> None:
        delay = self._next_delay
        failures = 0
        while True:
            if self._snap is not None:  # wake up when it dies, at the latest
                delay = min(delay, max(0.0, self._dies_mono - time.monotonic()))
            self._refresh_now.wait(delay)
            self._refresh_now.clear()
            if self._closed:
                return
            if self._snap is not None and time.monotonic() >= self._dies_mono:
                self._snap = None  # too old (by the monotonic clock too): assign asks the server
            try:
                delay = self._refresh()
                failures = 0
            except Exception as exc:  # noqa: BLE001 - keep the old snapshot, retry
                failures += 1
                period = self.ttl_seconds or (self.snapshot.ttl_seconds if self.snapshot else 0) or DEFAULT_TTL_S
                delay = min(RETRY_MIN_S * 2 ** (failures - 1), RETRY_MAX_S, period)
                if failures == 1 or failures % 10 == 0:
                    log.warning("allocation refresh for %r failed (%d in a row): %s", self.experiment_id, failures, exc)

    # Exposures.

    def _take(self) -> FlatExposures:
        """The exposures to send: the retried ones (oldest) then the queue as it is now, at
        most max_queued (the oldest beyond are dropped)."""
        with self._lock:
            q = self._queue
            n = len(q)  # a multiple of 4: each assign extends it by 4 at once
            fresh = q[:n]
            del q[:n]  # assign only appends meanwhile: the prefix is what was taken
            self._taken_from_queue += n // 4
            items, self._retry = self._retry, []
            excess = (len(items) + n) // 4 - self.max_queued
            if excess > 0:
                drop = min(excess, len(items) // 4)
                del items[: 4 * drop]
                self._dropped_retry += drop
            items += fresh
            # Forget the arm tables of versions nothing taken names any more, but the newest
            # few (an assign may still be queueing from the snapshot it read).
            keep = set(items[3::4]) | set(list(self._arm_tables)[-4:])
            tables = {v: t for v, t in self._arm_tables.items() if v in keep}
            self._arm_tables = tables
        return FlatExposures(items, tables)

    def flush(self, *, timeout: float | None = None) -> RewardCounts:
        """Sends the queued exposures now; returns what the server counted of them. On a
        failure they stay queued (for the next flush) and the error is raised."""
        with self._flush_lock:
            self._flush_wanted = False
            items = self._take()
            if not items:
                return RewardCounts(0, 0, 0)
            try:
                counts = self.client.log_exposures(self.experiment_id, items, batch_size=FLUSH_BATCH, timeout=timeout)
            except BaseException:
                self._requeue(items)
                raise
            with self._lock:
                for key in ("accepted", "duplicate", "rejected"):
                    self._totals[key] += getattr(counts, key)
                if counts.rejections:
                    self._last_rejections = counts.rejections
            return counts

    def _requeue(self, items: FlatExposures) -> None:
        with self._lock:
            self._totals["flush_failures"] += 1
            self._retry = items.flat + self._retry
            excess = (len(self._retry) + len(self._queue)) // 4 - self.max_queued
            if excess > 0:
                drop = min(excess, len(self._retry) // 4)
                del self._retry[: 4 * drop]
                self._dropped_retry += drop

    def _flush_loop(self) -> None:
        failures = 0
        while True:
            self._flush_now.wait(self.flush_every_s)
            self._flush_now.clear()
            if self._closed:
                return
            try:
                self.flush(timeout=FLUSH_TIMEOUT_S)
                failures = 0
            except Exception as exc:  # noqa: BLE001 - kept queued, retried next time
                failures += 1
                if failures == 1 or failures % 30 == 0:
                    log.warning("sending exposures of %r failed (%d in a row): %s", self.experiment_id, failures, exc)
                # Retry after flush_every_s, not as soon as flush_size are queued (they are).
                self._flush_wanted = True
                self._flush_now.clear()

    # Introspection and lifetime.

    def stats(self) -> AssignerStats:
        with self._lock:
            in_queue = len(self._queue) // 4
            retried = len(self._retry) // 4
            dropped_queue = self._dropped_queue
            assigned = self._taken_from_queue + in_queue + dropped_queue
            # Retried exposures are older than the queue's: the next flush drops those beyond
            # the bound, so they count as dropped already.
            pending_excess = min(retried, max(0, retried + in_queue - self.max_queued))
            queued = in_queue + retried - pending_excess
            dropped_queue += pending_excess
            snap = self.snapshot
            return AssignerStats(
                snapshot_assignments=assigned,
                rpc_assignments=_count_value(self._rpc_count),
                queued=queued,
                dropped=self._dropped_retry + dropped_queue,
                accepted=self._totals["accepted"],
                duplicate=self._totals["duplicate"],
                rejected=self._totals["rejected"],
                flush_failures=self._totals["flush_failures"],
                refreshes=self._refreshes,
                refresh_failures=self._refresh_failures,
                version=snap.version if snap is not None and self._snap is not None else 0,
                snapshot_age_s=(time.time_ns() // 1_000_000 - snap.issued_unix_ms) / 1000.0 if snap else -1.0,
                last_rejections=self._last_rejections,
            )

    def close(self, *, timeout: float | None = None) -> RewardCounts:
        """Stops the threads and sends what is queued (raising if that fails: the exposures
        stay queued and `flush()` may be called again while the client is open)."""
        if not self._closed:
            self._closed = True
            self._snap = None
            self._refresh_now.set()
            self._flush_now.set()
            for t in (self._refresher, self._flusher):
                if t is not threading.current_thread():
                    t.join(timeout=30)
            self._snap = None
        return self.flush(timeout=timeout)

    def __enter__(self) -> LocalAssigner:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # do not hide the exception in flight
            self.close()
        except Exception as err:  # noqa: BLE001
            log.warning("exposures of %r not sent on close: %s", self.experiment_id, err)
