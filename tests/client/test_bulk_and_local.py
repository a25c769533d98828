"""DecideBulk, GetAllocation and LogExposures in the client, and LocalAssigner.

Two kinds of tests:
- pure (no server): the hash rule against a reference computation, cumulative clamping,
  BulkBatch and the request / exposure batching in `_convert`, and LocalAssigner driven by a
  fake client (stale-snapshot fallback, sticky, exposure batching, retries, the queue bound,
  decision ids, the assign rate);
- END-TO-END (`test_e2e_*`, the `server` fixture: a real `banditd serve`). They skip, saying
  so, when the server answers UNIMPLEMENTED for the new RPCs.
"""

from __future__ import annotations

import array
import asyncio
import hashlib
import itertools
import random
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from banditd_client import (
    REJECTED_ARM,
    Allocation,
    AsyncClient,
    BanditdError,
    BulkBatch,
    ExperimentNotFound,
    ExposureItem,
    LocalAssigner,
    LocalDecision,
    RewardCounts,
    Unavailable,
)
from banditd_client import _convert as conv
from banditd_client.local import arm_index, cumulative, new_decision_id, pick, thresholds, unit_point
from banditd_client.types import ChosenArm, Decision
from banditd_client.v1 import banditd_pb2 as pb
from conftest import wait_for

DECISION_ID = re.compile(r"[0-9a-f]{23}")


# Reference computations, written from the proto's words, independent of banditd_client.local.


