"""Several server processes on one port share one store and stay consistent."""

from __future__ import annotations

import time
from pathlib import Path

from banditd_client import Client
from conftest import ServerProcess


def wait_for(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_two_workers_share_experiments_decisions_and_rewards(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data", ("--workers", "2", "--refresh-ms", "20"))
    srv.start()
    # Each client has its own connection; SO_REUSEPORT spreads connections over the processes.
    clients = [Client(srv.target, timeout=10.0) for _ in range(8)]
    try:
        clients[0].create_experiment("shared", arms=["a", "b", "c"], policy="thompson", sticky=True)
        # Every connection sees the experiment at once (a miss looks in the store).
        decisions = []
        for i in range(200):
            c = clients[i % len(clients)]
            decisions.append(c.decide("shared", unit_id=f"u{i % 50}"))
        # Sticky units keep their arm whichever process answers.
        first: dict[str, str] = {}
        for i, d in enumerate(decisions):
            unit = f"u{i % 50}"
            assert first.setdefault(unit, d.arm) == d.arm
        # Rewards through other connections than the decisions (the decision may live in
        # the other process's queue for a moment).
        for i, d in enumerate(decisions):
            assert clients[(i + 3) % len(clients)].reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
        expected_a = sum(1 for d in decisions if d.arm == "a")

        def consistent() -> bool:
            for c in clients:
                stats = {s.arm: s for s in c.arm_stats("shared")}
                if sum(s.rewards for s in stats.values()) != 200 or stats["a"].reward_sum != expected_a:
                    return False
            return True

        assert wait_for(consistent), [(s.arm, s.rewards) for s in clients[1].arm_stats("shared")]
        # Changes to the definition reach every process.
        clients[1].update_experiment("shared", add_arms=["d"])
        assert wait_for(lambda: all(len(c.arm_stats("shared")) == 4 for c in clients))
    finally:
        for c in clients:
            c.close()
        srv.stop()
    # Graceful stop committed everything: a single process sees all of it.
    single = ServerProcess(tmp_path / "data")
    single.start()
    try:
        with single.client() as c:
            assert sum(s.rewards for s in c.arm_stats("shared")) == 200
    finally:
        single.kill()
