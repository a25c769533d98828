"""Several server processes on one port share one store and stay consistent."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from banditd_client import ArmStat, Client
from conftest import ServerProcess, wait_for


def own_connection(target: str) -> Client:
    """A client on its own TCP connection (grpc shares one per target between channels by
    default), so that SO_REUSEPORT spreads the clients over the processes."""
    channel = grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    return Client(target, channel=channel, timeout=10.0)


def stats_after_restart(data_dir: Path, experiment_id: str) -> list[ArmStat]:
    """The experiment's arm statistics as one fresh process reads them from the store."""
    single = ServerProcess(data_dir)
    single.start()
    try:
        with single.client() as c:
            return c.arm_stats(experiment_id)
    finally:
        single.kill()


def test_two_workers_share_experiments_decisions_and_rewards(tmp_path: Path) -> None:
    srv = ServerProcess(tmp_path / "data", ("--workers", "2", "--refresh-ms", "20"))
    srv.start()
    clients = [own_connection(srv.target) for _ in range(8)]
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
    assert sum(s.rewards for s in stats_after_restart(tmp_path / "data", "shared")) == 200


def test_two_workers_serve_a_plain_experiment_on_the_fast_path_and_count_every_reward(tmp_path: Path) -> None:
    """Not sticky, no context: each process answers from its core and commits behind the
    response; a reward sent at once through a connection to the other process still finds
    its decision (the other's next group commit), and nothing is lost by a graceful stop."""
    srv = ServerProcess(tmp_path / "data", ("--workers", "2"))
    srv.start()
    clients = [own_connection(srv.target) for _ in range(6)]
    try:
        clients[0].create_experiment("plain", arms=["a", "b"], policy="thompson")
        decisions = [clients[i % len(clients)].decide("plain", unit_id=f"u{i}") for i in range(300)]
        assert len({d.decision_id for d in decisions}) == 300
        for i, d in enumerate(decisions):
            assert clients[(i + 1) % len(clients)].reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
        clicks = sum(1 for d in decisions if d.arm == "a")

        def counted() -> bool:
            return all(
                sum(s.pulls for s in c.arm_stats("plain")) == 300
                and sum(s.reward_sum for s in c.arm_stats("plain")) == clicks
                for c in clients
            )

        assert wait_for(counted), [(s.arm, s.pulls, s.reward_sum) for s in clients[0].arm_stats("plain")]
    finally:
        for c in clients:
            c.close()
        srv.stop()
    stats = stats_after_restart(tmp_path / "data", "plain")
    assert sum(s.pulls for s in stats) == 300 and sum(s.rewards for s in stats) == 300


def test_a_sticky_unit_keeps_its_arm_when_its_next_call_reaches_another_process_at_once(tmp_path: Path) -> None:
    """The second call follows the first without a pause, through another connection (likely
    another process): the first assignment must already be visible there, not lingering in
    the first process's write queue."""
    srv = ServerProcess(tmp_path / "data", ("--workers", "2", "--refresh-ms", "20"))
    srv.start()
    clients = [own_connection(srv.target) for _ in range(6)]
    try:
        arms = [f"arm-{i}" for i in range(20)]  # many arms: a fresh draw rarely repeats the arm
        clients[0].create_experiment("sticky", arms=arms, policy="thompson", sticky=True)
        for i in range(120):
            unit = f"unit-{i}"
            got = [clients[(i + j) % len(clients)].decide("sticky", unit_id=unit) for j in range(3)]
            assert len({d.arm for d in got}) == 1, (unit, [d.arm for d in got])
            assert [d.sticky_hit for d in got[1:]] == [True, True]
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_decision_records_linger_200_ms_on_lmdb_and_50_ms_on_postgresql() -> None:
    """On LMDB decision records wait 200 ms for a group commit (rewards find them meanwhile,
    in a --workers pool by nudging the other members); nodes on PostgreSQL cannot nudge each
    other, so 50 ms there. A pool passes only an explicit linger on to its members."""
    from banditd.config import ServerConfig
    from banditd.pool import member_command

    assert ServerConfig().decision_linger_s == 0.2
    assert ServerConfig(pool_member=True).decision_linger_s == 0.2
    assert ServerConfig(store="postgresql://u@h/db").decision_linger_s == 0.05
    assert ServerConfig(decision_linger_ms=5.0, pool_member=True).decision_linger_s == 0.005
    assert "--decision-linger-ms" not in member_command(ServerConfig(workers=2), 0)
    cmd = member_command(ServerConfig(workers=2, decision_linger_ms=7.0), 0)
    assert cmd[cmd.index("--decision-linger-ms") + 1] == "7.0"
    with pytest.raises(ValueError, match="decision-linger-ms"):
        ServerConfig(decision_linger_ms=-1.0)


