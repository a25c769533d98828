"""The whole decision loop through a real server process and the client SDK."""

from __future__ import annotations

import random

import pytest

from banditd_client import Client

ARMS = ["a", "b", "c", "d", "e"]


def test_create_decide_reward_stats(client: Client) -> None:
    info = client.create_experiment("subject-lines", arms=ARMS, policy="thompson")
    assert [a.id for a in info.arms] == ARMS and info.policy == "thompson"
    d = client.decide("subject-lines", unit_id="u-17")
    assert d.arm in ARMS and d.decision_id
    assert 0.0 <= d.score <= 1.0 and 0.0 < d.propensity <= 1.0
    assert client.reward(d.decision_id, 1.0) is True
    stats = {s.arm: s for s in client.arm_stats("subject-lines")}
    assert stats[d.arm].pulls == 1 and stats[d.arm].rewards == 1
    assert stats[d.arm].reward_sum == 1.0
    # Beta(1,1) + one success: mean 2/3, and the interval brackets it inside [0, 1].
    assert stats[d.arm].mean == pytest.approx(2 / 3)
    assert 0.0 <= stats[d.arm].low < stats[d.arm].mean < stats[d.arm].high <= 1.0
    others = [s for a, s in stats.items() if a != d.arm]
    assert all(s.pulls == 0 and s.mean == 0.5 for s in others)
    assert [e.id for e in client.list_experiments()] == ["subject-lines"]
    assert client.get_experiment("subject-lines").version == 1


def test_reward_of_one_raises_and_zero_lowers_the_score(client: Client) -> None:
    client.create_experiment("mono", arms=["x", "y"], policy="uniform")
    for value in (1.0, 0.0, 1.0, 1.0, 0.0):
        before = {s.arm: s.mean for s in client.arm_stats("mono")}
        d = client.decide("mono", unit_id="u")
        # The decision is observed at once (as a 0 until a reward says otherwise): the
        # reward moves the mean from there the way its value says, never against it.
        decided = {s.arm: s.mean for s in client.arm_stats("mono")}[d.arm]
        client.reward(d.decision_id, value)
        after = {s.arm: s.mean for s in client.arm_stats("mono")}[d.arm]
        assert after > before[d.arm] if value == 1.0 else after < before[d.arm]
        assert after > decided if value == 1.0 else after == decided


def test_slates_give_k_distinct_arms(client: Client) -> None:
    client.create_experiment("slate", arms=ARMS)
    d = client.decide("slate", unit_id="u", k=3)
    assert len({a.arm for a in d.arms}) == 3
    assert all(0.0 < a.propensity <= 1.0 for a in d.arms)
    assert client.reward(d.decision_id, 1.0, arm=d.arms[2].arm)
    stats = {s.arm: s for s in client.arm_stats("slate")}
    assert stats[d.arms[2].arm].rewards == 1 and stats[d.arms[0].arm].rewards == 0


def test_same_event_counts_once(client: Client) -> None:
    client.create_experiment("dedupe", arms=ARMS)
    d = client.decide("dedupe", unit_id="u")
    assert client.reward(d.decision_id, 1.0, event_id="evt-1") is True
    assert client.reward(d.decision_id, 1.0, event_id="evt-1") is False
    # Without an event id, the decision (and arm) is the event: one reward per decision.
    d2 = client.decide("dedupe", unit_id="u")
    assert client.reward(d2.decision_id, 1.0) is True
    assert client.reward(d2.decision_id, 0.0) is False
    counts = client.reward_many([(d.decision_id, 1.0, "evt-1"), (d.decision_id, 1.0, "evt-2")])
    assert (counts.accepted, counts.duplicate, counts.rejected) == (1, 1, 0)
    assert sum(s.rewards for s in client.arm_stats("dedupe")) == 3


def test_reward_many_counts_and_reasons(client: Client) -> None:
    client.create_experiment("bulk", arms=ARMS)
    ids = [client.decide("bulk", unit_id=f"u{i}").decision_id for i in range(50)]
    items = [(i, 1.0) for i in ids] + [("nope", 1.0), (ids[0], 1.0), (ids[1], float("nan"))]
    counts = client.reward_many(items)
    assert counts.accepted == 50 and counts.duplicate == 1 and counts.rejected == 2
    reasons = {r.index: r for r in counts.rejections}
    assert reasons[50].code == "NOT_FOUND" and "nope" in reasons[50].reason
    assert reasons[52].code == "INVALID_ARGUMENT" and "finite" in reasons[52].reason
    assert sum(s.rewards for s in client.arm_stats("bulk")) == 50


def test_thompson_sends_most_late_traffic_to_the_best_arm(client: Client) -> None:
    rates = {"a": 0.05, "b": 0.05, "c": 0.10, "d": 0.05, "e": 0.05}
    client.create_experiment("learn", arms=list(rates), policy="thompson")
    rng = random.Random(5)
    late_best = 0
    for start in range(0, 10_000, 20):
        # Rewards arrive in small batches, as a real service would report them.
        batch = []
        for t in range(start, start + 20):
            d = client.decide("learn", unit_id=f"u{t}")
            batch.append((d.decision_id, 1.0 if rng.random() < rates[d.arm] else 0.0))
            if t >= 8_000 and d.arm == "c":
                late_best += 1
        assert client.reward_many(batch).accepted == len(batch)
    assert late_best > 1_000, f"best arm got {late_best} of the last 2,000 decisions"


def test_pause_and_resume(client: Client) -> None:
    from banditd_client import ExperimentPaused

    client.create_experiment("p", arms=ARMS)
    d = client.decide("p", unit_id="u")
    assert client.pause("p").state == "paused"
    with pytest.raises(ExperimentPaused, match="paused"):
        client.decide("p", unit_id="u")
    # Rewards for decisions made before the pause still count.
    assert client.reward(d.decision_id, 1.0)
    assert client.resume("p").state == "running"
    assert client.decide("p", unit_id="u").arm in ARMS


def test_retired_arms_get_no_traffic(client: Client) -> None:
    client.create_experiment("retire", arms=ARMS)
    info = client.update_experiment("retire", retire_arms=["a", "b"])
    assert {a.id: a.active for a in info.arms} == {"a": False, "b": False, "c": True, "d": True, "e": True}
    arms = {client.decide("retire", unit_id=f"u{i}").arm for i in range(200)}
    assert arms <= {"c", "d", "e"}
