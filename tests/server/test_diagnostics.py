"""GetDiagnostics shows learning, and its absence, at a glance."""

from __future__ import annotations

import time

import pytest

from banditd_client import Client


@pytest.mark.parametrize("mode", ["decision", "explicit"])
def test_diagnostics_show_a_learning_loop(client: Client, mode: str) -> None:
    client.create_experiment("learns", arms=["a", "b", "c"], policy="thompson", outcomes={"mode": mode})
    rates = {"a": 0.8, "b": 0.1, "c": 0.1}
    for i in range(600):
        d = client.decide("learns", unit_id=f"u{i}")
        client.reward(d.decision_id, 1.0 if (i * 31 % 100) < rates[d.arm] * 100 else 0.0)
    diag = client.diagnostics("learns")
    assert diag.decisions == 600 and diag.rewards == 600
    assert diag.join_rate == 1.0
    # Every arm rewarded with a 1 had a score at least as high after the update.
    assert diag.rise_checks > 0 and diag.rise_ok == diag.rise_checks and diag.rise_share == 1.0
    # A reported 0 lowers a score only where it is a new observation (explicit mode); in
    # decision mode the decision already counted as 0 and the event changes nothing.
    assert diag.fall_ok == diag.fall_checks and (diag.fall_checks > 0 or mode == "decision")
    assert diag.scores_out_of_range == 0 and sum(diag.score_histogram) == 3
    assert diag.top_arm == "a" and diag.top_share > 2 * diag.uniform_share
    assert diag.traffic_entropy < 0.9 and 0.0 <= diag.exploration_share < 0.5
    assert diag.dominated_arms >= 1
    arms = {a.arm: a for a in diag.arms}
    assert arms["a"].mean > 0.6 and not arms["a"].dominated
    assert diag.seconds_since_last_reward >= 0.0 and diag.reward_rate_per_second > 0
    assert [a.code for a in diag.alarms] == []


def test_diagnostics_raise_alarms_when_learning_stalls(client: Client) -> None:
    # Uniform traffic with clearly different arms: not the bandit's fault, so no near-uniform alarm,
    # but rewards that stop arriving are flagged.
    client.create_experiment("stalls", arms=["a", "b"], policy="uniform")
    for i in range(300):
        d = client.decide("stalls", unit_id=f"u{i}")
        if i < 150:
            client.reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
    time.sleep(1.2)
    client.decide("stalls", unit_id="late")
    diag = client.diagnostics("stalls", reward_silence_seconds=1.0)
    codes = {a.code for a in diag.alarms}
    assert "REWARDS_STOPPED" in codes
    assert "NEAR_UNIFORM_TRAFFIC" not in codes
    assert diag.recent_join_rate < 1.0


def test_diagnostics_flag_no_rewards(client: Client) -> None:
    client.create_experiment("silent", arms=["a", "b"], policy="thompson")
    for i in range(1000):
        client.decide("silent", unit_id=f"u{i}")
    codes = {a.code for a in client.diagnostics("silent").alarms}
    assert "NO_REWARDS" in codes


def test_diagnose_cli_prints_the_report(server, client: Client) -> None:  # type: ignore[no-untyped-def]
    import subprocess
    import sys

    client.create_experiment("cli", arms=["a", "b"], policy="thompson")
    for i in range(50):
        d = client.decide("cli", unit_id=f"u{i}")
        client.reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
    out = subprocess.run(
        [sys.executable, "-m", "banditd", "diagnose", "cli", "--target", server.target],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "rewarded arms whose score rose at the next update" in out
    assert "score histogram" in out and "experiment cli" in out


def test_diagnostics_flag_near_uniform_traffic_and_arms_that_do_not_separate(client: Client) -> None:
    # Always exploring while the data clearly separates the arms: near-uniform traffic is flagged.
    client.create_experiment("explores", arms=["a", "b"], policy="epsilon_greedy", epsilon=1.0)
    for i in range(400):
        d = client.decide("explores", unit_id=f"u{i}")
        client.reward(d.decision_id, 1.0 if (d.arm == "a") == (i % 10 != 0) else 0.0)
    diag = client.diagnostics("explores")
    assert diag.dominated_arms == 1
    assert "NEAR_UNIFORM_TRAFFIC" in {a.code for a in diag.alarms}
    # Two equal arms after many rewards: no arm separates, which is flagged too. Each arm's
    # rewards alternate 1, 0, 1, ... so both means stay at 0.5 whatever the traffic split.
    client.create_experiment("equal", arms=["a", "b"], policy="thompson")
    pulls = {"a": 0, "b": 0}
    for i in range(300):
        d = client.decide("equal", unit_id=f"u{i}")
        client.reward(d.decision_id, 1.0 if pulls[d.arm] % 2 == 0 else 0.0)
        pulls[d.arm] += 1
    diag = client.diagnostics("equal")
    assert diag.dominated_arms == 0
    assert "NOT_SEPARATING" in {a.code for a in diag.alarms}
