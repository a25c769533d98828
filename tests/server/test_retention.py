"""Decision records expire after the retention period; what was learned stays."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from banditd_client import DecisionNotFound
from conftest import ServerProcess


def test_old_decisions_expire_and_posteriors_stay(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data", ("--retention-hours", str(1.0 / 3600), "--retention-sweep-s", "0.3"))
    srv.start()
    try:
        with srv.client() as c:
            c.create_experiment("ret", arms=["a", "b"], policy="uniform")
            old = [c.decide("ret", unit_id=f"u{i}") for i in range(50)]
            for d in old[:25]:
                c.reward(d.decision_id, 1.0)
            before = {s.arm: (s.rewards, s.mean) for s in c.arm_stats("ret")}
            time.sleep(2.5)  # retention 1 s, sweeps every 0.3 s
            with pytest.raises(DecisionNotFound):
                c.reward(old[30].decision_id, 1.0)
            assert {s.arm: (s.rewards, s.mean) for s in c.arm_stats("ret")} == before
            fresh = c.decide("ret", unit_id="new")
            assert c.reward(fresh.decision_id, 1.0)
        srv.stop()
        srv.start()  # expiry committed; the posterior was rebuilt from arm totals
        with srv.client() as c:
            assert sum(s.rewards for s in c.arm_stats("ret")) == 26
    finally:
        srv.kill()
