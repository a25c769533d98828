"""Several banditd nodes on one PostgreSQL database (`--store postgresql://...`).

The module starts a private PostgreSQL cluster from the machine's binaries (tests/pg.py) and
three banditd nodes on it, each its own process and port: any node takes any call.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import pg
from banditd_client import BanditdError, Client
from conftest import ServerProcess, wait_for


@pytest.fixture(scope="module")
def cluster() -> Iterator[pg.PostgresCluster]:
    """One cluster for the module (fsync on, as in production); each test its own database."""
    bindir = pg.ensure_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries (looked in /usr/lib/postgresql/*/bin and PATH; apt-get failed)")
    with pg.PostgresCluster(bindir=bindir) as c:
        yield c


class Nodes:
    def __init__(self, tmp: Path, url: str, n: int = 3, extra: tuple[str, ...] = ()) -> None:
        self.url = url
        self.servers = [
            ServerProcess(tmp / f"node{i}", ("--store", url, "--workers", "1", "--refresh-ms", "20", *extra))
            for i in range(n)
        ]
        for s in self.servers:
            s.start()
        self.clients = [Client(s.target, timeout=10.0) for s in self.servers]

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.kill()


@pytest.fixture
def nodes(tmp_path: Path, cluster: pg.PostgresCluster) -> Iterator[Nodes]:
    ns = Nodes(tmp_path, cluster.fresh_database())
    yield ns
    ns.close()


def unique(name: str) -> str:
    return f"{name}-{random.getrandbits(32):08x}"  # the cluster outlives each test


def test_any_node_takes_any_call(nodes: Nodes) -> None:
    a, b, c = nodes.clients
    exp = unique("shared")
    a.create_experiment(exp, arms=[f"arm-{i}" for i in range(12)], policy="thompson", sticky=True)
    decisions = []
    for i in range(60):
        unit = f"u{i}"
        # A unit's calls reach three nodes in a row: it keeps its arm on every one.
        got = [nodes.clients[(i + j) % 3].decide(exp, unit_id=unit) for j in range(3)]
        assert len({d.arm for d in got}) == 1, (unit, [d.arm for d in got])
        decisions.extend(got)
    # Rewarded on another node than the one that decided (which may not have committed yet).
    for i, d in enumerate(decisions):
        assert nodes.clients[(i + 1) % 3].reward(d.decision_id, 1.0, event_id=f"e{i}")

    def everywhere() -> bool:
        return all(sum(s.rewards for s in cl.arm_stats(exp)) == len(decisions) for cl in nodes.clients)

    assert wait_for(everywhere), [sum(s.rewards for s in cl.arm_stats(exp)) for cl in nodes.clients]
    # A definition change on one node reaches the others.
    b.update_experiment(exp, add_arms=["late-arm"])
    assert wait_for(lambda: all(len(cl.arm_stats(exp)) == 13 for cl in nodes.clients))
    assert c.get_experiment(exp).arms[-1].id == "late-arm"


def test_a_retried_event_counts_once_across_nodes(nodes: Nodes) -> None:
    a, _, _ = nodes.clients
    exp = unique("once")
    a.create_experiment(exp, arms=["x", "y"], reward_type="continuous")
    d = a.decide(exp, unit_id="u")
    accepted = [cl.reward(d.decision_id, 5.0, event_id="purchase-1") for cl in nodes.clients for _ in range(2)]
    assert accepted.count(True) == 1, accepted
    assert wait_for(lambda: all(sum(s.reward_sum for s in cl.arm_stats(exp)) == 5.0 for cl in nodes.clients))


def test_kill_9_of_a_node_loses_no_acknowledged_reward(nodes: Nodes) -> None:
    """Reward streams (RewardBatchStream, 100 rewards each) into node A, one after another,
    and unary rewards beside them; SIGKILL of A mid-way. Every reward of a stream A answered,
    and every unary reward it acknowledged, is counted on node B afterwards."""
    a, b, _ = nodes.clients
    exp = unique("kill")
    a.create_experiment(exp, arms=["x", "y"], outcomes={"mode": "explicit"})
    decisions = [b.decide(exp, unit_id=f"u{i}") for i in range(200)]
    acked = [0, 0]  # rewards acknowledged by answered streams, by unary calls
    stop = threading.Event()

    def streams() -> None:
        for s in range(1_000):
            items = [(d.decision_id, 1.0, f"s{s}-{i}") for i, d in enumerate(decisions[:100])]
            try:
                acked[0] += a.reward_many(items).accepted
            except BanditdError:
                return  # the node died under the stream: none of it was acknowledged
            if stop.is_set():
                return

    def unary() -> None:
        for i in range(100_000):
            d = decisions[100 + i % 100]
            try:
                acked[1] += a.reward(d.decision_id, 1.0, event_id=f"k{i}")
            except BanditdError:
                return
            if stop.is_set():
                return

    threads = [threading.Thread(target=streams), threading.Thread(target=unary)]
    for t in threads:
        t.start()
    assert wait_for(lambda: acked[0] >= 500 and acked[1] >= 100, timeout=30)
    nodes.servers[0].kill()  # SIGKILL while both are sending
    stop.set()
    for t in threads:
        t.join(timeout=30)

    def counted() -> int:
        return int(sum(s.rewards for s in b.arm_stats(exp)))

    assert wait_for(lambda: counted() >= sum(acked)), (counted(), acked)


def test_postgres_restart_gives_unavailable_then_recovers(nodes: Nodes, cluster: pg.PostgresCluster) -> None:
    a, b, c = nodes.clients
    exp = unique("restart")
    a.create_experiment(exp, arms=["x", "y"])
    before = b.decide(exp, unit_id="u0")
    cluster.stop()
    try:
        codes = set()
        for cl in (a, b, c):
            for call in (lambda cl=cl: cl.reward(before.decision_id, 1.0, event_id=f"r-{id(cl)}"),
                         lambda cl=cl: [cl.decide(exp, unit_id=f"v{i}") for i in range(50)]):
                try:
                    call()
                except BanditdError as exc:
                    codes.add(exc.code)
        # Refused, with the status that says "retry": never INTERNAL.
        assert codes == {grpc.StatusCode.UNAVAILABLE}, codes
    finally:
        cluster.start()

    def works(cl: Client) -> bool:
        try:
            return bool(cl.reward(cl.decide(exp, unit_id="after").decision_id, 1.0))
        except BanditdError:
            return False

    # Every node recovers by itself; a node's first successful commit after the outage
    # carries the decision records it answered before it (kept queued, not dropped).
    assert wait_for(lambda: all(works(cl) for cl in (a, b, c)), timeout=30)
    assert a.reward(before.decision_id, 1.0, event_id="after-restart")


def test_the_loop_learns_through_calls_spread_over_nodes(nodes: Nodes) -> None:
    exp = unique("learn")
    nodes.clients[0].create_experiment(exp, arms=["good", "bad"], policy="thompson")
    rng = random.Random(7)
    rate = {"good": 0.6, "bad": 0.2}
    late = []
    for i in range(600):
        cl = nodes.clients[rng.randrange(3)]
        d = cl.decide(exp, unit_id=f"u{i}")
        if rng.random() < rate[d.arm]:  # only the 1s are reported
            nodes.clients[rng.randrange(3)].reward(d.decision_id, 1.0)
        if i >= 400:
            late.append(d.arm)
    assert late.count("good") > 0.7 * len(late), late.count("good")


def test_one_node_takes_the_history_snapshots_and_another_takes_over(
    tmp_path: Path, cluster: pg.PostgresCluster
) -> None:
    """Jobs for the whole deployment (history snapshots, retention sweeps) run on one node at a
    time: three nodes snapshotting every second write one snapshot a second, not three; when
    that node is killed another one continues."""
    from banditd.store import Store

    ns = Nodes(tmp_path, cluster.fresh_database(), extra=("--history-seconds", "1"))
    try:
        exp = unique("history")
        ns.clients[0].create_experiment(exp, arms=["x", "y"])
        store = Store(ns.url)
        try:
            time.sleep(4.5)
            first = store.history(exp)
            assert 2 <= len(first) <= 6, len(first)  # ~one a second, not ~three
            # Kill two of the three (whichever held the job): the last one takes it over.
            ns.servers[0].kill()
            ns.servers[1].kill()
            before = len(store.history(exp))
            assert wait_for(lambda: len(store.history(exp)) >= before + 2, timeout=10)
        finally:
            store.close()
    finally:
        ns.close()


def test_an_api_key_created_against_the_database_protects_every_node(nodes: Nodes) -> None:
    """`banditd keys create --store URL` turns auth on for all nodes within about a second; the
    key works on any of them."""
    import contextlib
    import io

    from banditd import cli
    from banditd_client import Unauthenticated

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["keys", "create", "--store", nodes.url, "--scope", "admin"]) == 0
    key = out.getvalue().strip()

    def refused_everywhere() -> bool:
        for cl in nodes.clients:
            try:
                cl.list_experiments()
                return False
            except Unauthenticated:
                pass
        return True

    assert wait_for(refused_everywhere, timeout=10)
    for s in nodes.servers:
        with Client(s.target, api_key=key, timeout=10.0) as c:
            c.create_experiment(unique("keyed"), arms=["a", "b"])


def test_a_node_whose_database_is_down_at_start_exits_with_the_cause(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conftest import free_port

    url = f"postgresql://banditd@127.0.0.1:{free_port()}/banditd"  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "banditd", "serve", "--store", url, "--workers", "1", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "cannot open the store" in proc.stderr and "unavailable" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
