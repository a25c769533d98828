"""Restarts, kill -9 and sticky assignment: nothing acknowledged is lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from banditd.cache import BoundedCache
from conftest import ServerProcess

ARMS = ["a", "b", "c", "d", "e"]


def _snapshot(server: ServerProcess, exp: str) -> list[tuple[str, int, int, float, float]]:
    with server.client() as c:
        return [(s.arm, s.pulls, s.rewards, s.reward_sum, round(s.mean, 12)) for s in c.arm_stats(exp)]


def test_restart_keeps_experiments_stats_and_decisions(server: ServerProcess) -> None:
    with server.client() as c:
        c.create_experiment("keep", arms=ARMS, policy="ucb1", ucb_c=0.5)
        c.create_experiment("other", arms=["x", "y"], policy="epsilon_greedy", epsilon=0.2)
        c.update_experiment("other", retire_arms=["x"])
        decisions = [c.decide("keep", unit_id=f"u{i}") for i in range(40)]
        c.reward_many([(d.decision_id, float(i % 2)) for i, d in enumerate(decisions[:30])])
    before = _snapshot(server, "keep")
    server.restart()
    assert _snapshot(server, "keep") == before
    with server.client() as c:
        keep = c.get_experiment("keep")
        assert keep.policy == "ucb1" and keep.policy_params == {"ucb_c": 0.5}
        assert {a.id: a.active for a in c.get_experiment("other").arms} == {"x": False, "y": True}
        # Decisions survive too: a late reward for one made before the restart still counts.
        assert c.reward(decisions[35].decision_id, 1.0) is True
        # ...and an event counted before the restart is still a duplicate after it.
        assert c.reward(decisions[0].decision_id, 1.0) is False
        assert sum(s.rewards for s in c.arm_stats("keep")) == 31


def test_acknowledged_rewards_survive_kill_9(server: ServerProcess) -> None:
    with server.client() as c:
        c.create_experiment("durable", arms=ARMS)
        decisions = [c.decide("durable", unit_id=f"u{i}") for i in range(300)]
        counts = c.reward_many([(d.decision_id, 1.0) for d in decisions[:200]])
        assert counts.accepted == 200
        for d in decisions[200:250]:
            assert c.reward(d.decision_id, 1.0)
    server.kill()  # SIGKILL: no graceful shutdown, no flush
    server.start()
    stats = _snapshot(server, "durable")
    assert sum(s[2] for s in stats) == 250
    assert sum(s[3] for s in stats) == 250.0


def test_sticky_units_keep_their_arm_across_restart_and_new_arms(server: ServerProcess) -> None:
    units = [f"user-{i}" for i in range(60)]
    with server.client() as c:
        c.create_experiment("sticky", arms=ARMS, sticky=True)
        first = {u: c.decide("sticky", unit_id=u).arm for u in units}
        again = [c.decide("sticky", unit_id=u) for u in units]
        assert all(d.sticky_hit and d.arm == first[u] for u, d in zip(units, again, strict=True))
        assert len(set(first.values())) > 1  # not everyone on one arm
    server.restart()
    with server.client() as c:
        assert {u: c.decide("sticky", unit_id=u).arm for u in units} == first
        c.update_experiment("sticky", add_arms=["f", "g"])
        assert {u: c.decide("sticky", unit_id=u).arm for u in units} == first
        # Retiring an arm moves only the units that held it.
        c.update_experiment("sticky", retire_arms=["a"])
        after = {u: c.decide("sticky", unit_id=u).arm for u in units}
        for u in units:
            if first[u] == "a":
                assert after[u] != "a"
            else:
                assert after[u] == first[u]


def test_sticky_units_keep_their_arm_when_the_assignment_cache_overflows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-memory assignment cache is bounded; evicted units are read back from LMDB."""
    monkeypatch.setenv("BANDITD_ASSIGNMENT_CACHE", "10")
    srv = ServerProcess(tmp_path / "data")
    srv.start()
    try:
        with srv.client() as c:
            c.create_experiment("small-cache", arms=[f"arm-{i}" for i in range(20)], policy="uniform", sticky=True)
            first = {f"u{i}": c.decide("small-cache", unit_id=f"u{i}").arm for i in range(200)}
            assert len(set(first.values())) > 1  # uniform over 20 arms: not one arm for all
            again = {unit: c.decide("small-cache", unit_id=unit).arm for unit in first}
            assert again == first
    finally:
        srv.kill()


def test_bounded_cache_drops_the_oldest_entries() -> None:
    cache: BoundedCache[str, int] = BoundedCache(10)
    for i in range(11):
        cache.put(f"k{i}", i)
    assert len(cache) == 10
    assert cache.get("k0") is None
    assert cache.get("k10") == 10
    with pytest.raises(ValueError):
        BoundedCache(0)
