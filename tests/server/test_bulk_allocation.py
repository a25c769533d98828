"""DecideBulk (columnar batches and the unit-by-unit path), allocation snapshots, Decide from a
snapshot, and exposures — through the wire, with the server's answers checked against its
own statistics."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import grpc
import pytest

from banditd.allocation import assign, thresholds
from banditd.export import LogReader
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

REJECTED = 0xFFFFFFFF


def stub_of(server) -> pb_grpc.BanditdStub:
    return pb_grpc.BanditdStub(grpc.insecure_channel(server.target))


def batches(exp: str, units: list[str], size: int, k: int = 0) -> Iterator[pb.DecideBulkRequest]:
    for s in range(0, len(units), size):
        yield pb.DecideBulkRequest(experiment_id=exp if s == 0 else "", unit_ids=units[s : s + size], k=k)


def decision_ids(resp: pb.DecideBulkResponse) -> list[str]:
    n = len(resp.arms) // max(1, resp.k)
    return list(resp.decision_ids) or [f"{resp.batch_id}.{i}" for i in range(n)]


def test_bulk_decides_every_unit_each_rewardable_and_counted(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("camp", [f"arm{i}" for i in range(10)])
    units = [f"u{i}" for i in range(25_000)]
    responses = list(stub.DecideBulk(batches("camp", units, 10_000), timeout=60))
    assert [r.first_index for r in responses] == [0, 10_000, 20_000]
    ids = [d for r in responses for d in decision_ids(r)]
    assert len(ids) == len(set(ids)) == 25_000
    for r in responses:
        assert all(a != REJECTED for a in r.arms) and not r.rejected
        assert all(0 < p <= 1 for p in r.propensities)
    # Durable when answered: counted in the arm statistics, and each decision rewardable once.
    assert sum(s.pulls for s in c.arm_stats("camp")) == 25_000
    first = responses[0]
    arm = first.arm_ids[first.arms[7]]
    assert c.reward(ids[7], 1.0) is True
    assert c.reward(ids[7], 1.0) is False  # the same event again: a duplicate
    stats = {s.arm: s for s in c.arm_stats("camp")}
    assert stats[arm].rewards == 1 and stats[arm].reward_sum == 1.0
    with pytest.raises(Exception, match="unknown"):
        c.reward(f"{first.batch_id}.99999", 1.0)
    # A restart keeps the batch: its decisions still join rewards, and export reads them.
    server.restart()
    c = server.client()
    assert c.reward(ids[20_001], 1.0) is True
    c.close()
    server.stop()
    with LogReader(server.data_dir) as log:
        rows = list(log.rows("camp"))
    assert len(rows) == 25_000
    row = next(r for r in rows if r.decision_id == ids[7])
    assert row.unit == "u7" and row.action == arm and row.reward == 1.0


def test_bulk_refuses_bad_units_and_bad_batches(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("b", ["a", "b"])
    units = ["ok", "x" * 300, "\x00", ""]
    resp = next(stub.DecideBulk(iter([pb.DecideBulkRequest(experiment_id="b", unit_ids=units)])))
    assert [a == REJECTED for a in resp.arms] == [False, True, True, False]
    assert [(r.index, r.code) for r in resp.rejected] == [(1, "INVALID_ARGUMENT"), (2, "INVALID_ARGUMENT")]
    for bad, code in (
        ([pb.DecideBulkRequest(experiment_id="nope", unit_ids=["u"])], grpc.StatusCode.NOT_FOUND),
        ([pb.DecideBulkRequest(unit_ids=["u"])], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.DecideBulkRequest(experiment_id="b", unit_ids=["u"], k=3)], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.DecideBulkRequest(experiment_id="b", unit_ids=["u"]),
          pb.DecideBulkRequest(experiment_id="other", unit_ids=["u"])], grpc.StatusCode.INVALID_ARGUMENT),
        ([pb.DecideBulkRequest(experiment_id="b", unit_ids=["u"] * 100_001)], grpc.StatusCode.INVALID_ARGUMENT),
    ):  # fmt: skip
        with pytest.raises(grpc.RpcError) as err:
            list(stub.DecideBulk(iter(bad), timeout=30))
        assert err.value.code() == code, err.value.details()
    c.pause("b")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.DecideBulk(iter([pb.DecideBulkRequest(experiment_id="b", unit_ids=["u"])]), timeout=10))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_bulk_keeps_sticky_units_and_slates(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("st", ["a", "b", "c"], sticky=True)
    held = c.decide("st", unit_id="u1")
    resp = next(stub.DecideBulk(iter([pb.DecideBulkRequest(experiment_id="st", unit_ids=["u1", "u2"])])))
    assert resp.arm_ids[resp.arms[0]] == held.arm and resp.propensities[0] == 1.0
    assert len(resp.decision_ids) == 2  # unit by unit: its own decision ids
    assert c.decide("st", unit_id="u2").arm == resp.arm_ids[resp.arms[1]]
    c.create_experiment("slate", ["a", "b", "c", "d"])
    resp = next(stub.DecideBulk(iter([pb.DecideBulkRequest(experiment_id="slate", unit_ids=["x", "y"], k=2)])))
    assert resp.k == 2 and len(resp.arms) == 4
    assert len({resp.arms[0], resp.arms[1]}) == 2 and len({resp.arms[2], resp.arms[3]}) == 2


def test_bulk_with_a_control_share_logs_the_mixture(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("ctl", ["a", "b"], policy="greedy", settings={"control_share": 0.5})
    for _ in range(20):
        d = c.decide("ctl", unit_id="w")
        c.reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
    time.sleep(0.2)
    units = [f"u{i}" for i in range(400)]
    resp = next(stub.DecideBulk(iter([pb.DecideBulkRequest(experiment_id="ctl", unit_ids=units)])))
    props = {resp.arm_ids[a]: p for a, p in zip(resp.arms, resp.propensities, strict=True)}
    assert props["a"] == pytest.approx(0.25 + 0.5) and props["b"] == pytest.approx(0.25)


def test_allocation_snapshot_decide_and_exposures(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("al", ["a", "b", "c"], settings={"control_share": 0.3})
    for i in range(300):
        d = c.decide("al", unit_id=f"w{i}")
        c.reward(d.decision_id, 1.0 if d.arm == "b" else 0.0)
    time.sleep(0.2)
    snap = stub.GetAllocation(pb.GetAllocationRequest(experiment_id="al"))
    assert list(snap.arm_ids) == ["a", "b", "c"] and snap.version >= 1
    assert sum(snap.probabilities) == pytest.approx(1.0)
    assert min(snap.probabilities) >= 0.1 - 1e-9  # the control share reaches every arm
    assert snap.ttl_seconds > 0 and snap.max_age_seconds >= snap.ttl_seconds and not snap.sticky
    # The server, asked with the snapshot's version, assigns as the SDK rule does.
    rule = {"thresholds": thresholds(list(snap.probabilities)), "salt": snap.salt}
    for i in range(100):
        r = stub.Decide(pb.DecideRequest(experiment_id="al", unit_id=f"z{i}", allocation_version=snap.version))
        j = assign(rule, f"z{i}")
        assert r.arms[0].arm_id == snap.arm_ids[j] and r.arms[0].propensity == pytest.approx(snap.probabilities[j])
    # Exposures: accepted once, joinable with rewards; unknown versions and bad ids refused per item.
    now = int(time.time() * 1000)
    good = [pb.Exposure(decision_id=f"{now:011x}{os.urandom(6).hex()}", unit_id=f"e{i}", arm_id="b",
                        allocation_version=snap.version) for i in range(3)]  # fmt: skip
    def exposure(decision_id: str, arm: str, version: int) -> pb.Exposure:
        return pb.Exposure(decision_id=decision_id, unit_id="e", arm_id=arm, allocation_version=version)

    batch = [
        *good, good[0],
        exposure(f"{now:011x}{os.urandom(6).hex()}", "a", 10**6),  # never issued
        exposure("not-an-id", "a", snap.version),
        exposure(f"{now:011x}{os.urandom(6).hex()}", "zz", snap.version),  # no such arm
    ]  # fmt: skip
    time.sleep(0.3)  # the decisions above are committed (records are written behind the answer)
    pulls = {s.arm: s.pulls for s in c.arm_stats("al")}
    resp = stub.LogExposures(iter([pb.ExposureBatch(experiment_id="al", exposures=batch)]), timeout=10)
    assert (resp.accepted, resp.duplicate, resp.rejected) == (3, 1, 3)
    codes = [(r.index, r.code) for r in resp.rejections]
    assert codes == [(4, "NOT_FOUND"), (5, "INVALID_ARGUMENT"), (6, "INVALID_ARGUMENT")]
    assert "never issued" in resp.rejections[0].reason
    assert {s.arm: s.pulls for s in c.arm_stats("al")}["b"] == pulls["b"] + 3
    assert c.reward(good[1].decision_id, 1.0) is True
    again = stub.LogExposures(iter([pb.ExposureBatch(experiment_id="al", exposures=good)]), timeout=10)
    assert (again.accepted, again.duplicate) == (0, 3)
    # A snapshot survives a restart: exposures naming it are still accepted.
    server.restart()
    stub = stub_of(server)
    late = pb.Exposure(decision_id=f"{int(time.time() * 1000):011x}{os.urandom(6).hex()}", unit_id="late",
                       arm_id="c", allocation_version=snap.version)  # fmt: skip
    assert stub.LogExposures(iter([pb.ExposureBatch(experiment_id="al", exposures=[late])]), timeout=10).accepted == 1


def test_allocation_is_refused_where_no_snapshot_can_stand_for_decide(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("ctx", ["a", "b"], policy="lin_ts")
    c.create_experiment("paused", ["a", "b"])
    c.pause("paused")
    for exp in ("ctx", "paused"):
        with pytest.raises(grpc.RpcError) as err:
            stub.GetAllocation(pb.GetAllocationRequest(experiment_id=exp))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as err:
        stub.Decide(pb.DecideRequest(experiment_id="paused", unit_id="u", allocation_version=1))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    c.create_experiment("fresh", ["a", "b"])
    with pytest.raises(grpc.RpcError) as err:
        stub.Decide(pb.DecideRequest(experiment_id="fresh", unit_id="u", allocation_version=7))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_columnar_exposures(server) -> None:
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("col", ["a", "b"])
    snap = stub.GetAllocation(pb.GetAllocationRequest(experiment_id="col"))
    now = int(time.time() * 1000)
    ids = [f"{now:011x}{os.urandom(6).hex()}" for _ in range(4)]
    batch = pb.ExposureBatch(
        experiment_id="col", allocation_version=snap.version, decision_ids=ids, unit_ids=["u0", "u1", "u2", "u3"],
        arm_ids=["b", "a"], arms=[0, 1, 0, 7],  # 7: outside the table, refused for that item
    )  # fmt: skip
    resp = stub.LogExposures(iter([batch]), timeout=10)
    assert (resp.accepted, resp.rejected) == (3, 1) and resp.rejections[0].index == 3
    assert c.reward(ids[0], 1.0) is True
    assert {s.arm: s.rewards for s in c.arm_stats("col")}["b"] == 1
    bad = pb.ExposureBatch(experiment_id="col", allocation_version=snap.version, decision_ids=ids, unit_ids=["u0"])
    with pytest.raises(grpc.RpcError) as err:
        stub.LogExposures(iter([bad]), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_columnar_exposures_are_one_record_counted_once_and_joinable(server) -> None:
    """Columnar batches of valid exposures take the fast path (one columnar record and a
    reference per decision id): duplicates within a stream, across batches and on a resend
    count once; every exposure is rewardable (also after a restart) and read back by export
    with its own id, time, unit, arm and snapshot propensity."""
    c = server.client()
    stub = stub_of(server)
    c.create_experiment("fast", ["a", "b", "c"])
    snap = stub.GetAllocation(pb.GetAllocationRequest(experiment_id="fast"))
    probs = dict(zip(snap.arm_ids, snap.probabilities, strict=True))
    now = int(time.time() * 1000)
    ids = [f"{now - 1000 + i // 100:011x}{os.urandom(6).hex()}" for i in range(300)]  # 3 ms of ids
    arm_of = {d: "abc"[i % 3] for i, d in enumerate(ids)}

    def columnar(part: list[str]) -> pb.ExposureBatch:
        table = ["c", "a", "b"]
        return pb.ExposureBatch(
            experiment_id="fast", allocation_version=snap.version, decision_ids=part,
            unit_ids=[f"u-{d}" for d in part], arm_ids=table, arms=[table.index(arm_of[d]) for d in part],
        )  # fmt: skip

    before = sum(s.pulls for s in c.arm_stats("fast"))
    first = stub.LogExposures(iter([columnar(ids[:200]), columnar(ids[150:])]), timeout=10)
    assert (first.accepted, first.duplicate, first.rejected) == (300, 50, 0)
    again = stub.LogExposures(iter([columnar(ids)]), timeout=10)
    assert (again.accepted, again.duplicate) == (0, 300)
    stats = {s.arm: s.pulls for s in c.arm_stats("fast")}
    assert sum(stats.values()) - before == 300 and stats["a"] == stats["b"] == stats["c"] == 100
    assert c.reward(ids[0], 1.0) is True and c.reward(ids[299], 1.0, event_id="e299") is True
    server.restart()
    c = server.client()
    assert c.reward(ids[169], 1.0) is True  # found through its reference after a restart
    assert c.reward(ids[0], 1.0) is False  # the same event again (by decision and arm): counted once
    assert {s.arm: s.rewards for s in c.arm_stats("fast")} == {"a": 1.0, "b": 1.0, "c": 1.0}
    c.close()
    server.stop()
    with LogReader(server.data_dir) as log:
        rows = list(log.rows("fast"))
    assert sorted(r.decision_id for r in rows) == sorted(ids)  # each once, by its SDK id
    for r in rows:
        assert r.unit == f"u-{r.decision_id}" and r.action == arm_of[r.decision_id]
        assert r.propensity == pytest.approx(probs[r.action])
        assert r.time_ms == int(r.decision_id[:11], 16)
    # Time windows count each exposure's own time, not when its batch was stored (later).
    first_ms = now - 1000
    with LogReader(server.data_dir) as log:
        early = {r.decision_id for r in log.rows("fast", until_ms=first_ms + 2)}
        late = {r.decision_id for r in log.rows("fast", since_ms=first_ms + 1)}
    assert early == set(ids[:200]) and late == set(ids[100:])
