"""All policy state survives a restart and is the same in every worker process: UCB's t,
the ε-decay count, half-life discounting. Tried as an operator would: a history of decisions
and rewards, then 1,200 decisions before and 1,200 after a graceful restart."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest

from banditd_client import Client
from conftest import ServerProcess

RATES = {"low": 0.2, "mid": 0.5, "high": 0.8}
HISTORY = 400
N = 1200
# Explicit outcome mode: decisions without rewards do not move the posterior, so the 1,200
# decisions before and after the restart are drawn from one state (ε still decays).
CASES = {
    "ucb1": ("ucb1", {}),
    "epsilon_greedy_decay": ("epsilon_greedy", {"epsilon": 0.6, "epsilon_decay": 500.0}),
    "thompson_half_life": ("thompson", {"half_life": 50.0}),
}


def _clients(srv: ServerProcess, n: int) -> list[Client]:
    # One connection each (grpc shares one per target between channels unless told not to):
    # SO_REUSEPORT spreads connections over a pool's processes.
    return [
        Client(srv.target, channel=grpc.insecure_channel(srv.target, options=[("grpc.use_local_subchannel_pool", 1)]),
               timeout=10.0)
        for _ in range(n)
    ]  # fmt: skip


def _history(client: Client, exp: str) -> None:
    rng = random.Random(3)
    batch = []
    for i in range(HISTORY):
        d = client.decide(exp, unit_id=f"h{i}")
        batch.append((d.decision_id, 1.0 if rng.random() < RATES[d.arm] else 0.0))
    assert client.reward_many(batch).accepted == HISTORY


def _scores(clients: list[Client], exp: str) -> list[float]:
    """Every connection's view must agree (all processes of a pool hold one posterior)."""
    deadline = time.monotonic() + 10
    while True:
        views = [[s.mean for s in c.arm_stats(exp)] for c in clients]
        if all(v == pytest.approx(views[0], abs=1e-12) for v in views) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(v == pytest.approx(views[0], abs=1e-12) for v in views), views
    return views[0]


def _decisions(clients: list[Client], exp: str, tag: str) -> Counter[str]:
    return Counter(clients[i % len(clients)].decide(exp, unit_id=f"{tag}{i}").arm for i in range(N))


def _epsilon_share(eps: float, decay: float, start: int) -> float:
    """Expected share of the greedy arm over N decisions from decision count `start`."""
    k = len(RATES)
    return sum(1 - eps * decay / (decay + d) * (k - 1) / k for d in range(start, start + N)) / N


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", list(CASES))
def test_policy_state_is_the_same_after_a_restart_and_in_every_worker(
    tmp_path: Path, case: str, workers: int
) -> None:
    policy, params = CASES[case]
    srv = ServerProcess(tmp_path / "data", ("--workers", str(workers), "--refresh-ms", "20"))
    srv.start()
    clients = _clients(srv, 4 if workers > 1 else 1)
    try:
        clients[0].create_experiment(
            "e", arms=list(RATES), policy=policy, outcomes={"mode": "explicit"}, **params
        )
        _history(clients[0], "e")
        time.sleep(0.2)  # the last decision records commit behind their responses
        before = _scores(clients, "e")
        first = _decisions(clients, "e", "a")
        time.sleep(0.2)
        for c in clients:
            c.close()
        srv.stop()
        srv.start()
        clients = _clients(srv, 4 if workers > 1 else 1)
        after = _scores(clients, "e")
        second = _decisions(clients, "e", "b")
    finally:
        for c in clients:
            c.close()
        srv.kill()
    assert after == pytest.approx(before, abs=1e-12)
    if policy == "ucb1":
        # Deterministic given the state: the same arm before and after.
        assert first == second and len(first) == 1, (first, second)
    elif policy == "epsilon_greedy":
        greedy = max(RATES, key=lambda a: before[list(RATES).index(a)])
        for counts, start in ((first, HISTORY), (second, HISTORY + N)):
            expected = _epsilon_share(0.6, 500.0, start)
            observed = counts[greedy] / N
            sd = (expected * (1 - expected) / N) ** 0.5
            assert abs(observed - expected) < 4 * sd + 0.005, (start, observed, expected)
    else:
        for arm in RATES:
            p = (first[arm] + second[arm]) / (2 * N)
            sd = (2 * p * (1 - p) / N) ** 0.5
            assert abs(first[arm] - second[arm]) / N < 4 * sd + 0.005, (arm, first, second)