def test_a_reward_through_the_other_worker_does_not_wait_out_the_linger(tmp_path: Path) -> None:
    """--workers 2 with a 10 s linger: a reward sent right after its decision, on a connection
    that may reach the other process, finds the decision at once — that process is asked to
    commit now (without it each such reward would wait 2 s and be refused NOT_FOUND)."""
    srv = ServerProcess(tmp_path / "data", ("--workers", "2", "--decision-linger-ms", "10000"))
    srv.start()
    clients = [own_connection(srv.target) for _ in range(8)]  # SO_REUSEPORT spreads them
    try:
        clients[0].create_experiment("nudge", arms=["a", "b"])
        wait_for(lambda: all(_knows(c, "nudge") for c in clients), timeout=10)
        t0 = time.monotonic()
        for i in range(40):
            d = clients[i % 8].decide("nudge", unit_id=f"u{i}")
            assert clients[(i + 1) % 8].reward(d.decision_id, 1.0) is True
        elapsed = time.monotonic() - t0
        # All 40 rewards were accepted; one process counts the other's once it follows them.
        assert wait_for(lambda: sum(s.rewards for s in clients[0].arm_stats("nudge")) == 40, timeout=10)
        assert elapsed < 20.0, elapsed  # ~20 cross-process rewards would take >= 40 s waiting
    finally:
        for c in clients:
            c.close()
        srv.stop()


def _knows(client: Client, exp: str) -> bool:
    try:
        client.arm_stats(exp)
        return True
    except grpc.RpcError:
        return False


def test_nudges_reach_the_other_members_and_a_gone_member_is_skipped(tmp_path: Path) -> None:
    from banditd.nudge import Nudger

    hits: list[tuple[str, int]] = []
    members = [
        Nudger(
            str(tmp_path), i, 3, lambda i=i: hits.append(("commit now", i)), lambda i=i: hits.append(("committed", i))
        )
        for i in range(2)
    ]  # 2 of 3 up
    for m in members:
        m.start()
    members[0].nudge_others()  # member 2 is not listening: skipped without an error
    assert wait_for(lambda: hits == [("commit now", 1)], timeout=5), hits
    members[1].committed()
    assert wait_for(lambda: hits[1:] == [("committed", 0)], timeout=5), hits
    with pytest.raises(OSError):  # one listener per member and data directory
        Nudger(str(tmp_path), 1, 3, lambda: None)
    members[1].close()
    assert wait_for(lambda: not members[1].listening(), timeout=5)
    members[0].nudge_others()  # member 1 is gone now
    members[0].close()
    assert len(hits) == 2


def test_a_follower_told_of_commits_refreshes_once_per_burst_and_not_while_idle() -> None:
    """Pool members follow the store when another says it committed: nothing while idle (was
    20 polls a second), a burst of commits coalesced into refreshes >= the gap apart, and the
    last commit of a burst is always followed."""
    from banditd.nudge import Follower

    times: list[float] = []
    follower = Follower(lambda: times.append(time.monotonic()), gap_s=0.05, fallback_s=30.0)
    follower.start()
    try:
        time.sleep(0.4)
        assert times == []  # idle: no refresh (polling every 50 ms made 8)
        t0 = time.monotonic()
        follower.poke()
        assert wait_for(lambda: len(times) == 1, timeout=5)
        assert times[0] - t0 < 0.2  # at once, not at the next poll
        for _ in range(100):  # a burst of commits over ~0.3 s
            follower.poke()
            time.sleep(0.003)
        last_poke = time.monotonic()
        assert wait_for(lambda: times[-1] > last_poke, timeout=5)  # the last one is followed
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert len(times) <= 2 + 0.5 / 0.05 and min(gaps) >= 0.045, gaps
    finally:
        follower.stop()


def test_a_follower_that_is_not_told_polls_every_gap() -> None:
    """Nodes on PostgreSQL (no nudges across machines) and a member without its socket poll:
    fallback == gap."""
    from banditd.nudge import Follower

    times: list[float] = []
    follower = Follower(lambda: times.append(time.monotonic()), gap_s=0.05, fallback_s=0.05)
    follower.start()
    time.sleep(0.5)
    follower.stop()
    assert 5 <= len(times) <= 11, len(times)
