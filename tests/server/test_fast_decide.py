"""Decide's fast path (core `fastpath.rs`, `Engine.fast`): plain experiments answered from the
request bytes by the core, records committed by the writer; everything else, and every
refusal, left to the general path with the same answers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from banditd.engine import Engine, RewardInput
from banditd.errors import ResourceExhausted, Unavailable
from banditd.experiment import ArmSpec, ExperimentSpec
from banditd.store import DecisionRecord, Store
from banditd.writer import Writer
from banditd_client import Client
from banditd_client.errors import ExperimentPaused, InvalidArgument, NotFound
from banditd_client.v1 import banditd_pb2 as pb
from conftest import ServerProcess


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=0.02)
    writer.start()
    eng = Engine(store, writer, seed=5)
    eng.create_experiment(ExperimentSpec(id="plain", arms=[ArmSpec(f"a{i}") for i in range(4)]), timeout=10)
    yield eng
    writer.close()
    store.close()


def _request(experiment_id: str, unit_id: str = "", **fields: object) -> bytes:
    return pb.DecideRequest(experiment_id=experiment_id, unit_id=unit_id, **fields).SerializeToString()  # type: ignore[arg-type]


def test_a_fast_decision_is_the_general_paths_record_and_is_counted(engine: Engine) -> None:
    raw = engine.fast.decide(_request("plain", "ünit-1"))
    assert raw is not None
    resp = pb.DecideResponse.FromString(raw)
    assert len(resp.decision_id) == 23 and len(resp.arms) == 1
    chosen = resp.arms[0]
    assert chosen.arm_id in {"a0", "a1", "a2", "a3"}
    assert 0 < chosen.propensity <= 1 and 0 < chosen.score < 1
    assert not resp.sticky_hit and resp.model_version == 0
    # Findable before its commit (a reward that overtakes the group commit).
    assert engine.reward_batch([RewardInput(resp.decision_id, 1.0)], timeout=10)[0].error is None
    engine.writer.sync(timeout=10)
    rec = engine.store.decision(resp.decision_id)
    assert rec == DecisionRecord(
        resp.decision_id, "plain", (chosen.arm_id,), (chosen.propensity,), "ünit-1", rec.ts_ms, rec.model_version
    )
    assert isinstance(rec.propensities[0], float)
    stats = {s.arm_id: s for s in engine.arm_stats("plain")}
    assert stats[chosen.arm_id].pulls == 1 and stats[chosen.arm_id].rewards == 1
    assert sum(s.pulls for s in stats.values()) == 1
    assert len(engine.fast) == 0 and engine.status()["pending_decisions"] == 0


def test_many_fast_decisions_share_commits_and_all_count(engine: Engine) -> None:
    commits = engine.writer.commits
    ids = [pb.DecideResponse.FromString(engine.fast.decide(_request("plain", f"u{i}")) or b"").decision_id
           for i in range(500)]  # fmt: skip
    assert len(set(ids)) == 500
    engine.writer.sync(timeout=10)
    assert set(engine.store.decisions_many(ids)) == set(ids)
    assert sum(s.pulls for s in engine.arm_stats("plain")) == 500
    assert engine.writer.commits - commits < 100  # grouped, not one commit each
    rt = engine.runtime("plain")
    assert rt is not None and len(rt.recent) == 500


@pytest.mark.parametrize(
    "fields",
    [
        {"k": 2},
        {"context": {"country": "fr"}},
        {"features": {"age": pb.ContextValue(number=3.0)}},
        {"allocation_version": 1},
        {"unit_id": "x" * 257},
        {"unit_id": "a\0b"},
        {"experiment_id": "nope"},
    ],
)
def test_requests_the_fast_path_does_not_serve_go_to_the_general_one(engine: Engine, fields: dict) -> None:
    args = {"experiment_id": "plain", **fields}
    assert engine.fast.decide(pb.DecideRequest(**args).SerializeToString()) is None
    assert engine.fast.decide(b"\xff\xff\xff") is None
    assert engine.fast.decide(_request("plain", "u", k=1)) is not None  # k = 1 is the default


def test_sticky_paused_and_controlled_experiments_are_not_on_the_fast_path(engine: Engine) -> None:
    engine.create_experiment(ExperimentSpec(id="sticky", arms=[ArmSpec("a"), ArmSpec("b")], sticky=True), timeout=10)
    engine.create_experiment(
        ExperimentSpec(id="ctl", arms=[ArmSpec("a"), ArmSpec("b")], settings={"control_share": 0.5}), timeout=10
    )
    assert engine.fast.decide(_request("sticky", "u")) is None
    assert engine.fast.decide(_request("ctl", "u")) is None
    engine.update_experiment("plain", [], [], "paused", timeout=10)
    assert engine.fast.decide(_request("plain", "u")) is None
    engine.update_experiment("plain", [], [], "running", timeout=10)
    assert engine.fast.decide(_request("plain", "u")) is not None
    # An arm added while serving is served at once.
    engine.update_experiment("plain", [ArmSpec("new")], [], None, timeout=10)
    seen = {pb.DecideResponse.FromString(engine.fast.decide(_request("plain")) or b"").arms[0].arm_id
            for _ in range(400)}  # fmt: skip
    assert "new" in seen


def test_a_failing_store_or_a_stopped_writer_sends_decisions_to_the_general_refusal(engine: Engine) -> None:
    engine.writer.storage_error = ResourceExhausted("disk full")
    engine.writer._health_changed()
    assert engine.fast.decide(_request("plain", "u")) is None
    with pytest.raises(ResourceExhausted, match="refused while the store cannot write"):
        engine.decide("plain", "u", 1)
    engine.writer.storage_error = None
    engine.writer._health_changed()
    assert engine.fast.decide(_request("plain", "u")) is not None
    engine.writer.close()
    assert engine.fast.decide(_request("plain", "u")) is None
    with pytest.raises(Unavailable, match="shutting down"):
        engine.decide("plain", "u", 1)


def test_the_fast_paths_queue_is_bounded(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = Writer(store, linger_s=30.0, queue_limit=5)
    writer.start()
    eng = Engine(store, writer, seed=1)
    eng.create_experiment(ExperimentSpec(id="e", arms=[ArmSpec("a"), ArmSpec("b")]), timeout=10)
    answered = [eng.fast.decide(_request("e", f"u{i}")) for i in range(6)]
    assert all(answered[:5]) and answered[5] is None  # the general path answers the 6th
    writer.sync(timeout=10)  # the barrier ends the linger: the five are committed
    assert eng.fast.decide(_request("e", "again")) is not None
    assert eng.fast.queued == 1
    # Reading the counters first commits what lingers: every answered decision is counted.
    assert sum(s.pulls for s in eng.arm_stats("e")) == 6
    assert eng.fast.queued == 0
    writer.close()
    store.close()


def test_the_server_serves_plain_decide_fast_with_the_general_errors(server: ServerProcess) -> None:
    with server.client() as c:
        c.create_experiment("p", ["a", "b"])
        d = c.decide("p", unit_id="u1")
        assert d.decision_id and d.arms[0].arm in ("a", "b")
        assert c.reward(d.decision_id, 1.0)  # before its group commit
        with pytest.raises(InvalidArgument):
            c.decide("p", unit_id="u" * 300)
        with pytest.raises(NotFound):
            c.decide("missing", unit_id="u1")
        c.pause("p")
        with pytest.raises(ExperimentPaused):
            c.decide("p", unit_id="u1")
    server.restart()
    with Client(server.target, timeout=10.0) as c:
        stats = {s.arm: s for s in c.arm_stats("p")}
        assert sum(s.pulls for s in stats.values()) == 1
        assert sum(s.rewards for s in stats.values()) == 1
