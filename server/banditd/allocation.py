"""Allocation snapshots for assignment in the SDK, and the exposures it logs back.

A snapshot is what a Decide would do now, as probabilities over the active arms: the policy's
own (P(best) for Thompson — the same cached inclusion probabilities Decide logs — exact ones
for the others), mixed with the control share and traffic floors, uniform during a burn-in,
the fallback arm alone in FALLBACK. It is versioned and stored (`allocations` db), so an
exposure naming a version can be checked and gets that snapshot's exact propensity.

Assignment (the SDK and `Decide` with `allocation_version` use the same rule): u = the
BLAKE2b-64 digest of salt + "\\0" + unit id read big endian; with T_i = min(2^64 - 1,
floor(cumulative_i x 2^64)) from the cumulative sums of the probabilities, the arm is the first
i with T_i > u (the last arm when none is). Comparing the digest bytes with T_i as 8 bytes
keeps the SDK's hot path free of int conversions. The salt is fixed per experiment, so a unit keeps its
arm across snapshots whenever its interval still covers u.

The server re-issues a snapshot at most once per REISSUE_S per experiment (callers in between
get the current one). Clients refresh every `ttl_seconds` (10 s) and never assign from a
snapshot older than `max_age_seconds` (60 s): past that they fall back to Decide.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import re
import threading
import time
from array import array
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from banditd.errors import (
    BanditdError,
    ExperimentPaused,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from banditd.experiment import ExperimentRuntime, now_ms
from banditd.ops import LogExposureBatch, LogExposures, PutAllocation
from banditd.store import SDK_ID_CHARS, DecisionBatch, DecisionRecord, new_decision_id
from banditd.validation import ID_LIMITS, check_id

if TYPE_CHECKING:
    from banditd.engine import DecisionResult, Engine

TTL_S = 10.0
MAX_AGE_S = 60.0
REISSUE_S = 1.0
MAX_EXPOSURES_PER_BATCH = 10_000
# Exposures may be reported this late (an SDK buffering through an outage), never from the future.
FUTURE_SLACK_MS = 5 * 60_000
DECISION_ID = re.compile(r"[0-9a-f]{23}")
HEX_DIGITS = re.compile(r"[0-9a-f]*")


def salt_of(experiment_id: str, created_ms: int) -> str:
    return f"{experiment_id}:{created_ms}"


def unit_digest(salt: str, unit_id: str) -> bytes:
    return hashlib.blake2b(f"{salt}\0{unit_id}".encode(), digest_size=8).digest()


def thresholds(probabilities: list[float]) -> list[bytes]:
    top = 2**64 - 1
    return [min(top, int(c * 2**64)).to_bytes(8, "big") for c in itertools.accumulate(probabilities)]


def assign(snapshot: dict[str, Any], unit_id: str) -> int:
    """Index (into the snapshot's arms) of the unit's arm."""
    thr = snapshot["thresholds"]
    return min(bisect.bisect_right(thr, unit_digest(snapshot["salt"], unit_id)), len(thr) - 1)


def probabilities(rt: ExperimentRuntime) -> tuple[list[str], list[float]]:
    """(active arm ids, probability of each) of a decision now (see the module doc)."""
    spec = rt.spec
    active = spec.active_indices
    ids = [spec.arms[i].id for i in active]
    n = len(active)
    if spec.state == "fallback":
        return ids, [1.0 if a == spec.serving_arm else 0.0 for a in ids]
    cfg = spec.config
    if cfg.burn_in and rt.burning_in(cfg.burn_in):
        return ids, [1.0 / n] * n
    w = rt.bandit.propensities_of(active, 1)
    floors = spec.floor_vector
    total, c = math.fsum(floors), cfg.control_share
    p = [c / n + (1.0 - c) * (f + (1.0 - total) * wj) for f, wj in zip(floors, w, strict=True)]
    s = math.fsum(p)  # Monte Carlo estimates are smoothed: make them a distribution
    return ids, [x / s for x in p]


class Allocations:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._current: dict[str, tuple[float, int, dict[str, Any]]] = {}  # exp -> (issued, spec version, snap)
        self._issued: dict[tuple[str, int], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def current(self, experiment_id: str, timeout: float | None = None) -> dict[str, Any]:
        rt = self.engine.require(experiment_id)
        spec = rt.spec
        if spec.state == "paused":
            raise ExperimentPaused(f"experiment {experiment_id!r} is paused; resume it to get an allocation")
        if rt.model is not None:
            raise FailedPrecondition(
                f"experiment {experiment_id!r} is contextual: its allocation depends on each unit's context, so "
                "there is no snapshot to assign from; use Decide"
            )
        now = time.monotonic()
        with self._lock:
            hit = self._current.get(experiment_id)
        if hit is not None and now - hit[0] < REISSUE_S and hit[1] == spec.version:
            return hit[2]
        arm_ids, probs = probabilities(rt)
        snap: dict[str, Any] = {
            "experiment_id": experiment_id, "arm_ids": arm_ids, "probabilities": probs,
            "salt": salt_of(experiment_id, spec.created_ms), "issued_unix_ms": now_ms(), "ttl_seconds": TTL_S,
            "max_age_seconds": MAX_AGE_S, "sticky": spec.sticky,
        }  # fmt: skip
        snap["version"] = self.engine.writer.submit_and_wait(PutAllocation(experiment_id, snap), timeout)
        self._remember(snap)
        with self._lock:
            self._current[experiment_id] = (now, spec.version, snap)
        return snap

    def _remember(self, snap: dict[str, Any]) -> dict[str, Any]:
        snap["thresholds"] = thresholds(snap["probabilities"])
        snap["index"] = {a: i for i, a in enumerate(snap["arm_ids"])}
        with self._lock:
            if len(self._issued) > 10_000:
                self._issued.clear()
            self._issued[(snap["experiment_id"], snap["version"])] = snap
        return snap

    def issued(self, experiment_id: str, version: int) -> dict[str, Any]:
        """A snapshot this server (or another process of it) issued; NOT_FOUND otherwise."""
        with self._lock:
            snap = self._issued.get((experiment_id, version))
        if snap is None and version > 0:
            stored = self.engine.store.allocation(experiment_id, version)
            if stored is not None:
                snap = self._remember(stored)
        if snap is None:
            raise NotFound(f"allocation version {version} was never issued for experiment {experiment_id!r}")
        return snap

    def decide(self, experiment_id: str, unit_id: str, version: int) -> DecisionResult:
        """Decide from a snapshot (the SDK's rule): the unit's arm, with the snapshot's propensity."""
        rt = self.engine.require(experiment_id)
        if rt.spec.state == "paused":
            raise ExperimentPaused(f"experiment {experiment_id!r} is paused; resume it to get decisions")
        check_id("unit id", unit_id)
        snap = self.issued(experiment_id, version)
        i = assign(snap, unit_id)
        arm = snap["arm_ids"][i]
        if arm not in rt.index:
            raise FailedPrecondition(f"arm {arm!r} of allocation {version} is no longer in the experiment")
        scores = tuple(rt.bandit.means_of([rt.index[arm]]))
        return self.engine._record(rt, unit_id, (arm,), (snap["probabilities"][i],), scores, False, None, None,
                                   "snapshot")  # fmt: skip

    def log_exposures(
        self, experiment_id: str, exposures: list[Any], timeout: float | None
    ) -> list[tuple[str, str]]:
        """(status, reason) per exposure: accepted, duplicate, or an error code with the reason."""
        spec = self.engine.get_experiment(experiment_id)
        now = now_ms()
        window_ms = spec.window_seconds * 1000
        out: list[tuple[str, str]] = [("", "")] * len(exposures)
        records: list[DecisionRecord] = []
        positions: list[int] = []
        seen: set[str] = set()
        for i, e in enumerate(exposures):
            try:
                rec = self._exposure(spec.id, e, now, window_ms)
            except BanditdError as exc:
                out[i] = (exc.code.name, exc.message)
                continue
            if rec.decision_id in seen:
                out[i] = ("duplicate", "")
                continue
            seen.add(rec.decision_id)
            records.append(rec)
            positions.append(i)
        if records:
            results = self.engine.writer.submit_and_wait(LogExposures(records, spec), timeout)
            for i, status in zip(positions, results, strict=True):
                out[i] = (status, "")
        return out

    def submit_columnar(self, experiment_id: str, batch: Any) -> Future[list[str]] | None:
        """A columnar ExposureBatch queued as one record (`ops.LogExposureBatch`) when every
        exposure in it is valid, checked a column at a time: the future gets "accepted" or
        "duplicate" per exposure once durable. None when some item is not valid (or the
        experiment needs per-decision accounting): `log_exposures`, item by item, then says
        which and why. Same checks and results as that path."""
        ids = list(batch.decision_ids)
        n = len(ids)
        arms_in = batch.arms
        if not n or batch.exposures or batch.ts_unix_ms or len(batch.unit_ids) != n or len(arms_in) != n:
            return None
        from banditd.bulk import fast_path  # noqa: PLC0415 - bulk imports the engine's modules

        rt = self.engine.require(experiment_id)
        if not fast_path(rt):
            return None
        try:
            snap = self.issued(experiment_id, batch.allocation_version)
        except NotFound:
            return None
        index = snap["index"]
        table = [index.get(a, -1) for a in batch.arm_ids]
        if -1 in table or max(arms_in) >= len(table):
            return None
        if set(map(len, ids)) != {SDK_ID_CHARS} or not HEX_DIGITS.fullmatch("".join(ids)) or len(set(ids)) != n:
            return None
        now = now_ms()
        window_ms = rt.spec.window_seconds * 1000
        first, last = int(min(ids)[:11], 16), int(max(ids)[:11], 16)  # fixed width: text order is time order
        if last > now + FUTURE_SLACK_MS or (window_ms and now - first > window_ms):
            return None
        units = list(batch.unit_ids)
        sizes = [len(u.encode()) for u in units]
        if min(sizes) == 0 or max(sizes) > ID_LIMITS["unit id"] or "\x00" in "".join(units):
            return None
        arms = array("I", map(table.__getitem__, arms_in))
        props = array("d", map(snap["probabilities"].__getitem__, arms))
        record = DecisionBatch(new_decision_id(now), experiment_id, now, 0, 1, list(snap["arm_ids"]), arms.tobytes(),
                               props.tobytes(), units, "snapshot", ids)  # fmt: skip
        return self.engine.writer.submit_future(LogExposureBatch(record, rt.spec))

    def _exposure(self, experiment_id: str, e: Any, now: int, window_ms: int) -> DecisionRecord:
        did = e.decision_id
        if not DECISION_ID.fullmatch(did):
            raise InvalidArgument(
                f"decision id {did[:64]!r} is not 23 lowercase hex digits (11 of unix ms, then 12 random)"
            )
        made = int(did[:11], 16)
        if made > now + FUTURE_SLACK_MS or (window_ms and now - made > window_ms):
            raise InvalidArgument(f"decision id {did!r} is dated outside the attribution window (or in the future)")
        check_id("unit id", e.unit_id)
        snap = self.issued(experiment_id, e.allocation_version)
        i = snap["index"].get(e.arm_id)
        if i is None:
            raise InvalidArgument(f"arm {e.arm_id[:128]!r} is not in allocation {e.allocation_version}")
        ts = e.ts_unix_ms or made
        if ts > now + FUTURE_SLACK_MS or (window_ms and now - ts > window_ms):
            raise InvalidArgument(f"exposure time {ts} is outside the attribution window (or in the future)")
        return DecisionRecord(did, experiment_id, (e.arm_id,), (snap["probabilities"][i],), e.unit_id, ts, 0,
                              None, None, None, "snapshot")  # fmt: skip
