"""Running an experiment without code: winner analysis and the stop rule, the random control
share, traffic floors and burn-in (with exact propensities), guardrails and the audit log —
end to end through the client SDK against a real server."""

from __future__ import annotations

import random
import time
from collections import Counter, deque

import pytest

from banditd.guardrails import EVALUATE_EVERY_S
from banditd.guardrails import _reward_drop as reward_drop_rule
from banditd.settings import Guardrail
from banditd_client import Client, ExperimentPaused, FailedPrecondition, InvalidArgument

FAST = {"min_days": 0, "min_events_per_arm": 200}


def play(c: Client, exp: str, rates: dict[str, float], n: int, seed: int, prefix: str = "u") -> list:
    """n decisions; a click (reward 1) with the arm's rate, non-clicks never reported."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        d = c.decide(exp, unit_id=f"{prefix}{i}")
        out.append(d)
        if rng.random() < rates[d.arm]:
            c.reward(d.decision_id, 1.0)
    return out


def test_clear_winner_ships_with_a_control_share_and_uplift_covers_truth(server) -> None:
    c = server.client()
    rates = {"control": 0.10, "b": 0.10, "c": 0.25}
    c.create_experiment(
        "subject", ["control", "b", "c"],
        # The control arm keeps a floor: the bandit would starve it, and the uplift over it
        # needs its data.
        settings={"control_arm_id": "control", "control_share": 0.1, "criteria": FAST,
                  "arm_floors": {"control": 0.1}},
    )  # fmt: skip
    decisions = play(c, "subject", rates, 4000, seed=1)
    time.sleep(0.3)  # last rewards applied
    a = c.analyse("subject")
    assert a.verdict == "ship", a.reason
    assert a.stop and a.best_arm_id == "c"
    best = a.arm("c")
    assert best.reference_arm_id == "control"
    truth = rates["c"] / rates["control"] - 1.0  # +150%
    assert best.uplift_low < truth < best.uplift_high, (best.uplift_low, best.uplift_high)
    assert best.p_best > 0.95 and best.p_min_uplift >= 0.95
    assert a.arm("control").reference_arm_id == ""  # the control is not compared with itself
    # About 10% of decisions were the random control, logged as such, and the bandit beat it.
    share = a.control_decisions / (a.control_decisions + a.bandit_decisions)
    assert 0.07 < share < 0.13, share
    assert a.bandit_mean > a.control_mean
    # Every logged propensity includes the control share (at least 0.1 / 3 per arm) and the
    # control arm's floor.
    assert min(d.propensity for d in decisions) >= 0.1 / 3 - 1e-12
    assert min(d.propensity for d in decisions if d.arm == "control") >= 0.1 / 3 + 0.9 * 0.1 - 1e-12


def test_equal_arms_iterate(server) -> None:
    c = server.client()
    c.create_experiment("same", ["a", "b", "c"], settings={"criteria": FAST, "control_share": 0.1})
    play(c, "same", {"a": 0.2, "b": 0.2, "c": 0.2}, 1500, seed=2)
    a = c.analyse("same")
    assert a.verdict == "iterate", a.reason
    assert not a.stop
    # Before the minimum duration nothing but iterate, whatever the data say.
    c.update_experiment("same", settings={"criteria": {"min_days": 7}})
    a = c.analyse("same")
    assert a.verdict == "iterate" and "more days" in a.reason


def test_kill_when_no_arm_beats_the_control(server) -> None:
    c = server.client()
    c.create_experiment(
        "dud", ["control", "b"],
        settings={"control_arm_id": "control", "criteria": {**FAST, "min_uplift": 0.5}, "traffic_floor": 0.3},
    )  # fmt: skip
    play(c, "dud", {"control": 0.3, "b": 0.1}, 3000, seed=3)
    a = c.analyse("dud")
    assert a.verdict == "kill", a.reason
    assert "control" in a.reason


def test_floors_and_control_give_the_exact_mixture_propensity(server) -> None:
    """greedy with one clear best arm: w = (0, 1, 0); control c = 0.2, floors 0.1 each (F = 0.3):
    p(best) = c/3 + (1 - c)(0.1 + 0.7) and p(other) = c/3 + (1 - c) 0.1, logged exactly and
    matched by the observed frequencies."""
    c = server.client()
    c.create_experiment("mix", ["a", "b", "x"], policy="greedy")
    for _ in range(30):
        d = c.decide("mix", unit_id="w")
        c.reward(d.decision_id, 1.0 if d.arm == "b" else 0.0)
    c.update_experiment("mix", settings={"control_share": 0.2, "traffic_floor": 0.1})
    p_best = 0.2 / 3 + 0.8 * 0.8
    p_other = 0.2 / 3 + 0.8 * 0.1
    counts: Counter[str] = Counter()
    n = 3000
    for i in range(n):
        d = c.decide("mix", unit_id=f"m{i}")
        counts[d.arm] += 1
        assert d.propensity == pytest.approx(p_best if d.arm == "b" else p_other, abs=1e-9)
    assert counts["b"] / n == pytest.approx(p_best, abs=0.03)
    assert counts["a"] / n == pytest.approx(p_other, abs=0.025)


def test_burn_in_is_uniform_until_every_arm_has_its_observations(server) -> None:
    c = server.client()
    c.create_experiment("burn", ["a", "b", "c"], policy="greedy", settings={"burn_in": 30})
    first = [c.decide("burn", unit_id=f"b{i}") for i in range(45)]
    assert all(d.propensity == pytest.approx(1 / 3) for d in first)
    assert len({d.arm for d in first}) == 3
    for _ in range(200):
        d = c.decide("burn", unit_id="x")
        c.reward(d.decision_id, 1.0 if d.arm == "c" else 0.0)
    time.sleep(0.3)
    later = [c.decide("burn", unit_id=f"l{i}") for i in range(20)]
    assert {d.arm for d in later} == {"c"} and all(d.propensity == 1.0 for d in later)


BAD_SETTINGS = [
    {"control_share": 1.0},
    {"control_share": -0.1},
    {"traffic_floor": 0.4},  # 3 arms: 1.2 in all
    {"arm_floors": {"a": 0.7, "b": 0.4}},
    {"arm_floors": {"nope": 0.1}},
    {"burn_in": 50, "criteria": {"horizon": 100}},
    {"guardrails": [{"metric": "bounce_rate", "action": "pause"}]},
    {"guardrails": [{"metric": "reward_drop", "action": "explode"}]},
    {"guardrails": [{"metric": "reward_drop", "action": "fallback", "fallback_arm_id": "nope"}]},
    {"guardrails": [{"metric": "reward_drop", "action": "fallback"}]},
    {"control_arm_id": "nope"},
    {"criteria": {"confidence": 1.0}},
    {"criteria": {"min_days": 10, "max_days": 5}},
]


@pytest.mark.parametrize("bad", BAD_SETTINGS)
def test_bad_settings_are_refused_and_change_nothing(server, bad: dict) -> None:
    c = server.client()
    before = c.create_experiment("cfg", ["a", "b", "c"])
    with pytest.raises(InvalidArgument):
        c.update_experiment("cfg", settings=bad)
    with pytest.raises(InvalidArgument):
        c.create_experiment("cfg2", ["a", "b", "c"], settings=bad)
    after = c.get_experiment("cfg")
    assert after.version == before.version and after.settings == before.settings
    assert [e.action for e in c.audit_log("cfg")] == ["create"]
    assert [e.experiment_id for e in c.audit_log()] == ["cfg"]  # cfg2 left no trace


def test_contextual_policies_refuse_control_share_and_floors(server) -> None:
    c = server.client()
    with pytest.raises(InvalidArgument, match="exploration_floor"):
        c.create_experiment("ctx", ["a", "b"], policy="lin_ts", settings={"control_share": 0.1})


def _wait_state(c: Client, exp: str, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.get_experiment(exp).state == state:
            return
        time.sleep(0.2)
    raise AssertionError(f"{exp} did not reach {state}: {c.get_experiment(exp).state}")


def _reward_drop(c: Client, exp: str) -> None:
    """1,000 observations at a 50% rate, a pause longer than the window, then a drop to 5%
    (until the guardrail pauses the experiment: it may act before the 400th decision)."""
    play(c, exp, {"a": 0.5, "b": 0.5}, 1000, seed=4, prefix="good")
    time.sleep(3.5)
    try:
        play(c, exp, {"a": 0.05, "b": 0.05}, 400, seed=5, prefix="bad")
    except ExperimentPaused:
        pass


@pytest.mark.parametrize("action", ["pause", "fallback"])
def test_reward_drop_guardrail_acts_and_is_audited(server, action: str) -> None:
    c = server.client()
    rule = {"metric": "reward_drop", "action": action, "window_seconds": 3, "min_samples": 200}
    if action == "fallback":
        rule["fallback_arm_id"] = "a"
    c.create_experiment("guarded", ["a", "b"], settings={"guardrails": [rule]})
    _reward_drop(c, "guarded")
    _wait_state(c, "guarded", "paused" if action == "pause" else "fallback")
    entries = c.audit_log("guarded")
    assert entries[0].action == f"guardrail_{action}" and entries[0].actor == "guardrail"
    assert entries[0].details["state"] == ["running", "paused" if action == "pause" else "fallback"]
    codes = [a.code for a in c.diagnostics("guarded").alarms]
    assert "GUARDRAIL_BREACHED" in codes
    if action == "pause":
        with pytest.raises(ExperimentPaused):
            c.decide("guarded", unit_id="after")
    else:
        info = c.get_experiment("guarded")
        assert info.serving_arm_id == "a"
        for i in range(20):
            d = c.decide("guarded", unit_id=f"after{i}")
            assert d.arm == "a" and d.propensity == 1.0
        with pytest.raises(FailedPrecondition):
            c.decide("guarded", unit_id="slate", k=2)
        assert "FALLBACK" in codes
    # A person resumes: learning goes on, and the old drop does not fire again at once.
    c.resume("guarded")
    time.sleep(2.5)
    assert c.get_experiment("guarded").state == "running"
    assert c.audit_log("guarded", limit=1)[0].action == "resume"


def test_alert_guardrail_only_records(server) -> None:
    c = server.client()
    rule = {"metric": "concentration", "threshold": 0.5, "action": "alert", "min_samples": 100}
    c.create_experiment("conc", ["a", "b"], policy="greedy", settings={"guardrails": [rule]})
    for i in range(300):
        d = c.decide("conc", unit_id=f"c{i}")
        c.reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and c.audit_log("conc", limit=1)[0].action != "guardrail_alert":
        time.sleep(0.2)
    entry = c.audit_log("conc", limit=1)[0]
    assert entry.action == "guardrail_alert" and entry.details["metric"] == "concentration"
    assert c.get_experiment("conc").state == "running"


def test_audit_log_survives_restart_and_names_changes(server) -> None:
    c = server.client()
    c.create_experiment("aud", ["a", "b"])
    c.update_experiment("aud", add_arms=["c"])
    c.update_experiment("aud", settings={"control_share": 0.05})
    c.pause("aud")
    server.restart()
    c = server.client()
    actions = [e.action for e in c.audit_log("aud")]
    assert actions == ["pause", "settings", "update", "create"]
    assert c.audit_log("aud")[2].details == {"added_arms": ["c"]}
    assert c.get_experiment("aud").settings["control_share"] == 0.05


def test_analyse_large_and_degenerate_experiments(server) -> None:
    c = server.client()
    c.create_experiment("wide", [f"a{i}" for i in range(20_000)])
    for i in range(50):
        c.decide("wide", unit_id=f"w{i}")
    a = c.analyse("wide")  # default draws shrink with the arms: no refusal, bounded work
    assert len(a.arms) == 20_000 and abs(sum(x.p_best for x in a.arms) - 1.0) < 1e-9
    with pytest.raises(InvalidArgument):
        c.analyse("wide", draws=20_000)  # 4e8 arm-draws: refused with the reason
    c.create_experiment("one", ["a", "b"])
    c.update_experiment("one", retire_arms=["b"])
    with pytest.raises(FailedPrecondition):
        c.analyse("one")
    with pytest.raises(InvalidArgument):
        c.analyse("one", draws=5)


def test_reward_drop_with_the_default_window_is_seen_in_a_new_experiment(server) -> None:
    """Default rule (5%, 300 s window, 100 samples): a drop minutes before the window could
    span is still caught, and a steady rate is not a breach."""
    c = server.client()
    c.create_experiment("fresh", ["a", "b"], settings={"guardrails": [{"metric": "reward_drop", "action": "pause"}]})
    c.create_experiment("steady", ["a", "b"], settings={"guardrails": [{"metric": "reward_drop", "action": "pause"}]})
    play(c, "fresh", {"a": 0.5, "b": 0.5}, 600, seed=8, prefix="good")
    play(c, "steady", {"a": 0.3, "b": 0.3}, 600, seed=9, prefix="s1")
    deadline = time.monotonic() + 20
    n = 0
    while time.monotonic() < deadline and c.get_experiment("fresh").state == "running":
        try:
            play(c, "fresh", {"a": 0.0, "b": 0.0}, 50, seed=n, prefix=f"bad{n}-")
        except ExperimentPaused:
            break
        play(c, "steady", {"a": 0.3, "b": 0.3}, 50, seed=100 + n, prefix=f"s{n}-")
        n += 1
    assert c.get_experiment("fresh").state == "paused"
    assert c.get_experiment("steady").state == "running"


def test_analyse_survives_extreme_continuous_rewards(server) -> None:
    """Found by the wire fuzz: a control mean whose square underflows (1e-200) made the
    bandit-vs-control interval divide by zero (INTERNAL). Now: finite numbers or NaN."""
    c = server.client()
    for exp, value in (("tiny", 1e-200), ("huge", 1e12), ("mixed", -1e12)):
        c.create_experiment(exp, ["a", "b"], reward_type="continuous", settings={"control_share": 0.5})
        for i in range(60):
            d = c.decide(exp, unit_id=f"u{i}")
            c.reward(d.decision_id, value if i % 3 else 0.0)
        a = c.analyse(exp)
        assert a.verdict in ("ship", "iterate", "kill")
        assert a.control_decisions + a.bandit_decisions > 0


def _drop_rule_run(seed: int, seconds: float, rate: float = 40.0, after: float | None = None) -> float | None:
    """The reward_drop rule looked at every EVALUATE_EVERY_S over a Bernoulli(0.3) stream (0.24
    from `after` on, a 20% drop); the time of the first breach, or None."""
    rng = random.Random(seed)
    rule = Guardrail.resolved("reward_drop", 0.0, "pause", "", 0.0, 0)
    samples: deque[tuple[float, float, float, float]] = deque()
    o = r = 0.0
    t = 0.0
    while t < seconds:
        t += EVALUATE_EVERY_S
        p = 0.24 if after is not None and t > after else 0.3
        for _ in range(int(rate * EVALUATE_EVERY_S)):
            x = float(rng.random() < p)
            o, r = o + 1, r + x
        samples.append((t, o, r, r))  # binary: the sum of squares is the sum
        if reward_drop_rule(rule, samples, t)[1]:
            return t
    return None


def test_a_steady_reward_rate_looked_at_every_half_second_is_not_a_drop_but_a_real_drop_is() -> None:
    """At 95% one-sided (z 1.64) these steady streams were paused within 200 s in most runs:
    each look is a test, and there are two a second."""
    false_alarms = [s for s in range(30) if _drop_rule_run(s, 200.0) is not None]
    assert false_alarms == []
    caught = [_drop_rule_run(100 + s, 400.0, after=100.0) for s in range(10)]
    assert all(t is not None and 100.0 < t < 250.0 for t in caught), caught