def ref_point(salt: str, unit_id: str) -> float:
    digest = hashlib.blake2b((salt + "\x00" + unit_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def ref_arm(probabilities: list[float] | tuple[float, ...], salt: str, unit_id: str) -> int:
    """The documented rule, with integers: first i with min(2^64 - 1, floor(c_i 2^64)) > u."""
    digest = hashlib.blake2b((salt + "\x00" + unit_id).encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big")
    total = 0.0
    for i, p in enumerate(probabilities):
        total += p
        if min(2**64 - 1, int(total * 2**64)) > u:
            return i
    return len(probabilities) - 1


def make_allocation(
    probabilities: list[float] | None = None,
    *,
    version: int = 7,
    salt: str = "exp:1700000000000",
    ttl: float = 10.0,
    max_age: float = 60.0,
    sticky: bool = False,
    issued_ms: int | None = None,
) -> Allocation:
    probs = probabilities if probabilities is not None else [0.25, 0.05, 0.1, 0.0, 0.2, 0.1, 0.1, 0.05, 0.1, 0.05]
    return Allocation(
        experiment_id="exp",
        version=version,
        arm_ids=tuple(f"arm-{i}" for i in range(len(probs))),
        probabilities=tuple(probs),
        salt=salt,
        issued_unix_ms=issued_ms if issued_ms is not None else time.time_ns() // 1_000_000,
        ttl_seconds=ttl,
        max_age_seconds=max_age,
        sticky=sticky,
    )


class FakeClient:
    """What LocalAssigner uses of Client: get_allocation, decide, log_exposures."""

    def __init__(self, allocation: Allocation) -> None:
        self.allocation = allocation
        self.fail_allocation: BaseException | None = None
        self.fail_exposures: BaseException | None = None
        self.allocation_calls = 0
        self.decide_calls: list[str] = []
        self.sent: list[tuple[Any, ...]] = []
        self.send_calls = 0
        self.encode = False  # build the real protobuf batches (what a Client would send)
        self.lock = threading.Lock()

    def get_allocation(self, experiment_id: str) -> Allocation:
        self.allocation_calls += 1
        if self.fail_allocation is not None:
            raise self.fail_allocation
        return self.allocation

    def decide(self, experiment_id: str, unit_id: str) -> Decision:
        self.decide_calls.append(unit_id)
        return Decision(new_decision_id(), (ChosenArm("server-arm", 0.5, 0.4),))

    def log_exposures(self, experiment_id: str, items: list[Any], *, batch_size: int, timeout: Any) -> RewardCounts:
        with self.lock:
            self.send_calls += 1
            if self.fail_exposures is not None:
                raise self.fail_exposures
            if self.encode:
                for _ in conv.exposure_batches(experiment_id, items, batch_size):
                    pass
            self.sent.extend(items)
        return RewardCounts(accepted=len(items), duplicate=0, rejected=0)


def unavailable() -> Unavailable:
    err = Unavailable("server down")
    err.code = grpc.StatusCode.UNAVAILABLE
    return err


# The hash rule.


def test_unit_point_and_arm_match_the_reference() -> None:
    rng = random.Random(5)
    salts = ["exp:1700000000000", "", "ü-salt:1", "x" * 200]
    units = [f"user-{rng.randrange(10**9)}" for _ in range(3000)] + ["", "ünïcode-☃", "a\x01b", "0" * 512]
    alloc = make_allocation()
    for salt in salts:
        for u in units:
            assert unit_point(salt, u) == ref_point(salt, u)
    for u in units:
        i = arm_index(alloc, u)
        assert i == ref_arm(alloc.probabilities, alloc.salt, u)
        assert alloc.probabilities[i] > 0  # a zero-probability arm is never chosen (but by rounding)


def test_point_is_uniform_enough() -> None:
    """10 equal arms: each gets about a tenth of 20,000 units (the hash spreads them)."""
    alloc = make_allocation([0.1] * 10)
    counts = [0] * 10
    for n in range(20_000):
        counts[arm_index(alloc, f"u{n}")] += 1
    assert all(1800 < c < 2200 for c in counts), counts


def test_pick_is_the_first_threshold_above_u_and_clamps() -> None:
    def point(u: float) -> bytes:
        return min(2**64 - 1, int(u * 2**64)).to_bytes(8, "big")

    thr = thresholds([0.3, 0.3, 0.0, 0.3999999])
    assert thr == [point(c) for c in (0.3, 0.6, 0.6, 0.3 + 0.3 + 0.0 + 0.3999999)]
    assert pick(thr, point(0.0)) == 0
    assert pick(thr, point(0.2999)) == 0
    assert pick(thr, point(0.3)) == 1  # strictly greater: u on a boundary belongs to the next arm
    assert pick(thr, point(0.6)) == 3  # the zero-probability arm (index 2) is skipped
    assert pick(thr, point(0.99999995)) == 3  # above every sum (rounding): the last arm
    assert pick(thr, b"\xff" * 8) == 3
    assert pick(thresholds([1.0]), b"\xff" * 8) == 0  # 1.0 maps to 2^64 - 1, the last arm anyway
    # Left-to-right running sums, as the server computes them.
    probs = [0.1] * 10
    expected, total = [], 0.0
    for p in probs:
        total += p
        expected.append(total)
    assert cumulative(probs) == expected


def test_new_decision_id_format() -> None:
    ms = 1_700_000_000_123
    did = new_decision_id(ms)
    assert DECISION_ID.fullmatch(did) and int(did[:11], 16) == ms


# BulkBatch and request batching.


def test_bulk_batch_columnar_access() -> None:
    resp = pb.DecideBulkResponse(
        batch_id="0190abcdef0123456789abc", arm_ids=["a", "b", "c"], k=2, first_index=20_000, model_version=3,
        rejected=[pb.RejectedUnit(index=1, unit_id="bad\x00", code="INVALID_ARGUMENT", reason="NUL")],
    )  # fmt: skip
    resp.arms.extend([2, 0, REJECTED_ARM, REJECTED_ARM, 1, 2])
    resp.propensities.extend([0.5, 0.25, 0.0, 0.0, 0.75, 0.5])
    stream = conv.BulkStream()
    stream.sent(20_000, ["u0", "bad\x00", "u2"])
    batch = stream.answered(resp)
    assert stream.pending == 0
    assert isinstance(batch, BulkBatch) and len(batch) == 3 and batch.first_index == 20_000
    assert batch.arm_index.typecode == "I" and batch.propensities.typecode == "d"
    assert batch.decision_id(2) == "0190abcdef0123456789abc.2"
    assert batch.decision_ids == [f"0190abcdef0123456789abc.{i}" for i in range(3)]
    assert [batch.arm(i) for i in range(3)] == ["c", None, "b"]
    assert batch.arms(0) == ("c", "a") and batch.arms(1) == () and batch.arms(2) == ("b", "c")
    assert batch.propensity(2) == 0.75 and batch.propensity(1) == 0.0
    assert batch.first_arms == ["c", None, "b"]
    assert batch.rejected[0].index == 1 and batch.rejected[0].code == "INVALID_ARGUMENT"
    assert batch.model_version == 3
    with pytest.raises(IndexError):
        batch.decision_id(3)
    # Per-unit ids (experiments decided unit by unit) win over batch_id.
    explicit = pb.DecideBulkResponse(decision_ids=["x1", "x2"], arm_ids=["a"], arms=[0, 0], propensities=[1, 1])
    b2 = conv.bulk_batch(explicit, ["p", "q"])
    assert b2.k == 1 and b2.decision_id(1) == "x2" and b2.decision_ids == ["x1", "x2"]
    # An answer for no batch sent, or with the wrong number of arms, is an error.
    with pytest.raises(BanditdError, match="no batch sent"):
        conv.BulkStream().answered(explicit)
    with pytest.raises(BanditdError, match="arms for 3 units"):
        conv.bulk_batch(explicit, ["p", "q", "r"])


def test_bulk_requests_are_lazy_batches() -> None:
    pulled = 0

    def units() -> Iterator[str]:
        nonlocal pulled
        for i in range(25_000):
            pulled += 1
            yield f"u{i}"

    gen = conv.bulk_requests("exp", units(), 2, None, 10_000)
    first, batch_units, req = next(gen)
    assert pulled == 10_000  # one batch pulled, not the whole stream
    assert first == 0 and len(batch_units) == 10_000 and list(req.unit_ids) == batch_units
    assert req.experiment_id == "exp" and req.k == 2 and not req.contexts
    rest = list(gen)
    assert [(f, len(u)) for f, u, _ in rest] == [(10_000, 10_000), (20_000, 5_000)]
    # Contexts: one per unit, typed like decide's.
    ctx = [{"country": "de", "age": 30}, {"flag": True}, {}]
    reqs = list(conv.bulk_requests("exp", ["a", "b", "c"], 1, ctx, 2))
    assert [len(r.contexts) for _, _, r in reqs] == [2, 1]
    assert reqs[0][2].contexts[0].features["age"].number == 30.0
    assert reqs[0][2].contexts[1].features["flag"].text == "true"
    with pytest.raises(ValueError):  # fewer contexts than units
        list(conv.bulk_requests("exp", ["a", "b", "c"], 1, ctx[:2], 10))
    for bad in ({"k": 0}, {"batch_size": 0}, {"batch_size": 100_001}, {"max_in_flight": 0}):
        args = {"k": 1, "batch_size": 10, "max_in_flight": 1, **bad}
        with pytest.raises(ValueError):
            conv.check_bulk_args(**args)


def test_exposure_batches() -> None:
    items: list[Any] = [(f"{i:023x}", f"u{i}", "ab"[i % 2], 3, 1_700_000_000_000 + i) for i in range(2500)]
    # A list of 5-tuples (LocalAssigner's queue) goes columnar.
    batches = list(conv.exposure_batches("exp", items, 1000))
    assert [len(b.decision_ids) for b in batches] == [1000, 1000, 500]
    assert all(b.experiment_id == "exp" and b.allocation_version == 3 and not b.exposures for b in batches)
    b = batches[2]
    last = (b.decision_ids[499], b.unit_ids[499], b.arm_ids[b.arms[499]], b.allocation_version, b.ts_unix_ms[499])
    assert last == items[-1]
    # Two snapshot versions in one chunk: one columnar message per version.
    mixed = [(*items[0][:3], 3, 1), (*items[1][:3], 4, 2)]
    assert sorted(m.allocation_version for m in conv.exposure_batches("exp", mixed)) == [3, 4]
    # Any other iterable: one Exposure message each.
    batches = list(conv.exposure_batches("exp", iter(items), 1000))
    assert [len(b.exposures) for b in batches] == [1000, 1000, 500]
    e = batches[2].exposures[499]
    assert (e.decision_id, e.unit_id, e.arm_id, e.allocation_version, e.ts_unix_ms) == items[-1]
    forms: list[Any] = [
        ExposureItem("d1", "u1", "a", 2, 5),
        ("d2", "u2", "b", 2),
        {"decision_id": "d3", "unit_id": "u3", "arm": "c", "allocation_version": 2},
    ]
    (batch,) = conv.exposure_batches("exp", forms)
    assert [(x.decision_id, x.arm_id, x.ts_unix_ms) for x in batch.exposures] == [
        ("d1", "a", 5),
        ("d2", "b", 0),
        ("d3", "c", 0),
    ]
    with pytest.raises(ValueError):
        conv.exposure_batches("exp", items, 10_001)
    with pytest.raises(ValueError, match="got 2 values"):
        list(conv.exposure_batches("exp", [("d", "u")]))  # type: ignore[list-item]


# LocalAssigner with a fake client.


def test_assign_from_snapshot_matches_the_rule_and_queues_exposures() -> None:
    alloc = make_allocation()
    fake = FakeClient(alloc)
    t0 = time.time_ns() // 1_000_000
    with LocalAssigner(fake, "exp", flush_every_s=60, flush_size=10**6) as assigner:  # type: ignore[arg-type]
        units = [f"user-{i}" for i in range(2000)] + ["user-0"]
        decisions = [assigner.assign(u) for u in units]
        t1 = time.time_ns() // 1_000_000
        for u, d in zip(units, decisions, strict=True):
            assert isinstance(d, LocalDecision) and d.source == "snapshot" and d.unit_id == u
            i = ref_arm(alloc.probabilities, alloc.salt, u)
            assert d.arm == alloc.arm_ids[i] and d.propensity == alloc.probabilities[i]
            assert d.allocation_version == 7
            assert DECISION_ID.fullmatch(d.decision_id)
            assert t0 <= int(d.decision_id[:11], 16) <= t1
        assert decisions[0].arm == decisions[-1].arm  # same unit, same snapshot: same arm
        assert len({d.decision_id for d in decisions}) == len(decisions)
        assert fake.decide_calls == [] and fake.sent == []
        assert assigner.stats().queued == len(units)
        counts = assigner.flush()
        assert counts.accepted == len(units) and assigner.flush() == RewardCounts(0, 0, 0)
        sent = {s[0]: s for s in fake.sent}
        for d in decisions:
            # No time of its own: the server takes it from the decision id.
            assert sent[d.decision_id] == (d.decision_id, d.unit_id, d.arm, 7)
        (batch,) = conv.exposure_batches("exp", fake.sent, 5000)  # what a Client sends: columnar
        assert list(batch.decision_ids) == [d.decision_id for d in decisions] and not batch.ts_unix_ms
        assert [batch.arm_ids[a] for a in batch.arms] == [d.arm for d in decisions]
        assert list(batch.unit_ids) == units and batch.allocation_version == 7 and not batch.exposures
        (again,) = conv.exposure_batches("exp", decisions, 5000)  # LocalDecisions log themselves
        assert again == batch
        stats = assigner.stats()
        assert stats.snapshot_assignments == len(units) and stats.accepted == len(units)
        assert stats.queued == 0 and stats.dropped == 0 and stats.version == 7


def test_exposures_of_two_snapshot_versions_name_their_own_arms() -> None:
    """The queue holds arm indexes: exposures queued before and after a snapshot with other
    arms are sent with each version's own arm ids (one columnar batch per version)."""
    fake = FakeClient(make_allocation([0.5, 0.5]))
    with LocalAssigner(fake, "exp", flush_every_s=60, flush_size=10**6) as assigner:  # type: ignore[arg-type]
        before = [assigner.assign(f"a{i}") for i in range(50)]
        second = make_allocation([0.2, 0.3, 0.5], version=8)
        fake.allocation = replace(second, arm_ids=("z", "y", "x"))
        assigner._refresh()
        after = [assigner.assign(f"b{i}") for i in range(50)]
        assert {d.arm for d in before} <= {"arm-0", "arm-1"} and {d.arm for d in after} <= {"x", "y", "z"}
        items = assigner._take()
        batches = list(conv.exposure_batches("exp", items, 5000))
        assert [b.allocation_version for b in batches] == [7, 8]
        sent = {
            d: (b.allocation_version, b.arm_ids[a])
            for b in batches
            for d, a in zip(b.decision_ids, b.arms, strict=True)
        }
        assert sent == {d.decision_id: (d.allocation_version, d.arm) for d in before + after}
        assert list(items) == [(d.decision_id, d.unit_id, d.arm, d.allocation_version) for d in before + after]
        assigner._requeue(items)  # as after a failed send: sent again later, arms intact
        assert assigner.flush().accepted == 100
    assert fake.sent == [(d.decision_id, d.unit_id, d.arm, d.allocation_version) for d in before + after]


def test_ids_are_unique_across_threads() -> None:
    fake = FakeClient(make_allocation())
    with LocalAssigner(fake, "exp", flush_every_s=0.05, flush_size=500) as assigner:  # type: ignore[arg-type]
        out: list[list[str]] = [[] for _ in range(4)]

        def work(k: int) -> None:
            out[k].extend(assigner.assign(f"t{k}-{i}").decision_id for i in range(5000))

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ids = [i for part in out for i in part]
    assert len(set(ids)) == 20_000
    assert sorted(s[0] for s in fake.sent) == sorted(ids)  # every exposure sent once, by close


def test_exposures_flush_by_size_and_by_time() -> None:
    fake = FakeClient(make_allocation())
    with LocalAssigner(fake, "exp", flush_every_s=60, flush_size=100) as assigner:  # type: ignore[arg-type]
        for i in range(250):
            assigner.assign(f"u{i}")
        assert wait_for(lambda: len(fake.sent) >= 200)  # flush_size reached twice: the flusher woke
    assert len(fake.sent) == 250  # close sent the rest
    fake2 = FakeClient(make_allocation())
    with LocalAssigner(fake2, "exp", flush_every_s=0.1, flush_size=10**6) as assigner:  # type: ignore[arg-type]
        assigner.assign("x")
        assert wait_for(lambda: len(fake2.sent) == 1, 3)  # by time


def test_failed_sends_stay_queued_and_are_retried() -> None:
    fake = FakeClient(make_allocation())
    fake.fail_exposures = unavailable()
    assigner = LocalAssigner(fake, "exp", flush_every_s=0.05, flush_size=10**6)  # type: ignore[arg-type]
    try:
        first = [assigner.assign(f"u{i}").decision_id for i in range(30)]
        with pytest.raises(Unavailable):
            assigner.flush()
        assert wait_for(lambda: fake.send_calls >= 3)  # the background flusher keeps trying
        later = [assigner.assign(f"v{i}").decision_id for i in range(20)]
        assert assigner.stats().queued == 50 and assigner.stats().flush_failures >= 3
        fake.fail_exposures = None
        assert wait_for(lambda: len(fake.sent) == 50)
        assert [s[0] for s in fake.sent] == first + later  # oldest first, nothing lost or doubled
        assert assigner.stats().dropped == 0
    finally:
        assigner.close()


def test_queue_bound_drops_the_oldest() -> None:
    fake = FakeClient(make_allocation())
    fake.fail_exposures = unavailable()
    assigner = LocalAssigner(fake, "exp", flush_every_s=60, flush_size=10**6, max_queued=100)  # type: ignore[arg-type]
    try:
        ids = [assigner.assign(f"u{i}").decision_id for i in range(80)]
        with pytest.raises(Unavailable):
            assigner.flush()  # 80 now wait in the retry list
        ids += [assigner.assign(f"v{i}").decision_id for i in range(70)]  # 150 > 100
        with pytest.raises(Unavailable):
            assigner.flush()
        stats = assigner.stats()
        assert stats.queued == 100 and stats.dropped == 50
        ids += [assigner.assign(f"w{i}").decision_id for i in range(150)]  # the deque alone overflows
        stats = assigner.stats()
        assert stats.dropped == 50 + 150 and stats.queued == 100, stats
        fake.fail_exposures = None
        assert assigner.flush().accepted == 100
        assert [s[0] for s in fake.sent] == ids[-100:]  # the newest kept
    finally:
        assigner.close()


def test_stale_snapshot_falls_back_to_decide_and_recovers() -> None:
    fake = FakeClient(make_allocation(ttl=0.1, max_age=1.0))
    assigner = LocalAssigner(fake, "exp", flush_every_s=60)  # type: ignore[arg-type]
    try:
        assert assigner.assign("a").source == "snapshot"
        fake.fail_allocation = unavailable()
        time.sleep(0.2)  # refreshes fail; the snapshot is still young enough
        assert assigner.assign("b").source == "snapshot"
        assert assigner.stats().refresh_failures >= 1
        time.sleep(0.9)  # now older than max_age_seconds
        d = assigner.assign("c")
        assert (d.source, d.arm, d.allocation_version, d.propensity) == ("rpc", "server-arm", 0, 0.4)
        assert fake.decide_calls == ["c"] and assigner.stats().version == 0
        assert assigner.stats().rpc_assignments == 1
        fake.fail_allocation = None
        fake.allocation = make_allocation(version=8, ttl=0.1, max_age=1.0)
        assert wait_for(lambda: assigner.assign("d").source == "snapshot", 5)
        assert assigner.assign("e").allocation_version == 8
        assigner.flush()
        assert {s[1] for s in fake.sent} >= {"a", "b", "e"} and "c" not in {s[1] for s in fake.sent}
    finally:
        assigner.close()


def test_snapshot_age_counts_from_issue_time() -> None:
    """A snapshot issued 59.8 s ago (max age 60) is usable for only ~0.2 s more."""
    issued = time.time_ns() // 1_000_000 - 59_800
    fake = FakeClient(make_allocation(issued_ms=issued, ttl=10, max_age=60))
    fake_fail = unavailable()
    assigner = LocalAssigner(fake, "exp", flush_every_s=60)  # type: ignore[arg-type]
    try:
        fake.fail_allocation = fake_fail
        assert assigner.assign("a").source == "snapshot"
        assert wait_for(lambda: assigner.assign("b").source == "rpc", 3)
    finally:
        assigner.close()


def test_sticky_experiments_always_use_decide() -> None:
    fake = FakeClient(make_allocation(sticky=True))
    with LocalAssigner(fake, "exp", flush_every_s=60) as assigner:  # type: ignore[arg-type]
        decisions = [assigner.assign(f"u{i}") for i in range(5)]
    assert all(d.source == "rpc" for d in decisions) and len(fake.decide_calls) == 5
    assert fake.sent == []  # the server logged those decisions itself


def test_first_fetch_errors() -> None:
    fake = FakeClient(make_allocation())
    fake.fail_allocation = ExperimentNotFound("no such experiment")
    with pytest.raises(ExperimentNotFound):
        LocalAssigner(fake, "exp")  # type: ignore[arg-type]
    fake.fail_allocation = unavailable()  # transient: starts, decides by RPC, recovers
    assigner = LocalAssigner(fake, "exp", flush_every_s=60)  # type: ignore[arg-type]
    try:
        assert assigner.assign("a").source == "rpc"
        fake.fail_allocation = None
        assert wait_for(lambda: assigner.assign("b").source == "snapshot", 5)
    finally:
        assigner.close()
    with pytest.raises(RuntimeError, match="closed"):
        assigner.assign("c")


def test_assign_rate() -> None:
    """Assignments per second in one thread, 10 arms, each exposure queued (the flusher runs:
    with `encode` it builds the protobuf batches a Client would send, under the same GIL)."""
    units = [f"user-{i}" for i in range(200_000)]
    rates = {}
    for encode in (False, True):
        fake = FakeClient(make_allocation([0.1] * 10))
        fake.encode = encode
        with LocalAssigner(fake, "exp", flush_every_s=1.0, flush_size=1000) as assigner:  # type: ignore[arg-type]
            assign = assigner.assign
            best = 0.0
            for _ in range(3):
                t0 = time.perf_counter()
                for u in units:
                    assign(u)
                best = max(best, len(units) / (time.perf_counter() - t0))
            rates[encode] = best
    print(
        f"\nLocalAssigner.assign: {rates[False]:,.0f}/s (exposures queued, flusher not encoding); "
        f"{rates[True]:,.0f}/s while the flusher also encodes them as protobuf"
    )
    assert rates[False] >= 100_000


# End to end, against a real server (skipped while the server lacks the RPCs).


def require(call: Any) -> Any:
    try:
        return call()
    except BanditdError as exc:
        if exc.code == grpc.StatusCode.UNIMPLEMENTED:
            pytest.skip(f"server does not implement this RPC yet: {exc}")
        raise


def test_e2e_decide_bulk(server: Any) -> None:
    with server.client() as c:
        c.create_experiment("bulk", [f"arm{i}" for i in range(10)])
        units = [f"user-{i}" for i in range(25_000)]
        batches = require(lambda: list(c.decide_bulk("bulk", iter(units), batch_size=10_000)))
        assert [(b.first_index, len(b)) for b in batches] == [(0, 10_000), (10_000, 10_000), (20_000, 5_000)]
        assert [u for b in batches for u in b.unit_ids] == units
        assert all(not b.rejected for b in batches)
        arms = [b.arm(i) for b in batches for i in range(len(b))]
        assert None not in arms and set(arms) <= {f"arm{i}" for i in range(10)}
        assert all(0 < p <= 1 for b in batches for p in b.propensities)
        ids = [d for b in batches for d in b.decision_ids]
        assert len(set(ids)) == 25_000
        for did in (ids[0], ids[12_345], ids[-1]):
            assert c.reward(did, 1.0) is True
        assert c.reward(ids[0], 1.0) is False  # a duplicate, like any decision
        stats = c.arm_stats("bulk")
        assert sum(s.pulls for s in stats) == 25_000 and sum(s.rewards for s in stats) == 3
        # A bad unit is refused in place; the others are decided. Slates: k arms per unit.
        (batch,) = c.decide_bulk("bulk", ["ok-1", "bad\x00unit", "ok-2"], k=3)
        assert [r.index for r in batch.rejected] == [1] and batch.rejected[0].unit_id == "bad\x00unit"
        assert batch.arm(1) is None and batch.arms(1) == () and len(set(batch.arms(0))) == 3
        assert c.reward(batch.decision_id(2), 1.0, arm=batch.arms(2)[1]) is True
        with pytest.raises(ExperimentNotFound):
            list(c.decide_bulk("nope", ["u"]))


def test_e2e_decide_bulk_is_lazy_and_rate(server: Any) -> None:
    with server.client() as c:
        c.create_experiment("bulk-rate", [f"arm{i}" for i in range(10)])
        pulled = 0

        def units(n: int) -> Iterator[str]:
            nonlocal pulled
            for i in range(n):
                pulled += 1
                yield f"user-{i}"

        stream = c.decide_bulk("bulk-rate", units(100_000), batch_size=1000, max_in_flight=4)
        first = require(lambda: next(stream))
        time.sleep(0.3)  # a slow consumer: the sender must wait for answers
        assert len(first) == 1000 and pulled <= 1000 * (4 + 2)
        stream.close()  # stopping early cancels the stream
        t0 = time.perf_counter()
        n = sum(len(b) for b in c.decide_bulk("bulk-rate", (f"u-{i}" for i in range(200_000))))
        rate = n / (time.perf_counter() - t0)
        print(f"\ndecide_bulk: {rate:,.0f} decisions/s through one stream (200,000 units, 10 arms, batches of 10,000)")
        assert n == 200_000


def test_e2e_async_bulk_allocation_and_exposures(server: Any) -> None:
    async def run() -> None:
        async with AsyncClient(server.target) as c:
            await c.create_experiment("abulk", ["a", "b", "c"])
            batches = [b async for b in c.decide_bulk("abulk", (f"u{i}" for i in range(2500)), batch_size=1000)]
            assert [len(b) for b in batches] == [1000, 1000, 500]
            ids = [d for b in batches for d in b.decision_ids]
            assert len(set(ids)) == 2500 and await c.reward(ids[7], 1.0) is True
            alloc = await c.get_allocation("abulk")
            assert alloc.arm_ids == ("a", "b", "c") and abs(sum(alloc.probabilities) - 1) < 1e-9
            items = [ExposureItem(new_decision_id(), f"x{i}", alloc.arm_ids[arm_index(alloc, f"x{i}")], alloc.version)
                     for i in range(10)]  # fmt: skip
            counts = await c.log_exposures("abulk", items)
            assert counts.accepted == 10 and await c.reward(items[3].decision_id, 1.0) is True

    require(lambda: asyncio.run(run()))


def test_e2e_log_exposures_counts(server: Any) -> None:
    with server.client() as c:
        c.create_experiment("expo", ["a", "b"])
        alloc = require(lambda: c.get_allocation("expo"))
        assert alloc.version > 0 and alloc.salt and alloc.ttl_seconds > 0 and alloc.max_age_seconds >= alloc.ttl_seconds
        ms = time.time_ns() // 1_000_000
        items = [(new_decision_id(ms), f"u{i}", "a", alloc.version, ms) for i in range(2500)]
        counts = c.log_exposures("expo", items, batch_size=1000)
        assert (counts.accepted, counts.duplicate, counts.rejected) == (2500, 0, 0)
        again = c.log_exposures("expo", items[:10] + [(new_decision_id(), "u", "no-such-arm", alloc.version, ms)])
        assert (again.accepted, again.duplicate, again.rejected) == (0, 10, 1)
        assert again.rejections[0].index == 10
        assert sum(s.pulls for s in c.arm_stats("expo")) == 2500

        def broken() -> Iterator[tuple[str, str, str, int, int]]:
            for i in range(1500):
                yield (new_decision_id(ms), f"w{i}", "b", alloc.version, ms)
            raise ValueError("source failed")

        # The error of the iterable is raised (not a bare CANCELLED); the batch sent counts.
        with pytest.raises(ValueError, match="source failed"):
            c.log_exposures("expo", broken(), batch_size=1000)
        assert sum(s.pulls for s in c.arm_stats("expo")) == 3500
        # Bad arguments are refused before anything is sent.
        with pytest.raises(ValueError):
            c.log_exposures("expo", [], batch_size=0)
        with pytest.raises(ValueError):
            c.decide_bulk("expo", ["u"], batch_size=0)


def test_e2e_local_assigner(server: Any) -> None:
    with server.client() as c:
        c.create_experiment("local", [f"arm{i}" for i in range(10)])
        require(lambda: c.get_allocation("local"))
        with c.local_assigner("local", flush_every_s=0.2) as assigner:
            snap = assigner.snapshot
            assert snap is not None and snap.version > 0
            decisions = [assigner.assign(f"user-{i}") for i in range(500)]
            assert all(d.source == "snapshot" and d.allocation_version == snap.version for d in decisions)
            assigner.flush()
            assert wait_for(lambda: assigner.stats().accepted == 500)
            assert assigner.stats().rejected == 0
            assert c.reward(decisions[0].decision_id, 1.0) is True
            # The server assigns the same unit to the same arm from the same snapshot.
            for d in decisions[:25]:
                assert d.arm == snap.arm_ids[arm_index(snap, d.unit_id)]
                server_side = c.decide("local", d.unit_id, allocation_version=snap.version)
                assert server_side.arm == d.arm
                assert server_side.propensity == pytest.approx(d.propensity)
        # Exposures count at once (committed before the answer), decide calls once applied.
        assert wait_for(lambda: sum(s.pulls for s in c.arm_stats("local")) == 525)
        assert sum(s.rewards for s in c.arm_stats("local")) == 1


def test_e2e_local_assigner_sticky_uses_decide(server: Any) -> None:
    with server.client() as c:
        c.create_experiment("sticky-local", ["a", "b"], sticky=True)
        alloc = require(lambda: c.get_allocation("sticky-local"))
        assert alloc.sticky
        with c.local_assigner("sticky-local") as assigner:
            first = assigner.assign("u1")
            assert first.source == "rpc" and assigner.assign("u1").arm == first.arm
            assert c.reward(first.decision_id, 1.0) is True


def test_e2e_decide_bulk_bad_context_raises_after_answers(server: Any) -> None:
    with server.client() as c:
        c.create_experiment("bulk-ctx", ["a", "b"])
        require(lambda: list(c.decide_bulk("bulk-ctx", ["probe"])))
        contexts: list[Any] = [{"n": 1}] * 3 + [{"n": object()}]
        got: list[BulkBatch] = []
        with pytest.raises(TypeError, match="context value"):
            for b in c.decide_bulk("bulk-ctx", ["u0", "u1", "u2", "u3"], contexts=contexts, batch_size=2):
                got.append(b)
        assert [len(b) for b in got] == [2]  # the first batch went out and was answered


def test_bulk_arrays_are_arrays() -> None:
    """array('I') / array('d') from one C call each: the types the docs promise."""
    resp = pb.DecideBulkResponse(batch_id="b", arm_ids=["a"], arms=[0] * 5, propensities=[1.0] * 5)
    batch = conv.bulk_batch(resp, [str(i) for i in range(5)])
    assert isinstance(batch.arm_index, array.array) and isinstance(batch.propensities, array.array)
    assert list(itertools.islice(batch.decision_ids, 2)) == ["b.0", "b.1"]
