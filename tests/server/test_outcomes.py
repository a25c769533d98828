"""The outcome model through a real server: decisions are observations, events aggregate."""

from __future__ import annotations

import random
import time

import pytest

from banditd_client import Client, InvalidArgument


def settle(client: Client, exp: str, pulls: int, timeout: float = 10.0) -> None:
    """Waits until `pulls` decisions are committed (decision records are written behind the response)."""
    deadline = time.monotonic() + timeout
    while sum(s.pulls for s in client.arm_stats(exp)) < pulls and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_caller_that_reports_only_the_clicks_learns_the_true_rates(client: Client) -> None:
    rates = {"a": 0.02, "b": 0.04, "c": 0.06, "d": 0.08, "e": 0.20}
    client.create_experiment("clicks", arms=list(rates), policy="thompson")
    rng = random.Random(11)
    shown = {a: 0 for a in rates}
    late_best = 0
    for start in range(0, 6000, 100):
        clicks = []
        for t in range(start, start + 100):
            d = client.decide("clicks", unit_id=f"u{t}")
            shown[d.arm] += 1
            late_best += t >= 5000 and d.arm == "e"
            if rng.random() < rates[d.arm]:
                clicks.append((d.decision_id, 1.0))  # the non-clicks are never reported
        assert client.reward_many(clicks).rejected == 0
    settle(client, "clicks", 6000)
    stats = {s.arm: s for s in client.arm_stats("clicks")}
    for arm, rate in rates.items():
        s = stats[arm]
        assert s.pulls == s.observations == shown[arm]
        # Beta(1 + clicks, 1 + pulls - clicks): the empirical rate, within sampling error.
        sd = (rate * (1 - rate) / max(1, s.pulls)) ** 0.5
        assert abs(s.mean - rate) < 4 * sd + 2 / (s.pulls + 2), (arm, s)
        assert 0.0 <= s.low <= s.mean <= s.high <= 1.0
    assert late_best > 600, f"best arm got {late_best} of the last 1,000 decisions"
    diag = client.diagnostics("clicks")
    assert diag.outcome_mode == "decision"
    assert diag.no_event_share > 0.8  # most decisions never get an event: that is fine here
    assert not [a for a in diag.alarms if a.code in ("ONLY_POSITIVE_REWARDS", "REWARD_LOWERED_SCORE")]
    assert diag.rise_ok == diag.rise_checks and diag.rise_checks > 0


def test_explicit_mode_with_only_clicks_raises_an_alarm(client: Client) -> None:
    client.create_experiment("explicit", arms=["a", "b"], outcomes={"mode": "explicit"})
    for i in range(60):
        d = client.decide("explicit", unit_id=f"u{i}")
        client.reward(d.decision_id, 1.0)
    stats = client.arm_stats("explicit")
    assert sum(s.observations for s in stats) == 60
    assert all(s.mean > 0.9 for s in stats if s.observations > 10)
    codes = [a.code for a in client.diagnostics("explicit").alarms]
    assert "ONLY_POSITIVE_REWARDS" in codes


def test_zeros_and_ones_or_only_ones_teach_the_same_posterior(client: Client) -> None:
    client.create_experiment("ones", arms=["x"], policy="uniform")
    client.create_experiment("both", arms=["x"], policy="uniform")
    pattern = [1, 0, 0, 1, 0, 0, 0, 1, 0, 0]
    for v in pattern * 3:
        d1 = client.decide("ones", unit_id="u")
        d2 = client.decide("both", unit_id="u")
        if v:
            client.reward(d1.decision_id, 1.0)
        client.reward(d2.decision_id, float(v))
    settle(client, "ones", 30)
    settle(client, "both", 30)
    (a,), (b,) = client.arm_stats("ones"), client.arm_stats("both")
    assert a.mean == pytest.approx(b.mean) == pytest.approx((1 + 9) / (2 + 30))
    assert a.observations == b.observations == 30


def test_events_of_one_decision_aggregate(client: Client) -> None:
    client.create_experiment("agg", arms=["x"], policy="uniform")
    d = client.decide("agg", unit_id="u")
    settle(client, "agg", 1)
    before = client.arm_stats("agg")[0].mean
    # An explicit 0 for a decision already at 0 changes nothing.
    assert client.reward(d.decision_id, 0.0, event_id="zero")
    assert client.arm_stats("agg")[0].mean == before
    # A click raises the score; a second click for the same decision is no second success.
    assert client.reward(d.decision_id, 1.0, event_id="click-1")
    after_one = client.arm_stats("agg")[0].mean
    assert after_one > before
    assert client.reward(d.decision_id, 1.0, event_id="click-2")
    s = client.arm_stats("agg")[0]
    assert s.mean == after_one == pytest.approx(2 / 3)
    assert s.rewards == 3 and s.observations == 1 and s.rewarded == 1


def test_continuous_rewards_sum_and_last_keeps_the_latest(client: Client) -> None:
    client.create_experiment("rev", arms=["x"], reward_type="continuous", policy="uniform")
    client.create_experiment(
        "last", arms=["x"], reward_type="continuous", policy="uniform", outcomes={"aggregation": "last"}
    )
    for exp in ("rev", "last"):
        d = client.decide(exp, unit_id="u")
        client.reward(d.decision_id, 10.0, event_id="p1")
        client.reward(d.decision_id, 5.0, event_id="p2")
    assert client.arm_stats("rev")[0].reward_sum == 15.0
    assert client.arm_stats("last")[0].reward_sum == 5.0
    assert client.get_experiment("rev").outcomes["aggregation"] == "sum"


def test_bad_outcome_settings_are_refused(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="sum"):
        client.create_experiment("b1", arms=["x"], outcomes={"aggregation": "sum"})
    with pytest.raises(InvalidArgument, match="default reward"):
        client.create_experiment("b2", arms=["x"], outcomes={"default_reward": 2.0})
    with pytest.raises(InvalidArgument, match="min_age"):
        client.create_experiment("b3", arms=["x"], outcomes={"min_age_seconds": -1.0})
    with pytest.raises(InvalidArgument, match="attribution window"):
        client.create_experiment(
            "b4", arms=["x"], attribution_window_seconds=60, outcomes={"min_age_seconds": 120.0}
        )
    assert client.list_experiments() == []


def test_a_decision_counts_only_once_it_matures_with_the_clicks_it_has(client: Client) -> None:
    client.create_experiment("mature", arms=["x"], policy="uniform", outcomes={"min_age_seconds": 1.5})
    clicked = client.decide("mature", unit_id="u1")
    client.decide("mature", unit_id="u2")
    client.reward(clicked.decision_id, 1.0)
    s = client.arm_stats("mature")[0]
    assert s.pulls == 2 and s.observations == 0 and s.mean == 0.5  # not yet observations
    deadline = time.monotonic() + 15
    while client.arm_stats("mature")[0].observations < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    s = client.arm_stats("mature")[0]
    assert s.observations == 2
    assert s.mean == pytest.approx((1 + 1) / (2 + 2))  # one click, one non-click
    # A click after maturity still swaps the value in.
    late = client.decide("mature", unit_id="u3")
    while client.arm_stats("mature")[0].observations < 3 and time.monotonic() < deadline + 15:
        time.sleep(0.05)
    client.reward(late.decision_id, 1.0)
    assert client.arm_stats("mature")[0].mean == pytest.approx((1 + 2) / (2 + 3))
